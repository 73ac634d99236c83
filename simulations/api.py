"""fedpa from Python (a notebook, a script): the commands' own functions, and run directories as tables.

    from fedpa.simulations import api

    cfg = api.config(data_dir="data/small", foundation="runs/demo/foundation", num_rounds=5)  # fedpa's recipe
    summary = api.simulate(cfg)                                   # what `fedpa simulate` runs
    rounds, summary = api.load_run(cfg.run_dir)                   # pandas: one row per round
    table = api.load_compare("runs/demo/compare")                 # one row per algorithm
    result = api.compare(cfg, ["fedpa", "fedper", "local"], seeds=[0, 1], out="runs/cmp")
    sweep = api.privacy_sweep(cfg, noises=[0, 1], clips=[0.5], secagg=[False], seeds=[0], out="runs/sweep")

The CLI is a thin layer over the same calls (`simulations/cli/`). pandas is the `analysis` extra
(`pip install .[analysis]`); only the ``load_*`` functions need it.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedpa.common.config import FederationConfig, with_recipe
from fedpa.foundation.errors import FedpaError


def config(item_side: bool = True, **settings: Any) -> FederationConfig:
    """A validated configuration: the settings given (underscored names, as `FederationConfig`'s fields), the
    algorithm's recipe below them (what `fedpa simulate` applies: `--algorithm fedpa` is FedPA's chosen
    configuration), defaults below that. ``item_side=False``: FedPA's recipe without its item-side tables (what
    a privacy sweep with the update attack runs)."""
    known = {f.name for f in fields(FederationConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise FedpaError(f"unknown setting(s) {', '.join(unknown)} (FederationConfig's fields; "
                         "docs/configuration.md)")
    cfg = with_recipe(FederationConfig(**settings), {k.replace("_", "-") for k in settings}, item_side)
    cfg.validate()
    return cfg


def simulate(cfg: FederationConfig, *, cohort_size: int = 0) -> dict:
    """One federation (Flower's simulation runtime); returns its summary (also in ``cfg.run_dir``)."""
    from fedpa.simulations.simulate import simulate as run

    return run(cfg, cohort_size=cohort_size)


def compare(base: FederationConfig, algorithms: list[str], seeds: list[int], out: str | Path, *,
            cohort_size: int = 0) -> dict:
    """Algorithms (and ablations) side by side, as `fedpa compare`: OUT/compare.{json,md,png,html}."""
    from fedpa.simulations.compare import compare as run

    return run(base, algorithms, seeds, out, cohort_size=cohort_size)


def privacy_sweep(base: FederationConfig, *, noises: list[float], clips: list[float], secagg: list[bool],
                  seeds: list[int], out: str | Path, mode: str = "auto", attack_targets: int = 64) -> dict:
    """Utility and attack success against ε, as `fedpa privacy-sweep`: OUT/sweep.{json,md,html}, report.md."""
    from fedpa.simulations.privacy_sweep import make_grid
    from fedpa.simulations.privacy_sweep import privacy_sweep as run

    if attack_targets and base.item_tables:
        raise FedpaError("the update attack replays rounds without FedPA's item-side tables: build the "
                         "configuration with api.config(..., item_side=False), or pass attack_targets=0")
    return run(base, make_grid(noises, clips, secagg, mode), seeds, out, attack_targets=attack_targets)


def _pandas():
    try:
        import pandas
    except ImportError:
        raise FedpaError("the load_* functions need pandas: pip install 'fedpa[analysis]' (or pandas)") from None
    return pandas


def _flat(prefix: str, d: dict, out: dict) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _flat(f"{prefix}{k}.", v, out)
        elif not isinstance(v, list):          # histograms and problem lists stay in the JSON
            out[f"{prefix}{k}"] = v


def load_run(path: str | Path):
    """A run directory as ``(rounds, summary)``: a DataFrame with one row per round (``val.auc``,
    ``test.gauc``, ``train_loss``, ``stage_s.train``, …, nested keys joined by dots) and the summary dict."""
    pd = _pandas()
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise FedpaError(f"{path}: not a run directory (no metrics.jsonl)")
    from fedpa.server.rundir import RunDir

    rows = []
    for rec in RunDir(path).read_metrics():      # a torn last line (a crash mid-append) left out, as resume does
        flat: dict[str, Any] = {}
        _flat("", {k: v for k, v in rec.items() if k != "eval"}, flat)
        _flat("", rec.get("eval", {}), flat)
        rows.append(flat)
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    return pd.DataFrame(rows).set_index("round"), summary


def load_compare(path: str | Path):
    """`fedpa compare`'s table as a DataFrame: one row per algorithm; each metric as ``<m>`` (mean over seeds)
    and ``<m>_std``."""
    pd = _pandas()
    f = Path(path) / "compare.json"
    if not f.exists():
        raise FedpaError(f"{path}: not a comparison (no compare.json)")
    table = json.loads(f.read_text())["table"]
    rows = {}
    for name, row in table.items():
        flat: dict[str, Any] = {}
        for k, v in row.items():
            if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) or x is None for x in v) \
                    and k not in ("seeds", "best_round"):
                flat[k], flat[f"{k}_std"] = (math.nan if x is None else x for x in v)
            elif k != "by_activity":       # a table of its own: load_by_activity
                flat[k] = v
        rows[name] = flat
    return pd.DataFrame.from_dict(rows, orient="index")


def load_by_activity(path: str | Path):
    """`fedpa compare`'s per-user change against the foundation by activity group (training rows per user):
    one row per (algorithm, group), each value's mean over seeds and ``<m>_std``."""
    pd = _pandas()
    f = Path(path) / "compare.json"
    if not f.exists():
        raise FedpaError(f"{path}: not a comparison (no compare.json)")
    rows = []
    for name, row in json.loads(f.read_text())["table"].items():
        for group, v in row.get("by_activity", {}).items():
            flat: dict[str, Any] = {"algorithm": name, "group": group, "users": v["users"]}
            for k in ("metric", "share_better", "share_worse", "change_mean"):
                flat[k], flat[f"{k}_std"] = v[k]
            rows.append(flat)
    return pd.DataFrame(rows).set_index(["algorithm", "group"]) if rows else pd.DataFrame()


def load_sweep(path: str | Path):
    """`fedpa privacy-sweep`'s points as a DataFrame (ε = inf where no noise), one row per point."""
    pd = _pandas()
    f = Path(path) / "sweep.json"
    if not f.exists():
        raise FedpaError(f"{path}: not a privacy sweep (no sweep.json)")
    rows = {}
    for row in json.loads(f.read_text())["rows"]:
        flat: dict[str, Any] = {"epsilon": math.inf if row["epsilon"] is None else row["epsilon"]}
        for k, v in row.items():
            if k in ("point", "epsilon"):
                continue
            if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) or x is None for x in v) \
                    and k not in ("seeds", "best_round", "run_dirs"):
                flat[k], flat[f"{k}_std"] = (math.nan if x is None else x for x in v)
            elif isinstance(v, dict):
                _flat(f"{k}.", {m: (x[0] if isinstance(x, list) else x) for m, x in v.items()}, flat)
            else:
                flat[k] = v
        rows[row["point"]] = flat
    return pd.DataFrame.from_dict(rows, orient="index")
