"""A device client: one user's ClientApp reading its own device directory, against the same client reading the
whole dataset (as every node did before device data), side by side in one run.

For the median private user (by exposures) of DATA, a device directory is provisioned (`fedpa device
provision`); then each case runs in its own fresh interpreter pinned to one thread (as a SuperNode starts one
`flwr-clientapp` per message): imports, building the runtime, two training rounds through the ClientApp's own
`train` handler (personal store on), 30 events appended to the device's log and a third round, then (device
only) recommending 120 candidates with the torch model and with the exported ONNX model. Reported: the times,
the reply size and the process's peak RSS after the rounds and after the ONNX export (which builds the full
model; a device's memory alone: `bench_device_memory.py`).

    .venv/bin/python benchmarks/bench_device.py [--data data/small] [--foundation runs/demo/foundation]
        [--algorithm fedpa]

With ``--deploy N``: a real deployment instead (`fedpa deploy`'s sequence on 127.0.0.1: TLS, node
authentication, SecAgg+), N one-user phones, ``--rounds`` rounds (default 3), once per ``--modes`` entry
(default ``flower,warm``: Flower's own polls and per-message ClientApp processes, then what `fedpa deploy`
runs); prints each round's stages (train messages, the SecAgg+ phases, the evaluation requests) from the run's
metrics, the mean round before the last (the last adds the run's final evaluation) and the warm executors'
memory.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries it across exec, so a
    child started by a large parent reports the parent's size (this benchmark's earlier figures, 790 MiB, were)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def child(mode: str, data: str, foundation: str, algorithm: str, work: str, client: int) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpa.client.app import train  # the ClientApp's own handler
    from fedpa.client.device_data import DeviceData
    from fedpa.client.event_log import LOG_FILE, EventLog
    from fedpa.client.personal_store import PersonalStore, generate_key_file
    from fedpa.client.runtime import get_runtime
    from fedpa.common.config import FederationConfig
    from fedpa.common.records import arrays_to_record as to_record
    from fedpa.common.records import message_bytes
    from fedpa.foundation.checkpoint import artifact_digest

    t_import = time.perf_counter() - t0
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # Message() outside a runtime
    key = generate_key_file(Path(work) / "store.key")
    device = Path(work) / "device"
    cfg = FederationConfig(data_dir=data, foundation=foundation, algorithm=algorithm, feature_cache="none")
    node = {"personal-store": str(Path(work) / "store"), "personal-store-key-file": str(key)}
    run = {**cfg.to_run_config(), "foundation-digest": artifact_digest(foundation)}
    if mode == "device":
        node["device-data"] = str(device)
        run.update({"data-dir": "", "foundation": "", "nodes-hold-data": True})
    else:
        node.update({"partition-id": 0, "num-partitions": 1})
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    state = dict(np.load(Path(work) / "state.npz"))   # the server's initial state, made by the parent as a server
    rounds, t_runtime = [], 0.0
    for r in (1, 2, 3):
        if r == 3:   # events arrive between rounds (the dataset mode has no log: it cannot take them)
            if mode == "device":
                with EventLog(device / LOG_FILE, user_id=DeviceData.open(device).clients[client]) as log:
                    rng = np.random.default_rng(0)
                    for i in range(30):
                        log.impression(int(rng.integers(0, 1000)), effective_view=int(i % 3 == 0))
        content = RecordDict({"run": ConfigRecord(run),
                              "round": ConfigRecord({"round": r, "clients": [client], "final": False,
                                                     "cohort": 1, "run-id": "bench"})})
        content["arrays"] = to_record(state)
        msg = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1, group_id=str(r))
        t = time.perf_counter()
        reply = train(msg, context)
        rounds.append(time.perf_counter() - t)
        if r == 1:
            from fedpa.client.app import _config

            t1 = time.perf_counter()
            rt = get_runtime(_config(msg, context))
            t_runtime = time.perf_counter() - t1   # cached by the first round: ~0 here, the build is in round 1
        up = message_bytes(reply)
    out = {"mode": mode, "import_s": t_import, "runtime_s": t_runtime, "rounds_s": rounds, "reply_bytes": up,
           "train_rows": len(rt.user(client).train),
           "rounds_rss_mib": peak_rss_mib()}
    if mode == "device":
        from fedpa.client.on_device import DeviceRecommender

        rec = DeviceRecommender(device, PersonalStore.from_key_file(node["personal-store"], key))
        cands = np.random.default_rng(1).choice(len(rt.lookups.item_table), 120, replace=False)
        now = int(time.time() * 1000)
        rec.recommend(cands, 10, now)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            rec.recommend(cands, 10, now)
            times.append(time.perf_counter() - t)
        onnx = rec.export_onnx(Path(work) / "model.onnx", cands, now)
        torch_scores = rec.scores(cands, now)
        from fedpa.foundation.export import onnx_probabilities

        batch = rt.candidate_examples(rec.user_id, cands, now).batch()
        from fedpa.foundation.export import _session

        sess = _session(Path(work) / "model.onnx", threads=1)
        onnx_probabilities(Path(work) / "model.onnx", batch, session=sess)
        ot = []
        for _ in range(20):
            t = time.perf_counter()
            onnx_probabilities(Path(work) / "model.onnx", batch, session=sess)
            ot.append(time.perf_counter() - t)
        out.update({"recommend_torch_ms": 1000 * float(np.median(times)),
                    "onnx_score_ms": 1000 * float(np.median(ot)),
                    "onnx_bytes": (Path(work) / "model.onnx").stat().st_size,
                    "onnx_vs_torch": float(np.abs(onnx - torch_scores).max())})
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/small")
    ap.add_argument("--foundation", default="runs/demo/foundation")
    ap.add_argument("--algorithm", default="fedpa")
    ap.add_argument("--deploy", type=int, default=0, help="N phones in a real loopback deployment instead")
    ap.add_argument("--rounds", type=int, default=3, help="with --deploy: federated rounds")
    ap.add_argument("--superlink-db", choices=("memory", "file"), default="memory",
                    help="with --deploy: the SuperLink's state in memory (fedpa deploy's default) or an SQLite file")
    ap.add_argument("--modes", default="flower,warm",
                    help="with --deploy: comma-separated, run side by side: 'flower' (Flower's own polls and a fresh "
                         "flwr-clientapp per message), 'poll' (short polls only), 'warm' (short polls and a warm "
                         "executor per node: what `fedpa deploy` runs)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.deploy:
        deployment(a)
        return
    if a.child:
        mode, data, foundation, alg, work, client = a.child
        print(json.dumps(child(mode, data, foundation, alg, work, int(client))))
        return
    import numpy as np

    from fedpa.client.device_data import provision
    from fedpa.client.runtime import partition_config
    from fedpa.common.config import FederationConfig
    from fedpa.common.models import build_personal_model
    from fedpa.recdata.partition import make_partition, user_activity
    from fedpa.recdata.store import Dataset

    data, foundation = str(Path(a.data).resolve()), str(Path(a.foundation).resolve())
    cfg = FederationConfig(data_dir=data, foundation=foundation, algorithm=a.algorithm)
    ds = Dataset(data)
    part = make_partition(ds, partition_config(cfg))
    _, activity = user_activity(ds)
    counts = sorted((int(activity[part.user_of(c)]), c) for c in range(part.num_clients))
    client = counts[len(counts) // 2][1]
    rows = []
    for mode in ("dataset", "device"):
        with tempfile.TemporaryDirectory() as work:
            t = time.perf_counter()
            dev = provision(cfg, [client], Path(work) / "device")
            np.savez(Path(work) / "state.npz", **build_personal_model(cfg).get_shared())
            size = sum(f.stat().st_size for f in dev.path.rglob("*") if f.is_file())
            t_prov = time.perf_counter() - t
            p = subprocess.run([sys.executable, __file__, "--child", mode, data, foundation, a.algorithm, work,
                                str(client)], capture_output=True, text=True, cwd=ROOT, check=False,
                               env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
                                    "PATH": "/usr/bin:/bin"})
        if p.returncode != 0:
            sys.exit(f"{mode} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(r)
    print(f"{a.algorithm} on {a.data}, client {client} (median user); device directory {size / 2**20:.1f} MiB, "
          f"provisioned in {t_prov:.1f} s")
    print(f"{'node reads':<10} {'import s':>9} {'round 1 s':>10} {'round 2 s':>10} {'round 3 s':>10} {'rows':>6} "
          f"{'reply KB':>9} {'rounds: peak RSS MiB':>21} {'then with ONNX export':>22}")
    for r in rows:
        print(f"{r['mode']:<10} {r['import_s']:>9.2f} {r['rounds_s'][0]:>10.2f} {r['rounds_s'][1]:>10.3f} "
              f"{r['rounds_s'][2]:>10.3f} {r['train_rows']:>6} {r['reply_bytes'] / 1024:>9.1f} "
              f"{r['rounds_rss_mib']:>21.0f} {r['peak_rss_mib'] if r['mode'] == 'device' else float('nan'):>22.0f}")
    d = rows[1]
    print(f"recommend 120 candidates: torch {d['recommend_torch_ms']:.1f} ms (median of 20, incl. features), "
          f"ONNX scoring {d['onnx_score_ms']:.2f} ms ({d['onnx_bytes'] / 2**20:.1f} MiB model, "
          f"max |Δp| vs torch {d['onnx_vs_torch']:.1e})")
    print(f"peak RSS of the rounds, device/dataset: {rows[1]['rounds_rss_mib'] / rows[0]['rounds_rss_mib']:.2f} "
          "(a device's process alone: benchmarks/bench_device_memory.py)")


MODES = {"flower": {"poll_s": None, "warm": False}, "poll": {"poll_s": 0.1, "warm": False},
         "warm": {"poll_s": 0.1, "warm": True}}
"""Flower's own polls and a fresh flwr-clientapp per message; short loopback polls only; short polls and a warm
executor per node (what `fedpa deploy` runs). ``--superlink-db file`` puts each mode's SuperLink state in an
SQLite file instead of memory."""


def deployment(a: argparse.Namespace) -> None:
    from fedpa.simulations.deploy import deploy

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {sorted(MODES)}")
    results = {}
    for mode in modes:
        with tempfile.TemporaryDirectory() as work:
            rc = {"data-dir": str(Path(a.data).resolve()), "foundation": str(Path(a.foundation).resolve()),
                  "run-dir": str(Path(work) / "run"), "algorithm": a.algorithm, "num-rounds": a.rounds,
                  "max-clients": a.deploy, "secagg": True, "feature-cache": "none", "round-timeout": 120.0}
            t = time.perf_counter()
            db = str(Path(work) / "superlink.db") if a.superlink_db == "file" else None
            result = deploy(workdir=Path(work) / "deploy", run_config=rc, nodes=a.deploy, superlink_db=db,
                            **MODES[mode])
            total = time.perf_counter() - t
            rows = [json.loads(line) for line in (Path(work) / "run" / "metrics.jsonl").read_text().splitlines()]
            rss = executor_rss(Path(work) / "deploy" / "logs")
        results[mode] = (total, result["summary"]["test"].get("auc", 0), rows, rss)
        print(f"[{mode}] done in {total:.0f} s", flush=True)
    print(f"{a.deploy} one-user SuperNodes, TLS + node auth + SecAgg+, {a.algorithm} on {a.data}, {a.rounds} rounds, "
          f"SuperLink state in {a.superlink_db}; seconds per stage from metrics.jsonl (SecAgg+: the round's secure "
          f"sum, with the previous round's evaluation sum in the same messages; evaluate: the evaluation requests, "
          f"and in the last round the run's final evaluation with its secure sum and attack)")
    print(f"{'mode':>7} {'round':>5} {'train s':>8} {'SecAgg+ s':>10} {'evaluate s':>11} {'round s':>8}")
    for mode, (total, auc, rows, rss) in results.items():
        last = 0.0
        for r in rows[1:]:
            st = r.get("stage_s", {})
            print(f"{mode:>7} {r['round']:>5} {st.get('train', 0):>8.1f} {st.get('secagg', 0):>10.1f} "
                  f"{st.get('evaluate', 0):>11.1f} {r['wall_s'] - last:>8.1f}")
            last = r["wall_s"]
        steady = [b["wall_s"] - a_["wall_s"] for a_, b in zip(rows[1:-1], rows[2:-1])] + (
            [rows[1]["wall_s"]] if len(rows) > 2 else [])
        if steady:
            print(f"{mode:>7} rounds before the last: mean {sum(steady) / len(steady):.1f} s, max {max(steady):.1f} s; "
                  f"the last (with the final evaluation): {rows[-1]['wall_s'] - rows[-2]['wall_s']:.1f} s")
        print(f"{mode:>7} end to end {total:.0f} s (start-up included), test AUC {auc:.4f}"
              + (f"; peak RSS: warm executor {rss[0]:.0f} MiB, a task {rss[1]:.0f} MiB of which at most "
                 f"{rss[2]:.0f} MiB its own" if rss[0] else ""))
    if "flower" in results and "warm" in results:
        per_round = {m: results[m][2][-1]["wall_s"] / (len(results[m][2]) - 1) for m in ("flower", "warm")}
        print(f"mean round: flower {per_round['flower']:.1f} s, warm {per_round['warm']:.1f} s "
              f"({per_round['flower'] / per_round['warm']:.1f}x)")


def executor_rss(logs: Path) -> tuple[float, float, float]:
    """Peak RSS (MiB) of the warm executors (the largest), and of their tasks: the largest peak RSS of a task
    (which counts the executor's pages it shares) and the most memory a task held of its own (private pages);
    zeros when no executor ran."""
    text = "".join(f.read_text() for f in logs.glob("executor-*.log"))
    own = [float(m) for m in re.findall(r"stopped after \d+ task\(s\); peak RSS (\d+) MiB", text)]
    tasks = [(float(a), float(b)) for a, b in re.findall(r"peak RSS (\d+) MiB, (\d+) MiB its own", text)]
    return (max(own, default=0.0), max((a for a, _ in tasks), default=0.0), max((b for _, b in tasks), default=0.0))

if __name__ == "__main__":
    main()
