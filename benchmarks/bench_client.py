"""The client on a device: peak memory and time of the ClientApp's training round for a median user.

Each case runs in its own fresh interpreter pinned to one thread (as a SuperNode starts one
`flwr-clientapp` process per message): it imports the client, then calls `client.app.train` — the
real ClientApp handler — with a real Flower Message for the median private user (by
exposures), twice (the second round sees the first round's private state), with the personal store
on (encrypted save every round) and the feature cache off (a device encodes its own rows).
Reported: wall time of the imports, of building the runtime (dataset, partition, foundation,
adapters), of each round, and the process's peak RSS.

    .venv/bin/python benchmarks/bench_client.py [--data data/small] [--foundation runs/demo/foundation]
        [--algorithms fedpa,fedavg-lora,local]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(data: str, foundation: str, algorithm: str, work: str) -> dict:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpa.client.app import train  # the ClientApp's own handler
    from fedpa.client.personal_store import generate_key_file
    from fedpa.client.runtime import get_runtime
    from fedpa.common.config import FederationConfig
    from fedpa.common.records import arrays_to_record as to_record
    from fedpa.common.records import message_bytes
    from fedpa.recdata.partition import user_activity

    t_import = time.perf_counter() - t0
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # Message() outside a runtime
    key = generate_key_file(Path(work) / "store.key")
    cfg = FederationConfig(data_dir=data, foundation=foundation, algorithm=algorithm, feature_cache="none",
                           personal_store=str(Path(work) / "store"), personal_store_key_file=str(key))
    t1 = time.perf_counter()
    rt = get_runtime(cfg)
    t_runtime = time.perf_counter() - t1
    # the median private user by exposures over all days
    _, activity = user_activity(rt.dataset)
    counts = sorted((int(activity[rt.partition.user_of(c)]), c) for c in range(rt.num_clients))
    rows, client = counts[len(counts) // 2]
    state = rt.model.get_shared()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config={})
    rounds = []
    for r in (1, 2):
        content = RecordDict({"run": ConfigRecord(cfg.to_run_config()),
                              "round": ConfigRecord({"round": r, "clients": [client], "final": False,
                                                     "cohort": 1, "run-id": "bench"})})
        if state:
            content["arrays"] = to_record(state)
        msg = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1, group_id=str(r))
        t = time.perf_counter()
        reply = train(msg, context)
        rounds.append(time.perf_counter() - t)
        up = message_bytes(reply)
    data_rows = len(rt.user(client).train)
    with open("/proc/self/status") as f:   # VmHWM, not ru_maxrss: Linux carries that across exec from the parent
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    return {"algorithm": algorithm, "user_train_rows": data_rows, "import_s": t_import, "runtime_s": t_runtime,
            "round1_s": rounds[0], "round2_s": rounds[1], "reply_bytes": up, "peak_rss_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/small")
    ap.add_argument("--foundation", default="runs/demo/foundation")
    ap.add_argument("--algorithms", default="fedpa,fedavg-lora,local")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    print(f"{'algorithm':<12} {'rows':>5} {'import s':>9} {'runtime s':>10} {'round 1 s':>10} {'round 2 s':>10} "
          f"{'reply KB':>9} {'peak RSS MiB':>13}")
    for alg in [x for x in a.algorithms.split(",") if x]:
        with tempfile.TemporaryDirectory() as work:
            p = subprocess.run([sys.executable, __file__, "--child", str(Path(a.data).resolve()),
                                str(Path(a.foundation).resolve()), alg, work], capture_output=True, text=True,
                               cwd=ROOT, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                              "FLWR_TELEMETRY_ENABLED": "0", "PATH": "/usr/bin:/bin"},
                               check=False)
        if p.returncode != 0:
            sys.exit(f"{alg} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{alg:<12} {r['user_train_rows']:>5} {r['import_s']:>9.2f} {r['runtime_s']:>10.2f} "
              f"{r['round1_s']:>10.3f} {r['round2_s']:>10.3f} {r['reply_bytes'] / 1024:>9.1f} "
              f"{r['peak_rss_mib']:>13.0f}")


if __name__ == "__main__":
    main()
