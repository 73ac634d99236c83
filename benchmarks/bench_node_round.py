"""One simulated node's whole training round, in this process: where a node's time goes beyond the engine.

    .venv/bin/python benchmarks/bench_node_round.py [--data data/small] [--foundation runs/demo/foundation]
        [--users 500] [--rounds 4] [--feature-cache DIR] [--profile] [--set KEY=VALUE ...]

`client.training.train` handles a train message for ``--users`` users, as a node of a simulation does (its
context kept from round to round, so rounds 2.. are returning users), one thread. Each round prints its
seconds, per training row and per user, split into what the cohort engine took
(`recmodels.cohort.CohortEngine.train`) and the rest of the node's round: reading and keeping each user's private
state in the node's context, the users' data and rows, the clipped sum of their contributions. With
``--profile`` the last round also runs under cProfile (the functions by own time and by cumulative time).

`bench_cohort_engine.py` measures the engine alone, `bench_scale.py` the whole federation (Flower, Ray, the
server); this one is between them. RecFlow-shaped users (about 25 rows each), where a user's fixed costs
matter most: `--data /tmp/bench_scale/recflow-3d --foundation /tmp/bench_scale/recflow-foundation-init
--feature-cache /tmp/bench_scale/feature_cache` (made by `bench_scale.py --full-round`).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/small")
    ap.add_argument("--foundation", default="runs/demo/foundation")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--feature-cache", default="",
                    help="root of the cached tower inputs (default: fedpa's own, ~/.cache/fedpa/features; none = off)")
    ap.add_argument("--profile", action="store_true", help="also profile the last round (cProfile)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a configuration key over the algorithm's recipe (repeatable)")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 starts every user fresh)")

    import torch
    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from fedpa.client import training
    from fedpa.client.app import _config
    from fedpa.client.runtime import get_runtime
    from fedpa.common.config import FederationConfig, with_recipe
    from fedpa.common.records import arrays_to_record
    from fedpa.recmodels.cohort import CohortEngine
    from fedpa.server.federation import run_message_config

    torch.set_num_threads(1)
    given = dict(kv.split("=", 1) for kv in args.set)
    with tempfile.TemporaryDirectory(prefix="bench_node_round_") as tmp:
        cfg = with_recipe(FederationConfig.from_run_config({
            "data-dir": args.data, "foundation": args.foundation, "run-dir": f"{tmp}/run",
            "max-clients": args.users, "feature-cache": args.feature_cache, "algorithm": "fedpa",
            # every user a client of this node (no open users held back for pre-training)
            "open-active-fraction": 0.0, "open-rest-fraction": 0.0, **given}), given=set(given))
        rt = get_runtime(cfg)
        clients = list(range(min(args.users, rt.num_clients)))
        shared = rt.model.get_shared()
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        rows = sum(len(rt.round_train(rt.user(c), 1)) for c in clients)

        engine_s = [0.0]
        original = CohortEngine.train

        def timed_train(self, *a, **kw):   # the engine's share of the round (it yields chunk by chunk)
            it = original(self, *a, **kw)
            while True:
                t = time.perf_counter()
                try:
                    chunk = next(it)
                except StopIteration:
                    engine_s[0] += time.perf_counter() - t
                    return
                engine_s[0] += time.perf_counter() - t
                yield chunk

        print(f"{len(clients)} users, {rows} training rows in round 1, 1 thread", flush=True)
        profiler = None
        CohortEngine.train = timed_train
        try:
            for r in range(1, args.rounds + 1):
                content = RecordDict({
                    "run": ConfigRecord(run_message_config(cfg)),
                    "round": ConfigRecord({"round": r, "clients": clients, "final": False, "cohort": len(clients),
                                           "run-id": "bench", "resumed": False}),
                    "arrays": arrays_to_record(shared)})
                meta = Metadata(run_id=1, message_id=f"m{r}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                                group_id=str(r), created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
                msg = Message(content=content, metadata=meta)
                if args.profile and r == args.rounds:
                    profiler = cProfile.Profile()
                    profiler.enable()
                engine_s[0] = 0.0
                t = time.perf_counter()
                reply = training.train(msg, context, _config(msg, context))
                dt = time.perf_counter() - t
                if profiler is not None:
                    profiler.disable()
                if reply.has_error() or "metrics" not in reply.content:
                    raise SystemExit(f"round {r}: the node's reply carries no metrics")
                print(f"round {r}: {dt:.3f} s  {dt / rows * 1e6:6.2f} us per training row  "
                      f"{dt / len(clients) * 1e3:.3f} ms per user  (engine {engine_s[0]:.3f} s, "
                      f"rest of the node {dt - engine_s[0]:.3f} s)", flush=True)
        finally:
            CohortEngine.train = original
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
