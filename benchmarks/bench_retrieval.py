"""Retrieval heads side by side in the funnel: RecFlow's two-tower (one user vector), the multi-interest
two-tower (K interests, an item scored by its best one) and DimeRec's generated query (those interests as
guidance of a diffusion model on the sphere), in one run.

Per head and seed, the whole funnel is trained and run (`simulations.funnel`, the other stages as
`fedpa funnel` builds them) on the *validation* day (trained on the days before it: where a choice may
be made) and on the *test* day (trained on every day before it: reported, never chosen on). Printed:
retrieval Recall/NDCG@72 of the request's effective views, the exposed list's NDCG@6, the end-to-end
effective-view rate, retrieval training seconds and the query time per request (the head alone: the
foundation's user encoding is shared by all three), one thread.

    .venv/bin/python benchmarks/bench_retrieval.py --data data/small --foundation runs/demo/foundation \\
        [--seeds 0 1] [--epochs 2 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

HEADS = {"two-tower": ("two-tower", 1), "multi-interest K=4": ("two-tower", 4), "DimeRec K=4": ("dimerec", 4)}


def query_us(model: torch.nn.Module, encoder, test, repeats: int = 3) -> float:
    """Median over repeats of the retrieval head's user-side time per request (batches of 128)."""
    with torch.no_grad():
        user, history, mask = encoder.users(test.requests)
        model.eval()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for s in range(0, len(user), 128):
                model.user_vectors(user[s:s + 128], history[s:s + 128], mask[s:s + 128])
            times.append((time.perf_counter() - t) / len(user))
    return 1e6 * sorted(times)[len(times) // 2]


def run(cfg, data) -> dict:
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.stages.features import StageEncoder
    from fedpa.simulations.funnel import build_models, evaluate_funnel, request_tensors, train_stages

    ds, lookups, train_pools, test_pools = data
    encoder = StageEncoder(load_foundation(cfg.foundation))
    train, test = request_tensors(train_pools, lookups), request_tensors(test_pools, lookups)
    models = build_models(encoder, cfg)
    seconds = train_stages(models, encoder, train, cfg)["retrieval"]["seconds"]
    m = evaluate_funnel(models, encoder, test, test_pools, ds, cfg)
    return {"recall@72": m["retrieval"]["recall@72"], "ndcg@72": m["retrieval"]["ndcg@72"],
            "exposed ndcg@6": m["exposed"]["ndcg@6"], "EV rate": m["end_to_end"]["effective_view_rate"],
            "train s": seconds, "query µs": query_us(models.retrieval, encoder, test)}


def main() -> None:
    from fedpa.simulations.funnel import FunnelConfig, load_funnel_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/small")
    ap.add_argument("--foundation", default="runs/demo/foundation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, nargs="+", default=[2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    columns = ("recall@72", "ndcg@72", "exposed ndcg@6", "EV rate", "train s", "query µs")
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("validation", "test"):
            print(f"\n{split} day, mean ± std over seeds {args.seeds}")
            print(f"{'epochs':>6} | {'head':<20} | " + " ".join(f"{c:>15}" for c in columns))
            for epochs in args.epochs:
                rows: dict[str, list[dict]] = {h: [] for h in HEADS}
                for seed in args.seeds:
                    base = FunnelConfig(data_dir=args.data, foundation=args.foundation, out_dir=tmp, seed=seed,
                                        epochs=epochs, validation=split == "validation")
                    data = load_funnel_data(base)
                    for head, (kind, k) in HEADS.items():
                        rows[head].append(run(replace(base, retrieval=kind, interests=k), data))
                for head, runs in rows.items():
                    cells = []
                    for c in columns:
                        v = np.array([r[c] for r in runs])
                        cells.append(f"{v.mean():.4f} ± {v.std():.4f}" if c not in ("train s", "query µs")
                                     else f"{v.mean():.1f}")
                    print(f"{epochs:>6} | {head:<20} | " + " ".join(f"{c:>15}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
