"""Simulation at scale: Flower's stock simulation against the cohort engine, and a RecFlow-size round.

    .venv/bin/python benchmarks/bench_scale.py [--data data/small] [--foundation runs/demo/foundation]
        [--sizes 100 300 1000] [--rounds 2] [--passes 1] [--as-released] [--full-round] [--root /tmp/bench_scale]
        [--out /tmp/bench_scale.json]

Everything the runs write (run directories, feature caches, the RecFlow-size dataset) goes under
``--root``, never into the repository or the home directory.

1. **Client updates per second**, side by side in one run, same model (``--algorithm fedpa`` with its recipe, as
   ``fedpa simulate`` runs it; ``--as-released``: FedPA as released, without the item-side tables), data, local
   work (1 epoch, batch 64) and users: at each ``--sizes`` N, ``max_clients = N`` and every user trains in
   each of 2 rounds (evaluation only at round 0 and the end). Engines, run one after the other per N:

   - *stock*: ``--cohort-size 1``: one virtual SuperNode per user on Flower's Ray backend, N train
     messages a round (Flower's stock simulation);
   - *loop*: one node per CPU core, each training its users one after another (``cohort-engine loop``);
   - *vectorized*: one node per CPU core, each training its users at once (``cohort-engine vectorized``).

   Updates per second = N / ``train_s`` of round 2, or with ``--rounds R`` the median of rounds 2..R (round 1
   includes each worker's warm-up; a sub-second round moves with the machine's other load). With ``--passes P``
   the engines run P times per N in alternating order (A B C, then C B A, ...) and each engine's round times
   are averaged: the machine's pace can drift by a fifth within an hour, and a ratio's engines run minutes
   apart, so a drift weighs on all of them alike once the passes are averaged.
   Printed: the table, the ratios vectorized / stock and vectorized / loop, and a PNG scaling curve
   (users per round against round time, every engine) in ``--root``.
2. **A RecFlow-size round** (``--full-round``): the ``recflow`` synthetic preset (42,000 users) over
   3 days, every user a client (no open users) training on its first day (``by-day``: day 2 validates,
   day 3 tests), one round with the vectorized cohort engine. The foundation is *initialised, not
   pre-trained* (``FoundationConfig.from_dataset_vocab``): speed and memory do not depend on its weights.
   Printed: the one-off dataset generation and feature-cache times, the round's training time, the
   evaluations' time, the whole call, and the peak resident memory of the process tree (sum of RSS of
   this process and every descendant, Ray's workers included, sampled every 0.5 s: an upper bound,
   shared pages count once per process).
3. **Bytes of personal state per simulated user**: the private tensors of one fedpa user, as held in
   the node's ``context.state`` (packed with 99 other users') and as one encrypted personal-store file.

Wall-clock figures depend on the machine's other load: the 1-minute load average before each run is
printed; ratios of runs taken side by side are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE),):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_federation import loadavg, run_one  # noqa: E402

from fedpa.common.config import FederationConfig, with_recipe  # noqa: E402
from fedpa.common.files import save_figure  # noqa: E402

ENGINES = {"stock": (1, "vectorized"), "loop": (0, "loop"), "vectorized": (0, "vectorized")}


class PeakMemory:
    """Peak memory of this process and all its descendants (Ray's workers included), sampled in a thread:
    the sum of PSS (proportional set size: a page shared by k processes counts 1/k in each, so the sum is
    what the tree really holds) and, as an upper bound, the sum of RSS; plus the processes at the PSS peak."""

    def __init__(self, interval: float = 1.0):
        import psutil

        self.psutil, self.interval = psutil, interval
        self.peak_pss = self.peak_rss = 0
        self.at_peak: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self.psutil.Process()
        pss = rss = 0
        rows = []
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
                name = " ".join(p.cmdline()[:2])[-60:] or p.name()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, OSError):
                continue
            pss += info.pss
            rss += info.rss
            rows.append((name, info.pss))
        self.peak_rss = max(self.peak_rss, rss)
        if pss > self.peak_pss:
            self.peak_pss, self.at_peak = pss, sorted(rows, key=lambda r: -r[1])[:8]

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def timed_run(base: FederationConfig, run_dir: Path, engine: str, **overrides) -> dict:
    """`bench_federation.run_one` with the engine's cohort size and cohort-engine; metrics keyed by round."""
    cohort_size, cohort_engine = ENGINES[engine]
    r = run_one(base, run_dir, cohort_size, cohort_engine=cohort_engine, **overrides)
    r["metrics"] = {m["round"]: m for m in r["metrics"]}
    return r


# ---------------------------------------------------------------------------------------------- side by side

def bench_engines(base: FederationConfig, root: Path, sizes: list[int], rounds: int = 2,
                  engines: tuple[str, ...] = ("vectorized", "loop", "stock"), passes: int = 1) -> list[dict]:
    """Each engine at each size, ``passes`` times: pass k runs the engines in the given order when k is even
    and in reverse when it is odd (A B C, C B A, ...), so that a drift of the machine's pace over the run
    weighs on every engine alike once the passes are averaged (`combine`)."""
    rows = []
    for n in sizes:
        for k in range(passes):
            for engine in (engines if k % 2 == 0 else engines[::-1]):
                rows.append(_engine_row(base, root, engine, n, rounds, k))
    return rows


def _engine_row(base: FederationConfig, root: Path, engine: str, n: int, rounds: int, pass_: int) -> dict:
    print(f"  {engine:10s} N={n:5d} pass {pass_ + 1} (load {loadavg():.2f}) ...", flush=True)
    r = timed_run(base, root / "engines" / f"{engine}-{n}-{pass_}", engine, max_clients=n, num_rounds=rounds,
                  eval_every=10_000, clients_per_round=1.0)
    m = r["metrics"]
    # round 1 includes each worker's warm-up; of the later rounds the median (a sub-second round is moved by
    # whatever else the machine does in that second)
    later = [m[j]["train_s"] for j in range(2, rounds + 1)]
    train_s = float(np.median(later))
    users = m[2].get("clients_ok") or n
    row = {"engine": engine, "users": n, "pass": pass_, "nodes": r["summary"]["cohorts"]["nodes"],
           "train_s_rounds": later, "train_s": train_s, "train_s_round1": m[1]["train_s"],
           "updates_per_s": users / train_s, "clients_ok": users, "call_wall_s": r["call_wall_s"],
           "load1_before": r["load1_before"], "test_gauc": r["summary"]["final"]["test"].get("gauc")}
    print(f"    rounds 2-{rounds}: {train_s:.2f} s -> {row['updates_per_s']:.1f} updates/s "
          f"(round 1 {row['train_s_round1']:.2f} s, call {row['call_wall_s']:.1f} s, "
          f"test GAUC {row['test_gauc']:.4f})", flush=True)
    print(f"    each round after the first: {' '.join(f'{t:.2f}' for t in later)} s "
          f"(mean {np.mean(later):.3f} s)", flush=True)
    return row


def combine(rows: list[dict]) -> list[dict]:
    """One row per (engine, users): the passes' round times averaged (updates/s from that mean), each pass's
    kept beside it (``train_s_passes``)."""
    out = []
    for key in sorted({(r["engine"], r["users"]) for r in rows}, key=lambda k: (k[1], k[0])):
        runs = [r for r in rows if (r["engine"], r["users"]) == key]
        train_s = float(np.mean([r["train_s"] for r in runs]))
        out.append({**runs[0], "passes": len(runs), "train_s": train_s,
                    "updates_per_s": runs[0]["clients_ok"] / train_s,
                    "train_s_passes": [r["train_s"] for r in runs],
                    "train_s_round1": float(np.mean([r["train_s_round1"] for r in runs])),
                    "call_wall_s": float(np.mean([r["call_wall_s"] for r in runs])),
                    "load1_before": float(np.mean([r["load1_before"] for r in runs]))})
    return out


def print_engines(rows: list[dict]) -> list[dict]:
    """The table and the ratios, from `combine`d rows (each engine's passes averaged)."""
    passes = max(r.get("passes", 1) for r in rows)
    print()
    print("Client updates per second (fedpa, 1 local epoch, batch 64; median train_s of the rounds after the first"
          + (f"; the mean of {passes} passes, engines in alternating order)" if passes > 1 else ")"))
    hdr = (f"{'users':>6} {'engine':>10} {'nodes':>5} {'round s':>8} {'updates/s':>10} {'round1 s':>8} {'call s':>7} "
           f"{'load':>5}")
    print(hdr)
    print("-" * len(hdr))
    ratios = []
    for n in sorted({r["users"] for r in rows}):
        pair = {r["engine"]: r for r in rows if r["users"] == n}
        for e in [e for e in ("stock", "loop", "vectorized") if e in pair]:
            r = pair[e]
            print(f"{n:>6} {e:>10} {r['nodes']:>5} {r['train_s']:>8.2f} {r['updates_per_s']:>10.1f} "
                  f"{r['train_s_round1']:>8.2f} {r['call_wall_s']:>7.1f} {r['load1_before']:>5.2f}")
        if len(pair) < len(ENGINES):
            continue   # ratios only for engines run side by side
        ratios.append({"users": n,
                       "vectorized_over_stock": pair["vectorized"]["updates_per_s"] / pair["stock"]["updates_per_s"],
                       "vectorized_over_loop": pair["vectorized"]["updates_per_s"] / pair["loop"]["updates_per_s"],
                       "loop_over_stock": pair["loop"]["updates_per_s"] / pair["stock"]["updates_per_s"]})
    if not ratios:
        return ratios
    print()
    print(f"{'users':>6} {'vectorized/stock':>17} {'vectorized/loop':>16} {'loop/stock':>11}")
    for q in ratios:
        print(f"{q['users']:>6} {q['vectorized_over_stock']:>16.1f}x {q['vectorized_over_loop']:>15.1f}x "
              f"{q['loop_over_stock']:>10.1f}x")
    return ratios


def plot_engines(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e, style in (("stock", "o-"), ("loop", "s-"), ("vectorized", "^-")):
        pts = sorted((r["users"], r["train_s"]) for r in rows if r["engine"] == e)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=e)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("users per round")
    ax.set_ylabel("round time (s, training)")
    ax.set_title("fedpa round time by simulation engine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------- RecFlow size

def prepare_recflow(root: Path, days: int) -> tuple[Path, Path, dict]:
    from fedpa.foundation.config import FoundationConfig
    from fedpa.foundation.model import FoundationModel
    from fedpa.recdata.store import Dataset
    from fedpa.recdata.synth import generate

    data = root / f"recflow-{days}d"
    times = {}
    if not (data / "manifest.json").exists():
        t0 = time.perf_counter()
        generate("recflow", data, seed=0, days=days)
        times["generate_s"] = time.perf_counter() - t0
    found = root / "recflow-foundation-init"
    if not (found / "config.json").exists():
        ds = Dataset(data)
        FoundationModel(FoundationConfig.from_dataset_vocab(ds.vocab, ds.user_features)).save_pretrained(found)
    return data, found, times


def fedpa_config(as_released: bool, **settings) -> FederationConfig:
    """`--algorithm fedpa` as `fedpa simulate` runs it (its recipe below every key given here), or with
    ``as_released`` FedPA as released (no item-side tables: the configuration of the figures before 2026-12-07)."""
    cfg = FederationConfig(algorithm="fedpa", **settings)
    return cfg if as_released else with_recipe(cfg, {k.replace("_", "-") for k in settings})


def bench_full_round(root: Path, days: int, as_released: bool = False) -> dict:
    from fedpa.client.runtime import ensure_feature_cache

    data, found, times = prepare_recflow(root, days)
    cfg = fedpa_config(as_released, data_dir=str(data), foundation=str(found), run_dir=str(root / "recflow-round"),
                       num_rounds=1, clients_per_round=1.0, open_active_fraction=0.0, open_rest_fraction=0.0,
                       eval_every=10_000, feature_cache=str(root / "feature_cache"), round_timeout=3600.0)
    t0 = time.perf_counter()
    # a one-off artifact, built in a child process so that this (the server's) process stays as lean as
    # a run that finds the cache already there
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(ensure_feature_cache, (cfg,))
    cache = ensure_feature_cache(cfg)
    times["feature_cache_s"] = time.perf_counter() - t0
    print(f"  feature cache: {times['feature_cache_s']:.1f} s for {len(cache.users):,} users", flush=True)
    load = loadavg()
    with PeakMemory() as mem:
        r = timed_run(cfg, Path(cfg.run_dir), "vectorized")
    m = r["metrics"]
    out = {"days": days, "users": int(len(cache.users)), "clients_ok": m[1].get("clients_ok"),
           "selected": m[1].get("selected"), "train_s": m[1]["train_s"],
           "evaluations_s": m[1]["wall_s"] - m[1]["train_s"], "call_wall_s": r["call_wall_s"],
           "peak_pss_gib": mem.peak_pss / 2 ** 30, "peak_rss_sum_gib": mem.peak_rss / 2 ** 30,
           "processes_at_peak_gib": [(n, b / 2 ** 30) for n, b in mem.at_peak], "load1_before": load,
           "nodes": r["summary"]["cohorts"]["nodes"],
           "train_rows": int(sum(len(cache.user(u)[0]) for u in cache.users[:2000])) * len(cache.users) / 2000,
           **times}
    print(f"  one round over {out['users']:,} users: training {out['train_s']:.1f} s, evaluations (round 0 + 1) "
          f"{out['evaluations_s']:.1f} s, whole call {out['call_wall_s']:.1f} s; peak memory of the process tree "
          f"{out['peak_pss_gib']:.2f} GiB (PSS; RSS sum {out['peak_rss_sum_gib']:.2f} GiB)", flush=True)
    for name, gib in out["processes_at_peak_gib"]:
        print(f"      {gib:6.2f} GiB  {name}")
    return out


# ---------------------------------------------------------------------------------------------- personal state

def personal_state_bytes(base: FederationConfig, root: Path) -> dict:
    from fedpa.client.personal_store import PersonalStore
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.personalization import PersonalModel, get_algorithm

    pm = PersonalModel(load_foundation(base.foundation), get_algorithm("fedpa"), r=base.rank, lora_alpha=base.rank)
    private = pm.get_private()
    raw = sum(v.nbytes for v in private.values())
    from flwr.app import RecordDict

    try:
        from fedpa.client.node_state import NodePrivateStates
    except ImportError:   # fedpa from before 2026-12-07 (through PYTHONPATH): one record per user
        from fedpa.common.records import arrays_to_record

        record = arrays_to_record(private)
        in_state = sum(len(record[k].data) for k in record.keys())
    else:
        context_state = RecordDict()   # a node keeps its users' states packed: per user, a hundredth of 100 users'
        states = NodePrivateStates(context_state)
        for uid in range(100):
            states.put(uid, private)
        states.flush()
        in_state = sum(len(r[k].data) for r in context_state.values() for k in r.keys()) / 100
    where = Path(tempfile.mkdtemp(prefix="store-", dir=root))
    PersonalStore(where, os.urandom(32)).save(0, private, {"algorithm": "fedpa", "round": 1})
    on_disk = sum(p.stat().st_size for p in where.rglob("*") if p.is_file())
    out = {"tensors": len(private), "raw_bytes": raw, "context_state_bytes": in_state, "store_file_bytes": on_disk}
    print(f"  personal state per user (fedpa, rank {base.rank}): {len(private)} tensors, {raw:,} B of float32, "
          f"{in_state:,.0f} B in context.state, {on_disk:,} B encrypted on disk", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/small")
    ap.add_argument("--foundation", default="runs/demo/foundation")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds per engine and size (>= 2): updates/s from the median round after the first")
    ap.add_argument("--skip-engines", action="store_true", help="only the RecFlow-size round")
    ap.add_argument("--engines", nargs="+", choices=list(ENGINES), default=["vectorized", "loop", "stock"],
                    help="the engines to run (one engine: its rounds, e.g. code before and after a change)")
    ap.add_argument("--passes", type=int, default=1,
                    help="run the engines this many times, in alternating order (A B C, C B A, ...), and average: "
                         "the machine's pace drifts within minutes, and a ratio's engines run minutes apart")
    ap.add_argument("--full-round", action="store_true", help="also run one round over the recflow preset")
    ap.add_argument("--days", type=int, default=3, help="days of the recflow preset (the first one trains)")
    ap.add_argument("--as-released", action="store_true",
                    help="FedPA as released, without the recipe's item-side tables (the figures before 2026-12-07)")
    ap.add_argument("--root", default="/tmp/bench_scale")
    ap.add_argument("--out", default="/tmp/bench_scale.json")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}")
    base = fedpa_config(args.as_released, data_dir=args.data, foundation=args.foundation,
                        feature_cache=str(root / "feature_cache"), round_timeout=3600.0)
    print("configuration: " + ("FedPA as released (--as-released)" if args.as_released else
                               "--algorithm fedpa with its recipe, as `fedpa simulate` runs it"))
    result: dict = {"sizes": args.sizes}
    result["personal_state"] = personal_state_bytes(base, root)
    if not args.skip_engines:
        if args.rounds < 2:
            ap.error("--rounds must be at least 2 (the first round includes each worker's warm-up)")
        if args.passes < 1:
            ap.error("--passes must be at least 1")
        rows = bench_engines(base, root, args.sizes, args.rounds, tuple(args.engines), args.passes)
        result["engines"] = rows
        result["combined"] = combine(rows)
        result["ratios"] = print_engines(result["combined"])
        png = plot_engines(result["combined"], root / "scaling.png")
        print(f"scaling curve: {png}")
    if args.full_round:
        result["full_round"] = bench_full_round(root, args.days, args.as_released)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
