"""Cross-domain personalization (UniCDR+, Moment&Cross): does a user's dense-domain behaviour help its
personalization on a sparse domain, in the federation?

A two-surface `small` world (short video dense, live streaming sparse: 20 % of the categories, a user's live
activity 20 % of its short-video activity, taste correlation 0.7, 15 % of users live-only, 30 % never on
live) is generated and a foundation pre-trained on its open users (both surfaces), unless given. Then,
per algorithm, the federation is run with

- single-domain training (``--train-domains live``: the clients train on their live rows only) and
- cross-domain training (every row, both surfaces),

and evaluated on the live rows only, once for the users who also have short-video training rows
(``--eval-users cross-domain``) and once for those who do not (``single-domain``). Printed: validation and
test GAUC / AUC of the live rows per (algorithm, training, users); the frozen foundation is the reference.

    .venv/bin/python benchmarks/bench_domains.py --out runs/bench-domains [--rounds 8] \\
        [--algorithms fedpa local foundation]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

WORLD = dict(second_domain_share=0.2, second_domain_activity=0.2, domain_transfer=0.7,
             second_domain_only_users=0.15, first_domain_only_users=0.3)
TRAINING = {"single-domain": "live", "cross-domain": ""}
SEGMENTS = ("cross-domain", "single-domain")


def main() -> None:
    from fedpa.common.config import FederationConfig, with_recipe
    from fedpa.recdata.synth import generate
    from fedpa.simulations.pretraining import pretrain_foundation
    from fedpa.simulations.simulate import simulate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="a two-domain dataset (default: OUT/data, generated)")
    ap.add_argument("--foundation", type=Path, help="default: OUT/foundation, pre-trained")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--algorithms", nargs="+", default=["fedpa", "local", "foundation"])
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or out / "data"
    if not (data / "manifest.json").exists():
        t = time.time()
        generate("small", data, seed=0, **WORLD)
        print(f"generated {data} in {time.time() - t:.0f} s", flush=True)
    foundation = args.foundation or out / "foundation"
    if not (foundation / "pretrain_report.json").exists():
        t = time.time()
        pretrain_foundation(data, foundation, epochs=1, batch_size=1024)
        print(f"pre-trained {foundation} in {time.time() - t:.0f} s", flush=True)

    # the demo's federation (every private user in every round, one local epoch), each algorithm's recipe
    base = FederationConfig(data_dir=str(data), foundation=str(foundation), num_rounds=args.rounds,
                            clients_per_round=1.0, local_epochs=1, lr=0.01, batch_size=64,
                            eval_domains="live", feature_cache=str(out / "feature_cache"))
    rows = []
    for algorithm in args.algorithms:
        trainings = {"-": "live"} if algorithm == "foundation" else TRAINING
        for training, train_domains in trainings.items():
            for segment in SEGMENTS:
                cfg = with_recipe(replace(base, algorithm=algorithm, train_domains=train_domains, eval_users=segment,
                                          run_dir=str(out / "runs" / f"{algorithm}-{training}-{segment}")))
                t = time.time()
                summary = simulate(cfg, cohort_size=256)
                row = {"algorithm": algorithm, "training": training, "users": segment,
                       **{f"{split}_{m}": summary[split][m] for split in ("val", "test") for m in ("gauc", "auc")},
                       "test_users": summary["test"]["gauc_users"], "test_rows": summary["test"]["n"],
                       "seconds": time.time() - t}
                rows.append(row)
                print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| algorithm | training | live users | val GAUC | test GAUC | test AUC | test users (rows) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['algorithm']} | {r['training']} | {'with' if r['users'] == 'cross-domain' else 'without'} "
              f"short-video history | {r['val_gauc']:.4f} | {r['test_gauc']:.4f} | {r['test_auc']:.4f} | "
              f"{r['test_users']:.0f} ({r['test_rows']:.0f}) |")


if __name__ == "__main__":
    main()
