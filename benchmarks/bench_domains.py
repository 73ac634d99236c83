"""Cross-domain personalization (UniCDR+, Moment&Cross): does a user's dense-domain behaviour help its
recommendations on a sparse domain, through the foundation and through the federation?

A two-surface `small` world (short video dense, live streaming sparse: the least popular 20 % of every
category's items, a user's live activity 30 % of its short-video activity, taste correlation 0.7, plus a taste
every user shares on live only (``second_domain_shift`` 1.0), 15 % of users live-only, 30 % never on live) is
generated unless given. Four platforms are compared, each evaluated on the live rows only, once for the users
who also have short-video training rows (``--eval-users cross-domain``) and once for those who do not
(``single-domain``):

- **single-domain**: a foundation pre-trained on live rows only (``fedpa pretrain --domains live``) and a
  federation that sees live rows only, in its training rows and its behaviour sequences (``--domains live``);
- **cross-domain foundation**: the foundation pre-trained on both surfaces, personalization on the live
  rows only (``--train-domains live``; sequences hold both surfaces);
- **cross-domain**: both surfaces everywhere;
- **cross-domain + domain path**: both surfaces, and FedPA's adapter gets a domain-specific shared path per
  surface beside its domain-invariant user and group paths (``--domain-adapters``; UniCDR+'s split).

Printed: validation and test GAUC / AUC of the live rows per (algorithm, platform, users), mean and spread
over the federation's seeds (the foundations are pre-trained once, seed 0).

    .venv/bin/python benchmarks/bench_domains.py --out runs/bench-domains [--rounds 8] [--seeds 0 1 2] \
        [--algorithms fedpa foundation]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

WORLD = dict(second_domain_share=0.2, second_domain_activity=0.3, domain_transfer=0.7, second_domain_shift=1.0,
             second_domain_only_users=0.15, first_domain_only_users=0.3)
# platform -> (the foundation's domains, the run's domains, its training domains, domain-specific path)
PLATFORMS = {"single-domain": ("live", "live", "", False), "cross-domain foundation": ("", "", "live", False),
             "cross-domain": ("", "", "", False), "cross-domain + domain path": ("", "", "", True)}
SEGMENTS = ("cross-domain", "single-domain")
METRICS = [f"{split}_{m}" for split in ("val", "test") for m in ("gauc", "auc")]


def main() -> None:
    import numpy as np

    from fedpa.common.config import FederationConfig, with_recipe
    from fedpa.recdata.synth import generate
    from fedpa.simulations.pretraining import pretrain_foundation
    from fedpa.simulations.simulate import simulate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="a two-domain dataset with a 'live' domain (default: OUT/data)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--algorithms", nargs="+", default=["fedpa", "foundation"])
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or out / "data"
    if not (data / "manifest.json").exists():
        t = time.time()
        generate("small", data, seed=0, **WORLD)
        print(f"generated {data} in {time.time() - t:.0f} s", flush=True)
    foundations = {}
    for domains in {f for f, _, _, _ in PLATFORMS.values()}:
        foundations[domains] = out / f"foundation-{domains or 'all'}"
        if not (foundations[domains] / "pretrain_report.json").exists():
            t = time.time()
            pretrain_foundation(data, foundations[domains], epochs=1, batch_size=1024, domains=domains)
            print(f"pre-trained {foundations[domains]} in {time.time() - t:.0f} s", flush=True)

    rows = []
    for algorithm in args.algorithms:
        for platform, (foundation, domains, train_domains, domain_path) in PLATFORMS.items():
            if algorithm == "foundation" and (train_domains or domain_path):
                continue  # nothing trains: the same as cross-domain
            if domain_path and algorithm != "fedpa":
                continue  # a FedPA option
            for segment in SEGMENTS:
                runs = []
                for seed in args.seeds if algorithm != "foundation" else args.seeds[:1]:
                    # the demo's federation (every private user in every round, one local epoch), the recipe
                    cfg = with_recipe(FederationConfig(
                        data_dir=str(data), foundation=str(foundations[foundation]), num_rounds=args.rounds,
                        clients_per_round=1.0, local_epochs=1, lr=0.01, batch_size=64, seed=seed,
                        algorithm=algorithm, domains=domains, train_domains=train_domains, eval_domains="live",
                        eval_users=segment, domain_adapters=domain_path, feature_cache=str(out / "feature_cache"),
                        run_dir=str(out / "runs" / f"{algorithm}-{platform.replace(' ', '-')}-{segment}-{seed}")))
                    t = time.time()
                    summary = simulate(cfg, cohort_size=256)
                    runs.append({m: summary[m.split("_")[0]][m.split("_")[1]] for m in METRICS})
                    print(json.dumps({"algorithm": algorithm, "platform": platform, "users": segment, "seed": seed,
                                      **runs[-1], "seconds": round(time.time() - t)}), flush=True)
                rows.append({"algorithm": algorithm, "platform": platform, "users": segment,
                             **{m: float(np.mean([r[m] for r in runs])) for m in METRICS},
                             **{m + "_sd": float(np.std([r[m] for r in runs])) for m in METRICS},
                             "seeds": len(runs), "test_users": summary["test"]["gauc_users"],
                             "test_rows": summary["test"]["n"]})
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| algorithm | platform | live users | val GAUC | test GAUC | val AUC | test AUC | test users (rows) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = " | ".join(f"{r[m]:.4f}" + (f" ± {r[m + '_sd']:.4f}" if r["seeds"] > 1 else "")
                           for m in ("val_gauc", "test_gauc", "val_auc", "test_auc"))
        print(f"| {r['algorithm']} | {r['platform']} | {'with' if r['users'] == 'cross-domain' else 'without'} "
              f"short-video history | {cells} | {r['test_users']:.0f} ({r['test_rows']:.0f}) |")


if __name__ == "__main__":
    main()
