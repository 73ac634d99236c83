"""A device process's resident memory: the ClientApp's train and evaluate handlers on a one-user device directory,
in a fresh interpreter per case, side by side in one run.

    .venv/bin/python benchmarks/bench_device_memory.py [--data data/small] [--foundation runs/demo/foundation]
        [--rounds 3] [--algorithm fedpa]

For the median private user of DATA a device directory is provisioned (`fedpa device provision`, which compiles
the run's model: `recmodels.compiled`). Each case then runs, in its own process pinned to one thread, what a
device's ClientApp process does: the imports, ``--rounds`` rounds of a train message (personal store on) and an
evaluate message through the ClientApp's own handlers (the server's state comes from this parent process, as
from a server); then, in a process of its own as the device's app would be, recommending 120 candidates. Cases:

- ``full model``: the device without its compiled copy (as before it had one): peft's model over transformers';
- ``compiled``: the device's compiled model (torch alone);

both as this machine's development environment has them (``as installed here``), and the compiled model as a
device installs fedpa (``device install``: without pandas, which nothing a device runs needs but pyarrow imports
whenever it is installed, and with glibc's mmap threshold fixed at 128 KiB, as `fedpa deploy` starts device
processes, so that freed arrays leave the process; the full model cannot run with pandas hidden: transformers
imports it when its metadata is installed). Printed: resident memory after the imports, after each round and
at its peak (VmHWM), the time of a round (train and evaluate), the recommending process's peak and time (its
start included), and the packages that took the most memory while importing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("pandas",)   # what a device install lacks that pyarrow would import (the `analysis` extra's)


def _status() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def _import_meter():
    """Resident memory each top-level package added while it was imported (its own, not its imports')."""
    import importlib.abc
    from collections import Counter

    own: Counter = Counter()
    stack: list[list] = []

    class Meter(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is None:
                    continue
                loader = spec.loader
                if loader is not None and hasattr(loader, "exec_module"):
                    run = loader.exec_module

                    def exec_module(module, run=run, top=name.split(".")[0]):
                        stack.append([_status()["VmRSS"], 0.0])
                        try:
                            run(module)
                        finally:
                            start, inner = stack.pop()
                            grew = _status()["VmRSS"] - start
                            own[top] += grew - inner
                            if stack:
                                stack[-1][1] += grew
                    try:
                        loader.exec_module = exec_module
                    except (AttributeError, TypeError):
                        pass
                return spec
            return None

    sys.meta_path.insert(0, Meter())
    return own


def child(case: dict) -> dict:
    import importlib.abc

    if case["hide"]:
        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in HIDDEN:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, Absent())
    own = _import_meter()
    t0 = time.perf_counter()
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpa.client.app import evaluate, train  # the ClientApp's own handlers
    from fedpa.client.on_device import DeviceRecommender
    from fedpa.client.personal_store import PersonalStore
    from fedpa.common.records import arrays_to_record

    t_import = time.perf_counter() - t0
    after_import = _status()["VmRSS"]
    if case["what"] == "recommend":   # the device's app: its own process, as an app beside the ClientApp runs
        t = time.perf_counter()
        rec = DeviceRecommender(case["device"], PersonalStore.from_key_file(case["store"], case["key"]))
        top = rec.recommend(np.arange(1, 121), 10, int(time.time() * 1000))
        return {"recommend_s": time.perf_counter() - t, "top": top[0][0], "peak": _status()["VmHWM"]}
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1   # Message() outside a runtime
    state = dict(np.load(case["state"]))
    node = {"device-data": case["device"], "personal-store": case["store"], "personal-store-key-file": case["key"]}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    rounds = []
    for r in range(1, case["rounds"] + 1):
        t = time.perf_counter()
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            content = RecordDict({"run": ConfigRecord(case["run"]), "arrays": arrays_to_record(state),
                                  "round": ConfigRecord({"round": r, "clients": [case["client"]], "final": False,
                                                         "cohort": 1, "run-id": "bench"})})
            (train if kind == MessageType.TRAIN else evaluate)(
                Message(content=content, message_type=kind, dst_node_id=1, group_id=str(r)), context)
        rounds.append({"s": time.perf_counter() - t, "rss": _status()["VmRSS"]})
    heavy = ("peft", "transformers", "torch._dynamo", "sympy", "scipy", "pandas")
    return {"import_s": t_import, "after_import": after_import, "rounds": rounds, "peak": _status()["VmHWM"],
            "loaded": sorted(m for m in heavy if m in sys.modules),
            "imports": sorted(own.items(), key=lambda kv: -kv[1])[:8]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/small")
    ap.add_argument("--foundation", default="runs/demo/foundation")
    ap.add_argument("--algorithm", default="fedpa")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(Path(a.child).read_text()))))
        return
    import numpy as np

    from fedpa.client.device_data import COMPILED_DIR, provision
    from fedpa.client.personal_store import generate_key_file
    from fedpa.client.runtime import partition_config
    from fedpa.common.config import FederationConfig, with_recipe
    from fedpa.common.models import build_personal_model
    from fedpa.recdata.partition import make_partition, user_activity
    from fedpa.recdata.store import Dataset
    from fedpa.server.federation import run_message_config

    data, foundation = str(Path(a.data).resolve()), str(Path(a.foundation).resolve())
    cfg = with_recipe(FederationConfig(data_dir=data, foundation=foundation, algorithm=a.algorithm,
                                       feature_cache="none", nodes_hold_data=True), given=set())
    ds = Dataset(data)
    part = make_partition(ds, partition_config(cfg))
    _, activity = user_activity(ds)
    counts = sorted((int(activity[part.user_of(c)]), c) for c in range(part.num_clients))
    client = counts[len(counts) // 2][1]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "PATH": "/usr/bin:/bin"}
    cases = [("full model", "as installed here", True, False), ("compiled", "as installed here", False, False),
             ("compiled", "device install", False, True)]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        t = time.perf_counter()
        dev = provision(cfg, [client], work / "device")
        t_prov = time.perf_counter() - t
        np.savez(work / "state.npz", **build_personal_model(cfg).get_shared())   # the server's initial state
        run = run_message_config(cfg)
        for model, install, full, hide in cases:
            device = work / f"device-{len(rows)}"
            shutil.copytree(dev.path, device)
            if full:
                shutil.rmtree(device / COMPILED_DIR)
            case = {"device": str(device), "client": client, "run": run, "state": str(work / "state.npz"),
                    "store": str(work / f"store-{len(rows)}"), "key": str(generate_key_file(work / f"{len(rows)}.key")),
                    "rounds": a.rounds, "hide": hide}
            extra = {"MALLOC_MMAP_THRESHOLD_": "131072"} if install == "device install" else {}
            out = {}
            for what in ("rounds", "recommend"):
                (work / "case.json").write_text(json.dumps({**case, "what": what}))
                p = subprocess.run([sys.executable, __file__, "--child", str(work / "case.json")],
                                   capture_output=True, text=True, cwd=ROOT, check=False, env={**env, **extra})
                if p.returncode != 0:
                    sys.exit(f"{model} ({install}, {what}) failed:\n{p.stderr[-3000:]}")
                out[what] = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append((model, install, {**out["rounds"], "recommend": out["recommend"]}))
    print(f"{a.algorithm} on {a.data}, client {client} (median user); provisioned (compiled included) in "
          f"{t_prov:.1f} s; {a.rounds} rounds of train + evaluate, then recommending 120 candidates")
    head = " ".join(f"round {r + 1} MiB" for r in range(a.rounds))
    print(f"{'model':<11} {'install':<18} {'app MiB':>8} {head} {'peak MiB':>9} {'import s':>8} {'round s':>8} "
          f"{'recommend: peak MiB':>20} {'s':>6}  loaded")
    for model, install, r in rows:
        per = " ".join(f"{x['rss']:>12.0f}" for x in r["rounds"])
        rec = r["recommend"]
        print(f"{model:<11} {install:<18} {r['after_import']:>8.0f} {per} {r['peak']:>9.0f} {r['import_s']:>8.2f} "
              f"{r['rounds'][-1]['s']:>8.3f} {rec['peak']:>20.0f} {rec['recommend_s']:>6.2f}  "
              f"{','.join(r['loaded']) or '-'}")
    for model, install, r in rows:
        print(f"imports of {model}, {install}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["imports"]))
    same = len({r["recommend"]["top"] for _, _, r in rows}) == 1
    print(f"peak ratio compiled/full (as installed here): {rows[1][2]['peak'] / rows[0][2]['peak']:.2f}; "
          f"the same top item recommended in every case: {same}")


if __name__ == "__main__":
    main()
