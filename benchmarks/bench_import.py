"""Benchmark of `fedpa data import-interactions` on a review log shaped like Amazon's (text reviewer ids and ASINs,
a 1-5 rating, a unix time), against the same log with integer ids, side by side in one run.

Each import runs in its own subprocess, so that every peak RSS is that import's alone. The log is synthetic (random
ids, uniform ratings): it measures the importer, not a data set.

Run: ``.venv/bin/python benchmarks/bench_import.py [--rows 5000000] [--users 400000] [--items 200000]
[--work-dir DIR]``.
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


def write_log(path: Path, rows: int, users: int, items: int, text: bool, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, rows)
    i = rng.integers(0, items, rows)
    if text:   # Amazon's shapes: 'A' + 13 hex digits, 'B0' + 8
        user_ids = np.char.add("A", np.char.zfill(np.char.upper(np.array([np.base_repr(x, 16) for x in
                                                                           range(users)])), 13))
        item_ids = np.char.add("B0", np.char.zfill(np.array([np.base_repr(x, 16) for x in range(items)]), 8))
        u, i = user_ids[u], item_ids[i]
    table = pa.table({"reviewerID": u, "asin": i, "overall": rng.integers(1, 6, rows),
                      "unixReviewTime": rng.integers(1_300_000_000, 1_500_000_000, rows)})
    pcsv.write_csv(table, path)


def child_import(log: str, out: str) -> dict:
    from fedpa.recdata.import_interactions import Mapping, import_interactions

    t = time.perf_counter()
    import_interactions(log, out, Mapping(user="reviewerID", item="asin", timestamp="unixReviewTime", time_unit="s",
                                          implicit=True))
    return {"s": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=400_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--work-dir", type=Path, help="where the logs and datasets are written (default: a temporary dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child_import(*a.child)))
        return
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="bench_import_"))
    work.mkdir(parents=True, exist_ok=True)
    got = {}
    try:
        for kind in ("integer", "text"):
            log = work / f"{kind}.csv"
            write_log(log, a.rows, a.users, a.items, kind == "text", a.seed)
            out = work / f"{kind}-dataset"
            shutil.rmtree(out, ignore_errors=True)
            res = subprocess.run([sys.executable, __file__, "--child", str(log), str(out)], check=True,
                                 capture_output=True, text=True, cwd=ROOT)
            got[kind] = json.loads(res.stdout.strip().splitlines()[-1])
            got[kind]["mb_on_disk"] = log.stat().st_size / 2**20
            print(json.dumps({"ids": kind, **got[kind]}), flush=True)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{a.rows:,} rows, {a.users:,} users, {a.items:,} items (synthetic, implicit)\n")
    print("| ids | CSV MB | import s | rows/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for kind, r in got.items():
        print(f"| {kind} | {r['mb_on_disk']:.0f} | {r['s']:.1f} | {a.rows / r['s']:,.0f} | {r['peak_rss_mb']:,.0f} |")
    print(f"\ntext / integer: {got['text']['s'] / got['integer']['s']:.2f}x the time, "
          f"{got['text']['peak_rss_mb'] / got['integer']['peak_rss_mb']:.2f}x the peak memory")


if __name__ == "__main__":
    main()
