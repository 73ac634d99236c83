"""Latency of the funnel on one core: one request through each stage and through all four, fp32 and int8.

    .venv/bin/python benchmarks/bench_funnel.py [--data data/small] [--foundation runs/demo/foundation]
        [--requests 200] [--pool 500] [--out /tmp/bench_funnel.json]

Requests are the test day's, each with a pool of ``--pool`` candidates (its exposures and stage samples,
the rest random catalogue items); stage sizes scale RecFlow's funnel to the pool (retrieval keeps half,
pre-ranking half of that, ranking a third, re-ranking exposes 6). One request at a time (batch 1, as a
serving path would), ``torch.set_num_threads(1)``, the stage heads freshly initialised (latency does not
depend on their weights). Per stage: p50 / p99 milliseconds and candidates scored per second (the
stage's input size / its p50). int8: ``torch.ao`` dynamic quantization of every ``nn.Linear`` of the
foundation and the heads (`foundation.quantize.quantize_for_inference`), measured in the same run.
Retrieval's time includes encoding the user's behaviour sequence and the pool's items.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedpa.foundation.model import load_foundation  # noqa: E402
from fedpa.foundation.quantize import quantize_for_inference  # noqa: E402
from fedpa.recmodels.stages.features import StageEncoder  # noqa: E402
from fedpa.recmodels.stages.funnel import FunnelSizes, StageModels, run_funnel  # noqa: E402
from fedpa.simulations.funnel import FunnelConfig, build_models, load_funnel_data, request_tensors  # noqa: E402

STAGES = ("retrieval", "prerank", "rank", "rerank")


def measure(models: StageModels, encoder: StageEncoder, data, sizes: FunnelSizes, warmup: int = 5) -> dict:
    per = {s: [] for s in (*STAGES, "funnel")}
    for r in range(len(data)):
        row = data.rows(torch.tensor([r]))
        t: dict[str, float] = {}
        run_funnel(models, encoder, row.requests, row.items, row.mask, sizes, timings=t)
        if r < warmup:
            continue
        for s in STAGES:
            per[s].append(t[s] * 1e3)
        per["funnel"].append(sum(t.values()) * 1e3)
    inputs = {"retrieval": float(data.mask.sum(1).float().mean()), "prerank": sizes.retrieval,
              "rank": sizes.prerank, "rerank": sizes.rank}
    out = {}
    for s, v in per.items():
        a = np.array(v)
        out[s] = {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}
        if s in inputs:
            out[s]["candidates_per_s"] = inputs[s] / (out[s]["p50_ms"] / 1e3)
    return out


def quantized(models: StageModels, encoder: StageEncoder) -> tuple[StageModels, StageEncoder]:
    q = StageModels(*(quantize_for_inference(m)[1] if m is not None else None
                      for m in (models.retrieval, models.prerank, models.rank, models.rerank)),
                    rerank_weight=models.rerank_weight, mmr_lambda=models.mmr_lambda)
    return q, StageEncoder(quantize_for_inference(encoder.foundation)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/small")
    ap.add_argument("--foundation", default="runs/demo/foundation")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--pool", type=int, default=500)
    ap.add_argument("--out", default="/tmp/bench_funnel.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (1 thread used)")
    cfg = FunnelConfig(data_dir=args.data, foundation=args.foundation, train_requests=1,
                       test_requests=args.requests, random_per_request=args.pool)
    _, lookups, _, test_pools = load_funnel_data(cfg)
    keep = np.nonzero(test_pools.sizes() >= args.pool)[0]
    data = request_tensors(test_pools.subset(keep), lookups)
    data.items, data.mask = data.items[:, :args.pool], data.mask[:, :args.pool]
    data.level, data.labels, data.category = (data.level[:, :args.pool], data.labels[:, :args.pool],
                                              data.category[:, :args.pool])
    half = args.pool // 2
    sizes = FunnelSizes(retrieval=half, prerank=half // 2, rank=max(half // 6, 6), exposed=6)
    encoder = StageEncoder(load_foundation(args.foundation))
    models = build_models(encoder, cfg)
    print(f"{len(data)} requests, pool {args.pool}, sizes {sizes}")
    result = {"sizes": vars(sizes) if hasattr(sizes, "__dict__") else str(sizes), "requests": len(data)}
    q_models, q_encoder = quantized(models, encoder)
    for name, (m, e) in (("fp32", (models, encoder)), ("int8", (q_models, q_encoder))):
        result[name] = measure(m, e, data, sizes)
    print(f"\n{'stage':>10} {'fp32 p50':>9} {'p99':>7} {'int8 p50':>9} {'p99':>7} {'int8/fp32':>9} {'cand/s fp32':>12}")
    for s in (*STAGES, "funnel"):
        f, q = result["fp32"][s], result["int8"][s]
        cps = f"{f['candidates_per_s']:>12,.0f}" if "candidates_per_s" in f else f"{'':>12}"
        print(f"{s:>10} {f['p50_ms']:>8.2f}m {f['p99_ms']:>6.2f}m {q['p50_ms']:>8.2f}m {q['p99_ms']:>6.2f}m "
              f"{q['p50_ms'] / f['p50_ms']:>8.2f}x {cps}")
    print("(milliseconds per request, one core)")
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
