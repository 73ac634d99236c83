"""The user encoders side by side: BERT self-attention over the history against ELASTIC (foundation/elastic.py), at
history lengths 50, 200 and 1,000, in one run.

Per (encoder, length): scoring latency of 120 candidates for one user (the history encoded once, then target
attention and the tower: what a device does per recommendation), the time of one pre-training step (256 rows of
distinct users, forward + backward + Adam), and the peak RSS of a fresh process that builds the model and runs
that step (each configuration in its own subprocess, so one does not inherit another's peak). Parameters
counted with the embedding tables (small vocabularies: the encoders' own difference shows).

    .venv/bin/python benchmarks/bench_user_encoder.py [--lengths 50 200 1000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def measure(encoder: str, length: int, repeats: int) -> dict:
    from fedpa.foundation.model import FoundationModel, count_parameters
    from fedpa.foundation.testing import random_batch, small_config

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = FoundationModel(small_config(user_encoder=encoder, seq_len=length))
    one = random_batch(model.config, 1, 0, hist_fill=1.0)
    cands = random_batch(model.config, 120, 1)
    rows = {k: (one[k].expand(120, *one[k].shape[1:]).clone() if k in ("hist_items", "hist_mask", "user_profile",
                                                                        "context") else v)
            for k, v in cands.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        model(**rows)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(**rows)
            times.append(time.perf_counter() - t)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = random_batch(model.config, 256, 2, n_users=256, hist_fill=1.0)
    steps = []
    for _ in range(max(3, repeats // 5)):
        t = time.perf_counter()
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        steps.append(time.perf_counter() - t)
    times.sort()
    steps.sort()
    return {"score_ms": 1e3 * times[len(times) // 2], "step_ms": 1e3 * steps[len(steps) // 2],
            "params": count_parameters(model), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 1000])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--one", nargs=2, metavar=("ENCODER", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats)))
        return
    print("one thread; score = 120 candidates of one user; step = 256 rows, forward + backward + Adam\n")
    print(f"{'length':>6} | {'encoder':>7} | {'score ms':>8} {'step ms':>8} {'peak MiB':>8} {'params':>8} | "
          f"{'score ratio':>11} {'step ratio':>10}")
    for length in args.lengths:
        got = {}
        for encoder in ("bert", "elastic"):
            out = subprocess.run([sys.executable, __file__, "--one", encoder, str(length), "--repeats",
                                  str(args.repeats)], capture_output=True, text=True, check=True)
            got[encoder] = json.loads(out.stdout.strip().splitlines()[-1])
        for encoder, r in got.items():
            ratio = ("", "") if encoder == "bert" else (f"{got['bert']['score_ms'] / r['score_ms']:.2f}x",
                                                        f"{got['bert']['step_ms'] / r['step_ms']:.2f}x")
            print(f"{length:>6} | {encoder:>7} | {r['score_ms']:>8.2f} {r['step_ms']:>8.1f} {r['peak_mib']:>8.0f} "
                  f"{r['params']:>8,} | {ratio[0]:>11} {ratio[1]:>10}")


if __name__ == "__main__":
    main()
