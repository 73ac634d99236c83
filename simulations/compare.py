"""`fedpa compare`: several algorithms (and ablations) on the same data, split and seeds, one table.

Each (variant, seed) is an ordinary run directory under ``ROOT/VARIANT/seed-S``;
the table reports the test metrics at each run's best validation round as
mean ± std over seeds (std over seeds, ddof=1; 0 for one seed, whose tables show the value alone).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedpa.common.config import FederationConfig, with_recipe
from fedpa.common.files import atomic_write_bytes, atomic_write_json, save_figure
from fedpa.recmodels.evaluation import ACTIVITY_GROUPS
from fedpa.server.rundir import RunDir
from fedpa.simulations.html_report import (
    activity_figure,
    change_figure,
    changed_users,
    compare_page,
    metric_bars,
    one_seed,
)

# Ablations of FedPA: name -> config overrides
# `fedpa` runs its recipe (`recmodels.algorithms.FEDPA_RECIPE`); each ablation below takes one part of it
# away (the item-side ones as a group with their settings), or one part of FedPA's own architecture.
ABLATIONS: dict[str, dict[str, Any]] = {
    "fedpa-release": {"algorithm": "fedpa", "use_user_bias": False, "item_popularity": False, "item_bias_fields": "",
                      "item_bias_update": "adam", "item_bias_prior": 0.0, "item_bias_lr": 0.0, "lr_decay": 1.0,
                      "foundation_logit_scale": 1.0, "negative_pool": 1, "item_embedding_dim": 0,
                      "item_embedding_lr": 0.0},                                       # FedPA as released
    "fedpa-adam-tables": {"algorithm": "fedpa", "item_bias_fields": "video_id", "item_bias_update": "adam",
                          "item_bias_prior": 100.0},         # the video-id offsets by Adam, as until 2026-12-05
    "fedpa-no-item-embeddings": {"algorithm": "fedpa", "item_embedding_dim": 0, "item_embedding_lr": 0.0},
    # ^ the recipe of 2026-12-06: no shared item embeddings, no private user vector
    "fedpa-video-table": {"algorithm": "fedpa", "item_bias_fields": "video_id"},   # no category tables
    "fedpa-no-popularity": {"algorithm": "fedpa", "item_popularity": False},
    "fedpa-no-item-table": {"algorithm": "fedpa", "item_bias_fields": "", "item_bias_prior": 0.0,
                            "item_bias_lr": 0.0},
    "fedpa-no-user-bias": {"algorithm": "fedpa", "use_user_bias": False},
    "fedpa-no-decay": {"algorithm": "fedpa", "lr_decay": 1.0},
    "fedpa-no-scale": {"algorithm": "fedpa", "foundation_logit_scale": 1.0},
    "fedpa-fixed-negatives": {"algorithm": "fedpa", "negative_pool": 1},   # split loo: the same 4 every round
    "fedpa-user-only": {"algorithm": "fedpa", "use_group_adapters": False, "use_gate": True},
    "fedpa-groups-only": {"algorithm": "fedpa", "use_user_adapter": False},
    "fedpa-no-gate": {"algorithm": "fedpa", "use_gate": False},
}
TABLE_METRICS = ("auc", "gauc", "logloss", "f1")
RANK_METRICS = ("hr@10", "ndcg@10", "mrr@10")
SPREAD = ("p10", "p50", "p90", "share_worse")  # per-user metric quantiles; share of users below the foundation


def variant_config(base: FederationConfig, variant: str, seed: int, root: Path,
                   given: set[str] | frozenset[str] = frozenset()) -> FederationConfig:
    """The configuration of one run: the base, the variant's overrides, and the algorithm's recipe for the keys
    the user did not give (``given``)."""
    overrides = dict(ABLATIONS.get(variant, {"algorithm": variant}))
    if variant.startswith("fedpa-rank"):
        overrides = {"algorithm": "fedpa", "rank": int(variant.removeprefix("fedpa-rank"))}
    cfg = replace(base, seed=seed, run_dir=str(root / variant / f"seed-{seed}"), **overrides)
    return with_recipe(cfg, set(given) | {k.replace("_", "-") for k in overrides})


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def seed_warnings(runs: list[dict]) -> dict[int, list[str]]:
    """Each run's training warnings (`server.health`) by seed, for the runs that have any."""
    return {r["seed"]: r["warnings"] for r in runs if r.get("warnings")}


def warning_notes(named: list[tuple[str, dict[int, list[str]]]]) -> list[str]:
    """Markdown bullets, one per (name, seed) with warnings, for under a table."""
    return [f"- **{name}**, seed {seed}: " + "; ".join(ws) + "." for name, by_seed in named
            for seed, ws in by_seed.items()]


def aggregate(summaries: dict[str, list[dict]]) -> dict[str, dict]:
    table = {}
    for variant, runs in summaries.items():
        row: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        metrics = TABLE_METRICS + (RANK_METRICS if any("hr@10" in r["test"] for r in runs) else ())
        for m in metrics:
            row[m] = mean_std([r["test"].get(m) for r in runs])
        for q in SPREAD:
            row[f"user_{q}"] = mean_std([r["test"].get("per_user", {}).get(q) for r in runs])
        by_activity = _by_activity(runs)
        if by_activity:
            row["by_activity"] = by_activity
        row["best_round"] = [r["best_round"] for r in runs]
        row["bytes_up_per_client_round"] = mean_std([r["bytes_up_per_client_round"] for r in runs])[0]
        row["bytes_down_per_client_round"] = mean_std([r["bytes_down_per_client_round"] for r in runs])[0]
        row["seconds_per_round"] = mean_std([r["seconds_per_round"] for r in runs])[0]
        row["wall_s"] = mean_std([r["wall_s"] for r in runs])[0]
        row["shared_params"] = runs[0]["model"]["shared_params"]
        row["private_params_per_user"] = runs[0]["model"]["private_params_per_user"]
        row["foundation_params"] = runs[0]["model"]["foundation_params"]
        row["warnings"] = seed_warnings(runs)
        table[variant] = row
    return table


def _by_activity(runs: list[dict]) -> dict[str, dict]:
    """Per activity group (ACTIVITY_GROUPS' order): users, the mean own metric and, against the foundation, the
    share of users who gain or lose and the mean change, each as (mean, std) over the seeds."""
    per_seed = [{g["group"]: g for g in r["test"].get("per_user", {}).get("by_activity", [])} for r in runs]
    out = {}
    for name in ACTIVITY_GROUPS:
        rows = [s[name] for s in per_seed if name in s]
        if not rows or "change_mean" not in rows[0]:
            continue
        out[name] = {"users": int(round(float(np.mean([g["users"] for g in rows])))),
                     "metric": mean_std([g["metric_mean"] for g in rows]),
                     **{k: mean_std([g.get(k) for g in rows]) for k in ("share_better", "share_worse", "change_mean")}}
    return out


def markdown_by_activity(table: dict[str, dict]) -> str:
    """compare.md's second table: the per-user change against the foundation by activity group."""
    rows = [(n, g, v) for n, row in table.items() for g, v in row.get("by_activity", {}).items()]
    if not rows:
        return ""
    lines = ["| algorithm | training rows per user | users | share better | share worse | mean change |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {g} | {v['users']:,} | {v['share_better'][0]:.1%} | {v['share_worse'][0]:.1%} | "
              + (f"{v['change_mean'][0]:+.4f} |" if one_seed(table[n]) else
                 f"{v['change_mean'][0]:+.4f} ± {v['change_mean'][1]:.4f} |") for n, g, v in rows]
    return "\n".join(lines)


def plot_per_user(table: dict[str, dict], summaries: dict[str, list[dict]], out: Path) -> Path | None:
    """ROOT/per_user.png: who gains and who loses against the foundation (first seed), and by activity group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spread = changed_users(table, summaries)
    groups = {n: row["by_activity"] for n, row in table.items() if row.get("by_activity")}
    if not spread:
        return None
    fig = change_figure(plt, spread)
    fig.tight_layout()
    save_figure(fig, out)
    if groups:
        fig = activity_figure(plt, groups)
        fig.tight_layout()
        save_figure(fig, out.with_name(out.stem + "_by_activity.png"))
    return out


def _fmt(ms: tuple[float, float], digits: int = 4, *, spread: bool = True) -> str:
    """mean ± std; the mean alone where there is no spread to show (one seed)."""
    m, s = ms
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}" if spread else f"{m:.{digits}f}"


def markdown_table(table: dict[str, dict]) -> str:
    rank = any("hr@10" in row for row in table.values())
    metrics = TABLE_METRICS + (RANK_METRICS if rank else ())
    per_user = "NDCG@10" if rank else "AUC"
    head = ["algorithm", *[f"test {m}" for m in metrics], f"per-user {per_user} p10 / p50 / p90",
            "users below foundation", "KB up / client / round", "s / round", "best round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, row in table.items():
        spread = " / ".join("n/a" if math.isnan(row[f"user_{q}"][0]) else f"{row[f'user_{q}'][0]:.3f}"
                            for q in ("p10", "p50", "p90"))
        worse = row["user_share_worse"][0]
        cells = [variant, *[_fmt(row[m], spread=not one_seed(row)) for m in metrics], spread,
                 "–" if math.isnan(worse) else f"{worse:.1%}",
                 f"{row['bytes_up_per_client_round'] / 1024:.1f}",
                 f"{row['seconds_per_round']:.1f}", ",".join(str(b) for b in row["best_round"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = warning_notes([(variant, row.get("warnings", {})) for variant, row in table.items()])
    if notes:
        lines += ["", "Warnings from the runs' own training curves (the rows they name may not show the method at "
                      "its best):", "", *notes]
    return "\n".join(lines)


def plot_comparison(table: dict[str, dict], summaries: dict[str, list[dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, m in zip(axes[:2], ("gauc", "auc")):
        metric_bars(ax, table, m, margin=0.03)
    ax = axes[2]
    for n in names:
        rows = RunDir(summaries[n][0]["run_dir"]).read_metrics()
        pts = [(r["round"], r["eval"]["val"].get("gauc")) for r in rows if "eval" in r]
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=n)
    ax.set_title("validation GAUC per round (first seed)")
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)


def compare(base: FederationConfig, variants: list[str], seeds: list[int], root: str | Path, *,
            cohort_size: int = 0, run_one=None, on_start=None, progress=None,
            given: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run every (variant, seed); write ROOT/compare.{md,json,png,html}. ``run_one(cfg)`` runs one configuration
    (defaults to `simulations.simulate.simulate`). ``given``: the keys the user set, which no algorithm's
    recipe replaces."""
    from fedpa.simulations.simulate import simulate

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in seeds:
            cfg = variant_config(base, variant, seed, root, given)
            if on_start:
                on_start(variant, seed)
            s = run_one(cfg) if run_one else simulate(cfg, cohort_size=cohort_size, progress=progress)
            s["run_dir"] = cfg.run_dir
            summaries.setdefault(variant, []).append(s)
    table = aggregate(summaries)
    md = markdown_table(table)
    by_activity = markdown_by_activity(table)
    atomic_write_json(root / "compare.json", {"variants": variants, "seeds": seeds, "table": table,
                                              "config": base.to_run_config()})
    atomic_write_bytes(root / "compare.md", (md + "\n" + (
        "\nPer-user change against the frozen foundation, by activity group (test, mean over seeds):\n\n"
        + by_activity + "\n" if by_activity else "")).encode())
    plot_comparison(table, summaries, root / "compare.png")
    plot_per_user(table, summaries, root / "per_user.png")
    compare_page(table, summaries, base.to_run_config(), root / "compare.html")
    return {"table": table, "markdown": md, "by_activity_markdown": by_activity, "root": str(root)}
