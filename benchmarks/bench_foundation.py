"""Benchmark the foundation recommender and its FedPA adapters (random batches shaped like the `small` preset).

    .venv/bin/python benchmarks/bench_foundation.py [--quick] [--json out.json]

Measures, in one run:

1. pre-training throughput (samples/s, Adam, all threads) of the default transformer foundation
   with RecFlow-scale id spaces (video ids hashed into 2^17 rows, authors into 2^15);
2. scoring latency of one request (1 history of 50 views, 120 candidates) with
   ``torch.set_num_threads(1)``: the foundation alone, the peft-adapted FedPA model, the
   merged model (fp32) and its int8 dynamic quantization (p50 / p99 over many repeats),
   plus the AUC change fp32 -> int8 on held-out (synthetic, learnable) batches;
3. peak RSS of a fresh subprocess that loads the frozen foundation checkpoint, attaches
   FedPA adapters for one user and runs one adapter training step (target <= 400 MiB),
   next to the RSS of a subprocess that only imports the libraries.

The data are random (``foundation.testing``), so the AUCs say nothing about real data;
they only show that int8 does not move the scores' order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from fedpa.foundation.adapters import attach_adapters, merge_for_user  # noqa: E402
from fedpa.foundation.config import FoundationConfig  # noqa: E402
from fedpa.foundation.model import FoundationModel, count_parameters, load_foundation  # noqa: E402
from fedpa.foundation.pretrain import evaluate  # noqa: E402
from fedpa.foundation.quantize import model_size_bytes, quantize_for_inference  # noqa: E402
from fedpa.foundation.testing import random_batch  # noqa: E402

SMALL_LIKE_VOCAB = {"video_id": 1_000_000, "author_id": 100_000, "category_level_one": 40, "category_level_two": 400,
                    "upload_type": 8, "age": 8, "gender": 3, "province": 40}
USER_FIELDS = ["age", "gender", "province"]
SEQ_LEN, CANDIDATES = 50, 120


def make_config() -> FoundationConfig:
    return FoundationConfig.from_dataset_vocab(SMALL_LIKE_VOCAB, USER_FIELDS, seq_len=SEQ_LEN)


def request_batch(cfg: FoundationConfig, seed: int) -> dict:
    """One request: the same user/history/context for all 120 candidates."""
    b = random_batch(cfg, CANDIDATES, seed, n_users=1)
    for k in ("hist_items", "hist_mask", "user_profile", "context", "user_id"):
        b[k] = b[k][:1].expand(CANDIDATES, *b[k].shape[1:]).contiguous()
    return b


def bench_training(model, cfg, batch_size: int, steps: int, warmup: int = 2) -> float:
    # lr 3e-3: the same steps also train the model enough for the int8 AUC comparison to mean something
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batches = [random_batch(cfg, batch_size, 1000 + i, n_users=4096) for i in range(steps + warmup)]
    model.train()
    t0 = None
    for i, b in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


@torch.inference_mode()
def latency_ms(model, batch: dict, repeats: int, warmup: int = 10) -> dict:
    model.eval()
    for _ in range(warmup):
        model(**batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(**batch)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50": statistics.median(times), "p99": times[min(len(times) - 1, int(0.99 * len(times)))]}


CHILD = r"""
import sys, torch
from fedpa.foundation.model import load_foundation
from fedpa.foundation.adapters import attach_adapters
from fedpa.foundation.testing import random_batch
torch.set_num_threads(1)
base = load_foundation({ckpt!r})
model = attach_adapters(base, "fedpa")
batch = random_batch(base.config, {batch}, 7, n_users=1)
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
loss = model(**batch).loss
loss.backward()
opt.step()
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""

CHILD_IMPORTS = r"""
import sys, torch, transformers, peft
import fedpa.foundation.model, fedpa.foundation.adapters
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def child_rss_mib(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    # VmHWM (peak RSS of this process image, KiB). Not ru_maxrss: on Linux that survives exec and
    # would report the parent's peak.
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40, help="timed pre-training steps")
    ap.add_argument("--repeats", type=int, default=300, help="scoring repeats per model")
    ap.add_argument("--user-batch", type=int, nargs="+", default=[64, 256],
                    help="examples in the child's adapter step (one child per value)")
    ap.add_argument("--quick", action="store_true", help="fewer steps/repeats (smoke run)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats, args.batch_size = 3, 50, 256

    torch.manual_seed(0)
    cfg = make_config()
    model = FoundationModel(cfg)
    res: dict = {"params": count_parameters(model), "threads_train": torch.get_num_threads()}
    print(f"foundation: {res['params']:,} parameters (default transformer, d={cfg.d_model}, "
          f"{cfg.n_layers} layers, seq {SEQ_LEN})")

    res["train_samples_per_s"] = bench_training(model, cfg, args.batch_size, args.steps)
    print(f"pre-training: {res['train_samples_per_s']:,.0f} samples/s (batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads)")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "foundation"
        model.save_pretrained(ckpt)
        base = load_foundation(ckpt)
        torch.manual_seed(1)
        adapted = attach_adapters(load_foundation(ckpt), "fedpa")
        # a few adapter steps so that the adapters are not at their (identity) init
        opt = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
        adapted.train()
        for i in range(5):
            b = random_batch(cfg, 256, 50 + i, n_users=1)
            opt.zero_grad()
            adapted(**b).loss.backward()
            opt.step()
        adapted.eval()
        req = request_batch(cfg, 3)
        merged = merge_for_user(adapted, 0, req["user_profile"][0])
        fp32, int8 = quantize_for_inference(merged)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        lat = {name: latency_ms(m, req, args.repeats) for name, m in
               [("foundation", base), ("fedpa_peft", adapted), ("merged_fp32", fp32), ("merged_int8", int8)]}
        torch.set_num_threads(threads)
        res["latency_ms"] = lat
        print(f"scoring 1 request x {CANDIDATES} candidates, 1 thread (p50 / p99 ms):")
        for name, v in lat.items():
            print(f"  {name:12s} {v['p50']:7.2f} / {v['p99']:7.2f}")
        res["ratio_int8_vs_fp32_p50"] = lat["merged_int8"]["p50"] / lat["merged_fp32"]["p50"]
        res["ratio_merged_vs_peft_p50"] = lat["merged_fp32"]["p50"] / lat["fedpa_peft"]["p50"]
        print(f"  ratios: int8/fp32 {res['ratio_int8_vs_fp32_p50']:.2f}, merged/peft "
              f"{res['ratio_merged_vs_peft_p50']:.2f}")

        # held-out AUC fp32 vs int8: the foundation on many users, the merged model on its user's data
        val_all = [random_batch(cfg, 1024, 900 + i, n_users=4096) for i in range(4)]
        base32, base8 = quantize_for_inference(base)
        f32, f8 = evaluate(base32, val_all)["auc"], evaluate(base8, val_all)["auc"]
        val_user = [random_batch(cfg, 1024, 950 + i, n_users=1) for i in range(4)]
        a32, a8 = evaluate(fp32, val_user)["auc"], evaluate(int8, val_user)["auc"]
        res.update(auc_foundation_fp32=f32, auc_foundation_int8=f8, auc_delta_foundation=f8 - f32,
                   auc_user_fp32=a32, auc_user_int8=a8, auc_delta_user=a8 - a32)
        print(f"int8 AUC change (synthetic held-out): foundation {f32:.4f} -> {f8:.4f} ({f8 - f32:+.4f}); "
              f"merged user model {a32:.4f} -> {a8:.4f} ({a8 - a32:+.4f})")
        res["size_bytes"] = {"fp32": model_size_bytes(fp32), "int8": model_size_bytes(int8),
                             "int8_embeddings": model_size_bytes(quantize_for_inference(merged, embeddings=True)[1])}
        print("state size: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in res["size_bytes"].items()))

        res["rss_imports_mib"] = child_rss_mib(CHILD_IMPORTS.format(root=str(ROOT)))
        res["rss_adapter_step_mib"] = {
            b: child_rss_mib(CHILD.format(root=str(ROOT), ckpt=str(ckpt), batch=b)) for b in args.user_batch}
        print(f"fresh process peak RSS (target <= 400 MiB): imports only (torch, transformers, peft, foundation) "
              f"{res['rss_imports_mib']:.0f} MiB; load frozen foundation + FedPA adapters + 1 training step: "
              + ", ".join(f"{b} examples {v:.0f} MiB" for b, v in res["rss_adapter_step_mib"].items()))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
