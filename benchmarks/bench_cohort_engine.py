"""The cohort engine alone (no Flower): one node's round for N users, per training row.

    .venv/bin/python benchmarks/bench_cohort_engine.py [--data data/small] [--foundation runs/demo/foundation]
        [--users 256] [--threads 1] [--repeats 3] [--set item-bias-update=adam ...]

`recmodels.cohort.CohortEngine` as a simulated node runs it, with `--algorithm fedpa`'s recipe, 1 epoch:

- *fresh round*: every user starts without private state (their first round: the logit offsets are
  calibrated on their rows before the first step);
- *returning round*: the same users with the private state the fresh round left;
- *evaluation*: scoring every user's validation and test rows with its personalized model.

Printed: the best of ``--repeats`` for each, and microseconds per training row. To compare two versions of
the code, run this once per version on the same machine, side by side (`PYTHONPATH` naming a copy of the
other version's package); the machine's other load moves single figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/small")
    ap.add_argument("--foundation", default="runs/demo/foundation")
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--feature-cache", default="",
                    help="root of the cached tower inputs (default: fedpa's own, ~/.cache/fedpa/features; none = off)")
    ap.add_argument("--algorithm", default="fedpa")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a configuration key over the algorithm's recipe (repeatable)")
    args = ap.parse_args()

    import tempfile

    import torch

    from fedpa.client.runtime import ClientRuntime
    from fedpa.common.config import FederationConfig, with_recipe
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_cohort_") as tmp:
        given = dict(kv.split("=", 1) for kv in args.set)
        cfg = with_recipe(FederationConfig.from_run_config({
            "data-dir": args.data, "foundation": args.foundation, "run-dir": f"{tmp}/run",
            "max-clients": args.users, "feature-cache": args.feature_cache, "algorithm": args.algorithm, **given}),
            given=set(given))
        rt = ClientRuntime(cfg)
        users = [rt.user(c) for c in range(min(args.users, rt.num_clients))]
        engine = CohortEngine(rt.model)
        shared = rt.model.get_shared()
        fresh = [CohortUser(u.train, u.profile, None, u.user_id) for u in users]
        rows = sum(len(u.train) for u in users)
        eval_rows = sum(len(u.val) + len(u.test) for u in users)

        def train(members):
            private = [None] * len(members)
            for chunk in engine.train(members, shared, rt.local):
                for k, i in enumerate(chunk.users):
                    private[int(i)] = chunk.private[k]
            return private

        train(fresh)  # warm-up: the first call pays for allocations and lazy imports
        best = {"fresh": float("inf"), "returning": float("inf"), "evaluation": float("inf")}
        for _ in range(args.repeats):
            t = time.perf_counter()
            private = train(fresh)
            best["fresh"] = min(best["fresh"], time.perf_counter() - t)
            returning = [CohortUser(u.train, u.profile, p, u.user_id) for u, p in zip(users, private)]
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            train(returning)
            best["returning"] = min(best["returning"], time.perf_counter() - t)
            best["returning_faults"] = min(best.get("returning_faults", float("inf")),
                                           resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
            t = time.perf_counter()
            engine.predict(returning, [[u.val, u.test] for u in users], shared, rt.local)
            best["evaluation"] = min(best["evaluation"], time.perf_counter() - t)

    print(f"{len(users)} users, {rows} training rows, {eval_rows} evaluation rows, {args.threads} thread(s)")
    print(f"fresh round      {best['fresh']:.3f} s  {best['fresh'] / rows * 1e6:6.2f} us per training row")
    print(f"returning round  {best['returning']:.3f} s  {best['returning'] / rows * 1e6:6.2f} us per training row, "
          f"{best['returning_faults']:,} page faults")
    print(f"evaluation       {best['evaluation']:.3f} s  {best['evaluation'] / eval_rows * 1e6:6.2f} us per row")
    print(json.dumps({"users": len(users), "train_rows": rows, "eval_rows": eval_rows, **best}))


if __name__ == "__main__":
    main()
