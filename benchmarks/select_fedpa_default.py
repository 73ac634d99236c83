"""How FedPA's recipe (`recmodels.algorithms.FEDPA_RECIPE`) was chosen: candidates x data sets x seeds, on
validation only; test is printed beside it and never used to choose.

    .venv/bin/python benchmarks/select_fedpa_default.py --datasets small,loo,last --seeds 0,1 \
        [--candidates release,tally,user-offset,video-table,recipe,recipe+categories] [--out runs/select]
        [--rounds N (every set's runs; default each set's own)]

Data sets (import them first with the benchmark named, or point the options at your own copies):
- ``small``: `make demo`'s `data/small` and `runs/demo/foundation`, by-day split, 5 rounds, validation GAUC;
- ``loo``: KuaiSAR-R under PFedRec's protocol (`benchmarks/bench_quality_loo.py` imports it into
  `data/kuaisar-r-loo` and pre-trains `runs/loo/pretrained`), 12 rounds, every user a client, validation HR@10;
- ``last``: KuaiSAR-R under MRFF's protocol (`benchmarks/bench_quality_kuaisar.py` imports it into
  `data/kuaisar-r`), its foundation pre-trained as the other two are, stopping on validation:
  `fedpa pretrain --data data/kuaisar-r --split last --epochs 20 --patience 2 --batch-size 1024
  --activity-attribute reco_active_level --active-values 3 --out runs/kuaisar-last/pretrained`; 10 rounds,
  every user a client, group adapters on onehot_feat1 and reco_active_level, validation AUC;
- ``ml``: MovieLens-100K under PFedRec's protocol (every rating a positive; `fedpa data import-movielens
  PATH/TO/ml-100k --out data/ml100k-implicit --label implicit`, then `benchmarks/bench_quality_loo.py --data
  data/ml100k-implicit --activity-attribute "" --out runs/ml-implicit` pre-trains `runs/ml-implicit/pretrained`;
  MovieLens may not be redistributed, so it is not in `shared/`), 12 rounds, every user a client, validation HR@10;
- ``core5``: KuaiSAR-R's 5-core under PFedRec's protocol (`benchmarks/bench_quality_loo.py --core 5` imports it into
  `data/kuaisar-r-loo-core5` and pre-trains `runs/loo-core5/pretrained`), 40 rounds, validation HR@10.

Candidates named ``default`` or ``default+...`` run `--algorithm fedpa` as a user gets it (its recipe,
`common.config.with_recipe`, below what the candidate sets); the others set every part themselves over ``release``.

Each candidate adds one part to the one before it. The rule: the highest mean relative validation gain over
``release`` (FedPA as released), and below it on no data set. Prints one JSON line per run, then the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from fedpa.common.config import FederationConfig, with_recipe
from fedpa.simulations.simulate import simulate

RELEASE = dict(use_user_bias=False, item_popularity=False, item_popularity_steps=False, item_bias_fields="",
               item_bias_update="adam",
               item_bias_prior=0.0,
               item_bias_lr=0.0, lr_decay=1.0, foundation_logit_scale=1.0, item_embedding_dim=0, negative_pool=1)
# the Adam-table recipe (until 2026-12-05) and the Newton one with category tables (the recipe since 2026-12-06):
# the bases most candidates below add one part to
ADAM_RECIPE = dict(item_popularity=True, use_user_bias=True, item_bias_fields="video_id", item_bias_prior=100.0,
                   item_bias_lr=0.3, lr_decay=0.8, foundation_logit_scale=0.1)
CATEGORIES = "video_id,category_level_one,category_level_two,upload_type"
NEWTON_RECIPE = {**ADAM_RECIPE, "item_bias_fields": CATEGORIES, "item_bias_update": "newton", "item_bias_prior": 10.0}
CANDIDATES: dict[str, dict] = {
    "release": {},
    "tally": dict(item_popularity=True),
    "user-offset": dict(item_popularity=True, use_user_bias=True),
    "video-table": dict(item_popularity=True, use_user_bias=True, item_bias_fields="video_id",
                        item_bias_prior=100.0, item_bias_lr=0.3, lr_decay=0.8),
    # "recipe": the recipe until 2026-12-05 (now the ablation fedpa-adam-tables)
    "recipe": ADAM_RECIPE,
    "recipe+emb8": {**ADAM_RECIPE, "item_embedding_dim": 8},
    "recipe+emb32": {**ADAM_RECIPE, "item_embedding_dim": 32},
    # the recipe since 2026-12-05: the offset tables take Newton steps from the clients' per-row sums
    "newton-tables": {**NEWTON_RECIPE, "item_bias_fields": "video_id"},
    # the category tables beside the video id's, stepped jointly; "newton+categories" measured with equal
    # shares of the joint step, "newton+categories-half" (the recipe since 2026-12-06) with the video id's half
    # (`recmodels.item_bias.newton_step_shares`: the shares are code, not configuration, so both read the same)
    "newton+categories": NEWTON_RECIPE,
    "newton+categories-half": NEWTON_RECIPE,
    # shared item embeddings (FedMF's collaborative signal) on top of the recipe
    "newton+categories-half+emb8": {**NEWTON_RECIPE, "item_embedding_dim": 8},
    "newton+categories-half+emb32": {**NEWTON_RECIPE, "item_embedding_dim": 32},
    # the same at a smaller local step for the embeddings and the private vectors (item-bias-lr: under newton it
    # moves nothing else)
    "newton+categories-half+emb32-lr0.03": {**NEWTON_RECIPE, "item_embedding_dim": 32, "item_bias_lr": 0.03},
    "newton+categories-half+emb32-lr0.01": {**NEWTON_RECIPE, "item_embedding_dim": 32, "item_bias_lr": 0.01},
    # the recipe trained on a pool of 16 sampled negatives per positive, 4 of them fresh each round (split loo
    # only: elsewhere the same as the recipe), as the federated recommenders of the field redraw theirs
    "newton+categories-half+pool4": {**NEWTON_RECIPE, "negative_pool": 4},
    # the same with item embeddings (width 32) whose local step does not decay (`item-embedding-lr`): a
    # collaborative signal that keeps learning after the adapters' step has decayed; run with --rounds 30
    "newton+categories-half+pool4+emb32-const0.03": {**NEWTON_RECIPE, "negative_pool": 4, "item_embedding_dim": 32,
                                                      "item_embedding_lr": 0.03},
    # the same from a pool four times as large (64 negatives per positive, a fresh 4 each round; the recipe since
    # 2026-12-07): the leave-one-out sets only (elsewhere there is no pool), with --rounds 30
    "newton+categories-half+pool16+emb32-const0.03": {**NEWTON_RECIPE, "negative_pool": 16, "item_embedding_dim": 32,
                                                       "item_embedding_lr": 0.03},
    # the recipe with its video-id keyed tables (offsets, click tally) hashed into a bounded number of rows
    # (`item-rows`): what a client uploads per round, and SecAgg's masked vector, no longer grow with the catalogue
    "newton+categories-half+pool4+rows16384": {**NEWTON_RECIPE, "negative_pool": 4, "item_rows": 16384},
    "newton+categories-half+pool4+rows4096": {**NEWTON_RECIPE, "negative_pool": 4, "item_rows": 4096},
    "recipe+steps": {**ADAM_RECIPE, "item_popularity_steps": True},
    # `--algorithm fedpa` exactly as a user runs it (`common.config.with_recipe`: its item embeddings only where the
    # video-id table is small, its pool bounded), and the same with a sampled-softmax term beside cross-entropy in
    # local training (`listwise-weight`, 2026-12-08)
    "default": {},
    "default+listwise0.5": {"listwise_weight": 0.5},
    "default+listwise1": {"listwise_weight": 1.0},
    "recipe+categories": {**ADAM_RECIPE, "item_bias_fields": CATEGORIES},
}


def datasets(a: argparse.Namespace) -> dict[str, tuple[FederationConfig, str]]:
    kuaisar = dict(federate_open_users=True, activity_attribute="reco_active_level", active_values="3")
    return {
        "small": (FederationConfig(data_dir=a.small_data, foundation=a.small_foundation, num_rounds=5), "gauc"),
        "loo": (FederationConfig(data_dir=a.loo_data, foundation=a.loo_foundation, split="loo", num_rounds=12,
                                 **kuaisar), "hr@10"),
        "last": (FederationConfig(data_dir=a.last_data, foundation=a.last_foundation, split="last", num_rounds=10,
                                  group_attributes="onehot_feat1,reco_active_level", **kuaisar), "auc"),
        "ml": (FederationConfig(data_dir=a.ml_data, foundation=a.ml_foundation, split="loo", num_rounds=12,
                                federate_open_users=True), "hr@10"),
        "core5": (FederationConfig(data_dir=a.core5_data, foundation=a.core5_foundation, split="loo", num_rounds=40,
                                   **kuaisar), "hr@10"),
    }


def add_dataset_options(ap: argparse.ArgumentParser) -> None:
    """Where the selection data sets and their foundations are (`datasets` reads them)."""
    ap.add_argument("--small-data", default="data/small")
    ap.add_argument("--small-foundation", default="runs/demo/foundation")
    ap.add_argument("--loo-data", default="data/kuaisar-r-loo")
    ap.add_argument("--loo-foundation", default="runs/loo/pretrained")
    ap.add_argument("--last-data", default="data/kuaisar-r")
    ap.add_argument("--last-foundation", default="runs/kuaisar-last/pretrained")
    ap.add_argument("--ml-data", default="data/ml100k-implicit")
    ap.add_argument("--ml-foundation", default="runs/ml-implicit/pretrained")
    ap.add_argument("--core5-data", default="data/kuaisar-r-loo-core5")
    ap.add_argument("--core5-foundation", default="runs/loo-core5/pretrained")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="small,loo,last")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--out", default="runs/select")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of every data set's runs (0: each set's own)")
    add_dataset_options(ap)
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    names = [c for c in a.candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown} (one of {', '.join(CANDIDATES)})")
    sets = datasets(a)
    got: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for ds in [d for d in a.datasets.split(",") if d]:
        base, key = sets[ds]
        for c in names:
            for s in seeds:
                where = dict(seed=s, run_dir=str(Path(a.out) / ds / c / f"seed-{s}"),
                             num_rounds=a.rounds or base.num_rounds)
                if c == "default" or c.startswith("default+"):   # the recipe below what the candidate sets
                    cfg = with_recipe(replace(base, **where, **CANDIDATES[c]),
                                      {k.replace("_", "-") for k in CANDIDATES[c]})
                else:
                    cfg = replace(base, **where, **{**RELEASE, **CANDIDATES[c]})
                t = time.time()
                summary = simulate(cfg)
                val, test = summary["val"].get(key), summary["test"].get(key)
                got.setdefault((c, ds), []).append((val, test))
                print(json.dumps({"dataset": ds, "candidate": c, "seed": s, "metric": key, "val": val, "test": test,
                                  "best_round": summary["best_round"], "s": round(time.time() - t, 1)}), flush=True)
    dss = [d for d in a.datasets.split(",") if d]
    print("\n| candidate | " + " | ".join(f"{d} val {sets[d][1]} (test)" for d in dss) + " | mean gain |")
    print("|---|" + "---|" * (len(dss) + 1))
    for c in names:
        cells, gains = [], []
        for d in dss:
            runs = got.get((c, d))
            if not runs:
                cells.append("–")
                continue
            val, test = statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs)
            cells.append(f"{val:.4f} ({test:.4f})")
            ref = got.get(("release", d))
            if ref:
                gains.append(val / statistics.mean(r[0] for r in ref) - 1)
        mean_gain = f"{100 * statistics.mean(gains):+.2f} %" if gains and len(gains) == len(dss) else "–"
        print(f"| {c} | " + " | ".join(cells) + f" | {mean_gain} |")


if __name__ == "__main__":
    main()
