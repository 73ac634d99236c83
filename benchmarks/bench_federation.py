"""Cost of a federated round: Flower's stock one-user-per-node simulation against fedpa's cohort nodes,
and the bytes each algorithm sends per client per round, measured in one run on a real dataset.

    .venv/bin/python benchmarks/bench_federation.py [--data data/small] [--foundation runs/demo/foundation]
        [--clients 10 100 500] [--out /tmp/bench_federation.json]

Both need a dataset and a foundation (`fedpa demo` makes `data/small` and `runs/demo/foundation`).
Everything the runs write (run directories, the feature cache) goes under ``--root`` (a temporary
directory), never into the repository or the home directory.

1. **Time per round and per client update** at each ``--clients`` N: ``max_clients = N`` (the same N
   private users for both engines) and ``num_rounds = 2`` with evaluation only at round 0 and the last
   round. Engines, run one after the other for each N (side by side, so a shared machine's load hits
   both alike):

   - *stock*: ``cohort_size = 1``, ``clients_per_round = 1.0``: every user is its own virtual
     SuperNode (N nodes, N train messages a round), Flower's stock simulation;
   - *cohort*: ``cohort_size = 0``, ``clients_per_round = N`` (a count): one node per CPU core, each
     node trains its sampled users in one message.

   Time per round is ``train_s`` of round 2 in ``metrics.jsonl`` (round 1 includes warm-up: first
   autograd/optimizer use in each worker); per client update = ``train_s / clients``. Evaluation time
   of the last round (every node scores all its users) and the whole call's wall time (Ray start,
   discovery, feature cache lookup) are shown too. If a stock run at the largest N is projected to
   exceed ``--stock-budget-s``, it runs 1 round only and its time is round 1's (warm-up included); the
   table says so.
2. **Bytes per client per round** for each algorithm: a 1-round run with ``max_clients = 20`` and
   ``cohort_size = 1`` (so one message carries exactly one client's state), from ``summary.json``
   (``bytes_down_per_client_round``: the serialized train instruction, ``bytes_up_per_client_round``:
   the serialized reply), next to the full model (foundation parameters x 4 bytes) and the shared
   state (shared parameters x 4 bytes, what the algorithm aggregates).

Wall-clock figures depend on the machine's other load; the 1-minute load average before each run is
printed. Ratios of runs taken side by side are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from fedpa.common.config import FederationConfig  # noqa: E402
from fedpa.simulations.simulate import simulate  # noqa: E402

ALGORITHMS = ["fedpa", "local", "fedavg-lora", "fedper", "fedper-ft", "ditto"]
ENGINES = {"stock": 1, "cohort": 0}   # name -> cohort_size


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_one(base: FederationConfig, run_dir: Path, cohort_size: int, **overrides) -> dict:
    """One simulate() call; returns the summary, the per-round metrics and the call's wall time."""
    cfg = replace(base, run_dir=str(run_dir), **overrides)
    load = loadavg()
    t0 = time.perf_counter()
    summary = simulate(cfg, cohort_size=cohort_size)
    wall = time.perf_counter() - t0
    return {"summary": summary, "metrics": read_metrics(run_dir), "call_wall_s": wall, "load1_before": load}


def round_times(metrics: list[dict]) -> dict:
    """train_s per round, evaluation time of round 0 and of the last round (from wall_s differences)."""
    by = {m["round"]: m for m in metrics}
    last = max(by)
    train = {r: by[r]["train_s"] for r in by if r > 0}
    out = {"train_s": train, "rounds": last}
    # wall_s of round r is taken after its evaluation and counts from before round 0's evaluation, so
    # wall_s[r] - wall_s[r-1] - train_s[r] is round r's evaluation (+ a checkpoint write); with a single
    # round, round 0's and round 1's evaluations cannot be told apart.
    if last >= 2:
        out["eval0_s"] = by[1]["wall_s"] - by[1]["train_s"]   # round 1 does not evaluate (eval_every is large)
        out["eval_last_s"] = by[last]["wall_s"] - by[last - 1]["wall_s"] - by[last]["train_s"]
    elif last == 1:
        out["eval0_and_last_s"] = by[1]["wall_s"] - by[1]["train_s"]
    out["selected"] = by[last].get("selected")
    out["clients_ok"] = by[last].get("clients_ok")
    return out


# ---------------------------------------------------------------------------------------------- timing

def bench_timing(base: FederationConfig, root: Path, sizes: list[int], stock_budget_s: float,
                 stock_rounds_large: str) -> list[dict]:
    rows = []
    prev_stock: dict | None = None
    for n in sizes:
        for engine in ("cohort", "stock"):
            rounds = 2
            note = ""
            if engine == "stock" and n == max(sizes) and len(sizes) > 1:
                if stock_rounds_large == "1":
                    rounds, note = 1, "1 round (forced by --stock-rounds-large)"
                elif stock_rounds_large == "auto" and prev_stock is not None:
                    projected = prev_stock["call_wall_s"] * n / prev_stock["clients"]
                    if projected > stock_budget_s:
                        rounds = 1
                        note = (f"1 round: projected {projected:.0f} s for 2 rounds > --stock-budget-s "
                                f"{stock_budget_s:.0f}; time is round 1's (includes warm-up)")
            overrides = dict(max_clients=n, num_rounds=rounds, eval_every=10_000,
                             clients_per_round=1.0 if engine == "stock" else float(n))
            print(f"  running {engine:6s} N={n:4d} rounds={rounds} (load {loadavg():.2f}) ...", flush=True)
            r = run_one(base, root / "timing" / f"{engine}-{n}", ENGINES[engine], **overrides)
            t = round_times(r["metrics"])
            measured_round = rounds  # round 2 when there are two (round 1 is warm-up)
            train_s = t["train_s"][measured_round]
            clients = t["selected"] or n
            nodes = n if engine == "stock" else math.ceil(n / math.ceil(n / (os.cpu_count() or 1)))
            row = {"engine": engine, "clients": n, "nodes": nodes, "num_rounds": rounds,
                   "measured_round": measured_round, "train_s": train_s,
                   "train_s_round1": t["train_s"].get(1), "per_update_ms": 1e3 * train_s / clients,
                   "eval0_s": t.get("eval0_s"), "eval_last_s": t.get("eval_last_s"),
                   "selected": t["selected"], "clients_ok": t["clients_ok"],
                   "call_wall_s": r["call_wall_s"], "load1_before": r["load1_before"], "note": note}
            rows.append(row)
            ev = (f"eval last {row['eval_last_s']:.2f} s" if row["eval_last_s"] is not None
                  else f"eval round 0 + last {t['eval0_and_last_s']:.2f} s")
            row["eval0_and_last_s"] = t.get("eval0_and_last_s")
            print(f"    train round {measured_round}: {train_s:.2f} s  ({row['per_update_ms']:.1f} ms/client), "
                  f"{ev}, call {r['call_wall_s']:.1f} s", flush=True)
            if engine == "stock":
                prev_stock = row
    return rows


def print_timing(rows: list[dict]) -> list[dict]:
    print()
    print("Time per round and per client update (train_s of the measured round; algorithm fedpa)")
    hdr = (f"{'clients':>7} {'engine':>6} {'nodes':>5} {'rnd':>3} {'round s':>8} {'ms/update':>9} "
           f"{'round1 s':>8} {'eval s':>7} {'call s':>7} {'load':>5}")
    print(hdr)
    print("-" * len(hdr))
    ratios = []
    for n in sorted({r["clients"] for r in rows}):
        pair = {r["engine"]: r for r in rows if r["clients"] == n}
        for engine in ("stock", "cohort"):
            r = pair.get(engine)
            if r is None:
                continue
            ev = f"{r['eval_last_s']:>7.2f}" if r["eval_last_s"] is not None else f"{'-':>7}"
            print(f"{n:>7} {engine:>6} {r['nodes']:>5} {r['measured_round']:>3} {r['train_s']:>8.2f} "
                  f"{r['per_update_ms']:>9.1f} {r['train_s_round1']:>8.2f} {ev} "
                  f"{r['call_wall_s']:>7.1f} {r['load1_before']:>5.2f}" + (f"  * {r['note']}" if r["note"] else ""))
        if "stock" in pair and "cohort" in pair:
            s, c = pair["stock"], pair["cohort"]
            ratio = {"clients": n, "per_update_stock_over_cohort": s["per_update_ms"] / c["per_update_ms"],
                     "eval_stock_over_cohort": (s["eval_last_s"] / c["eval_last_s"])
                     if s["eval_last_s"] is not None and c["eval_last_s"] else None,
                     "call_stock_over_cohort": s["call_wall_s"] / c["call_wall_s"],
                     "stock_rounds": s["num_rounds"]}
            ratios.append(ratio)
    print("round s: train_s of round 'rnd'; ms/update: round s / clients; round1 s: round 1 (warm-up); eval s: "
          "the last\n"
          "round's evaluation of all N users (+ checkpoint); call s: the whole simulate() call; load: 1-min "
          "load before")
    print()
    print("Ratio stock / cohort")
    print(f"{'clients':>7} {'per update':>10} {'eval':>6} {'whole call':>10}")
    for q in ratios:
        ev = f"{q['eval_stock_over_cohort']:.1f}x" if q["eval_stock_over_cohort"] else "-"
        star = "  * stock measured on round 1 (warm-up included)" if q["stock_rounds"] == 1 else ""
        print(f"{q['clients']:>7} {q['per_update_stock_over_cohort']:>9.1f}x {ev:>6} "
              f"{q['call_stock_over_cohort']:>9.1f}x{star}")
    return ratios


# ---------------------------------------------------------------------------------------------- bytes

def bench_bytes(base: FederationConfig, root: Path, algorithms: list[str], clients: int) -> list[dict]:
    from fedpa.foundation.model import count_parameters, load_foundation

    # summary.json's model.foundation_params is counted after the adapters were injected into the
    # foundation (peft works in place), so it includes them; the bare foundation is shown beside it
    bare = count_parameters(load_foundation(base.foundation))
    rows = []
    for algo in algorithms:
        print(f"  running {algo:12s} 1 round, {clients} clients, stock nodes (load {loadavg():.2f}) ...", flush=True)
        r = run_one(base, root / "bytes" / algo, 1, algorithm=algo, max_clients=clients, num_rounds=1,
                    clients_per_round=1.0, eval_every=10_000)
        s = r["summary"]
        m = s["model"]
        rows.append({"algorithm": algo, "bytes_down": s["bytes_down_per_client_round"],
                     "bytes_up": s["bytes_up_per_client_round"],
                     "full_model_bytes": 4 * m["foundation_params"], "shared_bytes": 4 * m["shared_params"],
                     "foundation_params": m["foundation_params"], "shared_params": m["shared_params"],
                     "private_params_per_user": m["private_params_per_user"],
                     "bare_foundation_params": bare, "bare_foundation_bytes": 4 * bare,
                     "clients": s.get("clients"), "call_wall_s": r["call_wall_s"]})
    return rows


def print_bytes(rows: list[dict]) -> None:
    print()
    print("Bytes per client per round (1 round, one client per message), against the full model")
    hdr = (f"{'algorithm':>12} {'down B':>9} {'up B':>9} {'shared B':>9} {'private/user B':>14} "
           f"{'full model B':>13} {'up/full':>8} {'down/shared':>11} {'up/shared':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        up_full = r["bytes_up"] / r["full_model_bytes"]
        down_shared = f"{r['bytes_down'] / r['shared_bytes']:.2f}" if r["shared_bytes"] else "-"
        up_shared = f"{r['bytes_up'] / r['shared_bytes']:.2f}" if r["shared_bytes"] else "-"
        print(f"{r['algorithm']:>12} {r['bytes_down']:>9,.0f} {r['bytes_up']:>9,.0f} {r['shared_bytes']:>9,} "
              f"{4 * r['private_params_per_user']:>14,} {r['full_model_bytes']:>13,} {up_full:>8.3%} "
              f"{down_shared:>11} {up_shared:>9}")
    if rows:
        print(f"full model B: summary.json model.foundation_params x 4 (the foundation with this algorithm's "
              f"adapters injected); the bare\nfoundation is {rows[0]['bare_foundation_params']:,} parameters = "
              f"{rows[0]['bare_foundation_bytes']:,} B. shared B: model.shared_params x 4 (float32 payload "
              f"without\nmessage framing, names, counts or the run configuration every instruction carries).")


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/small", help="canonical dataset (default: data/small)")
    ap.add_argument("--foundation", default="runs/demo/foundation", help="foundation checkpoint directory")
    ap.add_argument("--root", type=Path, default=Path("/tmp/bench_fed"),
                    help="where run directories and the feature cache go (emptied first)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_federation.json"), help="JSON of the results")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 500], help="clients per round to time")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS), help="algorithms for the bytes table")
    ap.add_argument("--bytes-clients", type=int, default=20, help="clients of each bytes run")
    ap.add_argument("--stock-budget-s", type=float, default=300.0,
                    help="run the stock engine at the largest N for 1 round if 2 would take longer than this")
    ap.add_argument("--stock-rounds-large", choices=["auto", "1", "2"], default="auto",
                    help="rounds of the stock run at the largest N (auto: see --stock-budget-s)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-bytes", action="store_true")
    args = ap.parse_args()

    data, foundation = Path(args.data).resolve(), Path(args.foundation).resolve()
    for p, what in ((data / "manifest.json", "dataset"), (foundation / "config.json", "foundation")):
        if not p.exists():
            ap.error(f"{p.parent}: no {what} (run `fedpa demo` first, or pass --data/--foundation)")
    if any(n < 1 for n in args.clients) or args.bytes_clients < 1:
        ap.error("client counts must be >= 1")
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]

    root = args.root.resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    logging.basicConfig(level=logging.ERROR)
    base = FederationConfig(data_dir=str(data), foundation=str(foundation), algorithm="fedpa",
                            feature_cache=str(root / "features"), seed=0)

    import flwr
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
           "cpus": os.cpu_count(), "machine": platform.machine(), "argv": sys.argv,
           "data": str(data), "foundation": str(foundation), "root": str(root)}
    print(f"bench_federation: {env['cpus']} CPUs, torch {env['torch']}, flwr {env['flwr']}, "
          f"data {data}, foundation {foundation}, load {loadavg():.2f}")
    results: dict = {"env": env}
    t_all = time.perf_counter()

    # build every feature cache first, so that no timed call pays for encoding its users
    from fedpa.client.runtime import ensure_feature_cache

    sizes = ([] if args.skip_timing else sorted(args.clients)) + ([] if args.skip_bytes else [args.bytes_clients])
    t = time.perf_counter()
    for n in sorted(set(sizes)):
        ensure_feature_cache(replace(base, max_clients=n))
    results["feature_cache_build_s"] = time.perf_counter() - t
    print(f"feature caches for {sorted(set(sizes))} clients built in {results['feature_cache_build_s']:.1f} s")

    if not args.skip_timing:
        print("\n1. timing (algorithm fedpa, 2 rounds, evaluation at round 0 and the last round)")
        rows = bench_timing(base, root, sorted(args.clients), args.stock_budget_s, args.stock_rounds_large)
        results["timing"] = rows
        results["timing_ratios"] = print_timing(rows)
    if not args.skip_bytes:
        print(f"\n2. bytes ({args.bytes_clients} clients, 1 round, cohort_size=1)")
        rows = bench_bytes(base, root, algorithms, args.bytes_clients)
        results["bytes"] = rows
        print_bytes(rows)

    results["total_wall_s"] = time.perf_counter() - t_all
    print(f"\ntotal {results['total_wall_s']:.0f} s; runs under {root}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, args.out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
