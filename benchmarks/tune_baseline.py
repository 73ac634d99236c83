"""A published baseline's settings searched on validation, as its authors ask (FedRAP's README: "perform a
fine-grained, dataset-specific hyperparameter search"): every point of a grid, on the selection data sets of
`select_fedpa_default.py`, ranked by the validation metric; test is printed beside it and never used to choose.

    .venv/bin/python benchmarks/tune_baseline.py --algorithm fedrap --datasets loo --seeds 0 \
        --grid fedrap-item-lr=20,200,1000 --grid fedrap-weight-decay=0,1e-4,1e-3 [--set lr=0.5] [--out runs/tune]

Each point starts from the algorithm's recipe (`Algorithm.recipe`, its official code's defaults); `--grid` and
`--set` values replace it. Prints one JSON line per run, then the grid sorted by mean relative validation gain
over the recipe's own point (the first of the grid when the recipe's values are not in it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from select_fedpa_default import add_dataset_options, datasets

from fedpa.common.config import FIELDS, coerce_value, with_recipe
from fedpa.simulations.simulate import simulate


def _value(key: str, text: str):
    if key not in FIELDS:
        raise SystemExit(f"unknown configuration key '{key}'")
    return coerce_value(key, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", required=True)
    ap.add_argument("--datasets", default="loo")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (dashed configuration keys)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every point")
    ap.add_argument("--out", default="runs/tune")
    add_dataset_options(ap)
    a = ap.parse_args()
    axes: list[tuple[str, list]] = []
    for item in a.grid:
        key, _, values = item.partition("=")
        axes.append((key, [_value(key, v) for v in values.split(",") if v]))
    fixed = {}
    for item in a.sets:
        key, _, value = item.partition("=")
        fixed[key] = _value(key, value)
    points = [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])] or [{}]
    seeds = [int(s) for s in a.seeds.split(",")]
    sets = datasets(a)
    names = [d for d in a.datasets.split(",") if d]
    got: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for ds in names:
        base, metric = sets[ds]
        for i, point in enumerate(points):
            given = {**fixed, **point}
            label = ",".join(f"{k}={v}" for k, v in point.items()) or "recipe"
            for s in seeds:
                cfg = replace(base, algorithm=a.algorithm, seed=s,
                              run_dir=str(Path(a.out) / a.algorithm / ds / label.replace("=", "-") / f"seed-{s}"),
                              **{FIELDS[k].name: v for k, v in given.items()})
                cfg = with_recipe(cfg, set(given) | {"data-dir", "foundation", "split", "num-rounds", "seed",
                                                     "run-dir", "activity-attribute", "active-values",
                                                     "federate-open-users", "group-attributes"})
                t = time.time()
                summary = simulate(cfg)
                val, test = summary["val"].get(metric), summary["test"].get(metric)
                got.setdefault((i, ds), []).append((val, test))
                print(json.dumps({"dataset": ds, "algorithm": a.algorithm, "point": label, "seed": s,
                                  "metric": metric, "val": val, "test": test, "best_round": summary["best_round"],
                                  "warnings": summary.get("warnings", []),   # e.g. a diverging loss at this point
                                  "s": round(time.time() - t, 1)}), flush=True)
    rows = []
    for i, point in enumerate(points):
        cells, gains = [], []
        for ds in names:
            runs = got[(i, ds)]
            val, test = statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs)
            ref = statistics.mean(r[0] for r in got[(0, ds)])
            cells.append(f"{val:.4f} ({test:.4f})")
            gains.append(val / ref - 1 if ref else 0.0)
        rows.append((statistics.mean(gains), ",".join(f"{k}={v}" for k, v in point.items()) or "recipe", cells))
    print(f"\n{a.algorithm}, seeds {a.seeds}" + "".join(f", {k}={v}" for k, v in fixed.items()))
    print("| point | " + " | ".join(f"{d} val {sets[d][1]} (test)" for d in names) + " | gain over the first |")
    print("|---|" + "---|" * (len(names) + 1))
    for gain, label, cells in sorted(rows, key=lambda r: -r[0]):
        print(f"| {label} | " + " | ".join(cells) + f" | {100 * gain:+.1f} % |")


if __name__ == "__main__":
    main()
