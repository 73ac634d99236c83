"""Benchmark of the synthetic data path: generation throughput and memory, client load time.

Cases (each in its own subprocess, so that every peak RSS is that case's alone):

- generate ``small`` (the demo default) and a slice of ``recflow`` (``--recflow-days``,
  2 by default): stage-sample rows/s and exposures/s, end to end (world, oracle,
  writing) and per day once the world is built; peak RSS;
- load one client's data from ``small``: ``Dataset.user_rows`` of exposures, requests
  and stage samples for one user, p50/p99 over ``--users`` random users.

Run: ``.venv/bin/python benchmarks/bench_data.py [--skip-recflow] [--work-dir DIR]``.
Aims: >= 1M stage-sample rows/s, <= 4 GiB peak RSS for recflow, <= 20 ms p50 client load.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

GIB = 1024 ** 3


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_generate(preset: str, out: str, days: int | None, seed: int) -> dict:
    from fedpa.recdata.store import Dataset
    from fedpa.recdata.synth import generate

    day_done: list[float] = []
    start = time.perf_counter()
    generate(preset, out, seed=seed, days=days, overwrite=True,
             progress=lambda stage, done, total: day_done.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    ds = Dataset(out)
    rows = ds.manifest["rows"]
    result = {"seconds": seconds, "stage_rows": rows["stage_samples"], "exposures": rows["exposures"],
              "days": len(day_done), "peak_rss": peak_rss_bytes()}
    if len(day_done) > 1:  # the days after the first: no world building or oracle writing in them
        later_rows = sum(ds.day("stage_samples", day, ["stage"]).num_rows for day in ds.days[1:])
        result["steady_rows_per_s"] = later_rows / (day_done[-1] - day_done[0])
    return result


def child_client_load(path: str, n_users: int, seed: int) -> dict:
    from fedpa.recdata.store import Dataset

    ds = Dataset(path)
    users = np.random.default_rng(seed).choice(ds.manifest["rows"]["users"], size=n_users, replace=False)
    latencies, rows = [], 0
    for user in users:
        start = time.perf_counter()
        for name in ("exposures", "requests", "stage_samples"):
            rows += ds.user_rows(name, int(user)).num_rows
        latencies.append(time.perf_counter() - start)
    ms = np.array(latencies) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "first_ms": float(ms[0]), "rows_per_user": rows / n_users, "peak_rss": peak_rss_bytes()}


def run_child(*args: str) -> dict:
    """Run one case in a fresh interpreter; it prints its result as JSON on the last line."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"case {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, help="where datasets are written (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated datasets")
    parser.add_argument("--skip-recflow", action="store_true", help="skip the recflow slice (needs ~4 GB disk)")
    parser.add_argument("--recflow-days", type=int, default=2)
    parser.add_argument("--users", type=int, default=1000, help="users sampled for the client-load case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        case, *rest = args.child
        if case == "generate":
            preset, out, days = rest
            result = child_generate(preset, out, int(days) or None, args.seed)
        else:
            result = child_client_load(rest[0], args.users, args.seed)
        print(json.dumps(result))
        return

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedpa-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        generations = [("small", 0)]
        if not args.skip_recflow:
            generations.append(("recflow", args.recflow_days))
        print(f"{'case':<28}{'stage rows':>12}{'exposures':>11}{'wall s':>8}{'rows/s':>10}"
              f"{'steady rows/s':>15}{'exposures/s':>13}{'peak RSS':>10}")
        for preset, days in generations:
            r = run_child("generate", preset, str(work / preset), str(days))
            label = f"generate {preset} ({r['days']} days)"
            steady = f"{r['steady_rows_per_s'] / 1e6:.2f}M" if "steady_rows_per_s" in r else "-"
            print(f"{label:<28}{r['stage_rows']:>12,}{r['exposures']:>11,}{r['seconds']:>8.1f}"
                  f"{r['stage_rows'] / r['seconds'] / 1e6:>9.2f}M{steady:>15}"
                  f"{r['exposures'] / r['seconds'] / 1e3:>12.0f}K{r['peak_rss'] / GIB:>7.2f} GiB")
        r = run_child("load", str(work / "small"))
        print(f"\nclient load, small, {args.users} random users (exposures + requests + stage_samples):")
        print(f"  p50 {r['p50_ms']:.2f} ms   p99 {r['p99_ms']:.2f} ms   first call {r['first_ms']:.2f} ms   "
              f"{r['rows_per_user']:,.0f} rows per user   peak RSS {r['peak_rss'] / GIB:.2f} GiB")
        print("\naims: >= 1M stage rows/s; recflow peak RSS <= 4 GiB; client load p50 <= 20 ms")
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
