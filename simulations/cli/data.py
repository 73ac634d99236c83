"""`fedpa data …`: synthesize, import and inspect canonical datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedpa.foundation.errors import FedpaError
from fedpa.simulations.progress import day_progress, progress_bar

from .common import data_app, out, user_errors


@data_app.command("synth")
@user_errors
def data_synth(
    preset: Annotated[str, typer.Option(help="tiny | small | recflow")] = "small",
    out_dir: Annotated[Path, typer.Option("--out", help="dataset directory to write")] = Path("data/small"),
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bytes)")] = 0,
    days: Annotated[int | None, typer.Option(help="number of days (default: the preset's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE: override a world parameter of the preset (repeatable; "
                      "e.g. --set interest_persistence=0.97)")] = None,
):
    """Generate a synthetic RecFlow-shaped dataset (the embedded default)."""
    from fedpa.recdata.synth import generate, parse_overrides

    overrides = parse_overrides(preset, set_ or [])
    with progress_bar() as p:
        path = generate(preset, out_dir, seed=seed, days=days, overwrite=overwrite,
                        progress=day_progress(p, f"synth {preset}"), **overrides)
    _print_stats(path)


@data_app.command("import-recflow")
@user_errors
def data_import_recflow(
    src: Annotated[Path, typer.Argument(help="the RecFlow release directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
):
    """Convert the real RecFlow release (feather + pickles) day by day."""
    from fedpa.recdata.import_recflow import import_recflow

    with progress_bar() as p:
        path = import_recflow(src, out_dir, overwrite=overwrite, progress=day_progress(p, "import RecFlow"))
    _print_stats(path)


@data_app.command("import-movielens")
@user_errors
def data_import_movielens(
    src: Annotated[Path, typer.Argument(help="a MovieLens 100K or 1M directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    label: Annotated[str,
                     typer.Option(help="explicit (rating >= threshold) | implicit (every rating = 1)")] = "explicit",
    threshold: Annotated[int, typer.Option(help="rating at or above which explicit label is 1")] = 4,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
):
    """Convert a MovieLens 100K / 1M folder."""
    from fedpa.recdata.import_movielens import import_movielens

    with progress_bar() as p:
        path = import_movielens(src, out_dir, label=label, threshold=threshold, overwrite=overwrite,
                                progress=day_progress(p, "import MovieLens"))
    _print_stats(path)


@data_app.command("import-interactions")
@user_errors
def data_import_interactions(
    interactions: Annotated[Path, typer.Argument(help="interactions table (.csv, .tsv, .parquet or .jsonl; .gz too)")],
    out_dir: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    users: Annotated[Path | None, typer.Option(help="user-feature table (.csv, .tsv, .parquet or .jsonl)")] = None,
    items: Annotated[Path | None, typer.Option(help="item-feature table (.csv, .tsv, .parquet or .jsonl)")] = None,
    mapping: Annotated[Path | None,
                       typer.Option(help="TOML column mapping (see recdata/mappings/kuaisar-r.toml)")] = None,
    user_col: Annotated[str | None, typer.Option(help="user id column of the interactions")] = None,
    item_col: Annotated[str | None, typer.Option(help="item id column of the interactions")] = None,
    time_col: Annotated[str | None, typer.Option(help="timestamp column")] = None,
    time_unit: Annotated[str | None, typer.Option(help="ms | s | iso")] = None,
    label: Annotated[list[str] | None,
                     typer.Option(help="canonical=column (0/1 values), e.g. effective_view=is_click, or "
                                       "canonical=column>=value over a numeric column, e.g. "
                                       "effective_view=rating>=4 (repeatable)")] = None,
    implicit: Annotated[bool | None, typer.Option(help="every interaction is a positive of effective_view (a log of "
                                                      "reviews, plays or purchases: no label column)")] = None,
    positives_only: Annotated[bool, typer.Option(help="keep only the rows whose primary label is 1 (implicit "
                                                      "feedback, as PFedRec's protocol has it)")] = False,
    min_user_positives: Annotated[int, typer.Option(help="drop users with fewer positive rows")] = 0,
    min_item_positives: Annotated[int, typer.Option(help="drop items with fewer positive rows (with "
                                                         "--min-user-positives: a k-core, both bounds applied in "
                                                         "turn until they hold)")] = 0,
    interacted_only: Annotated[bool, typer.Option(help="users and items = those in the kept rows (the catalogue "
                                                       "sampled negatives come from)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
):
    """Convert a generic interaction log (+ optional user / item feature tables) with a column mapping."""
    from fedpa.recdata.import_interactions import Mapping, RowFilter, import_interactions

    for flag, value in (("--min-user-positives", min_user_positives), ("--min-item-positives", min_item_positives)):
        if value < 0:
            raise FedpaError(f"{flag} must be >= 0, got {value}")
    m = Mapping.from_toml(mapping) if mapping else Mapping()
    for attr, value in (("user", user_col), ("item", item_col), ("timestamp", time_col), ("time_unit", time_unit)):
        if value is not None:
            setattr(m, attr, value)
    if label:
        pairs = [x.split("=", 1) for x in label]
        if any(len(pair) != 2 or not all(pair) for pair in pairs):
            raise FedpaError(f"--label takes canonical=column (e.g. effective_view=is_click), got {label}")
        m.labels = dict(pairs)
    if implicit is not None:
        m.implicit = implicit
    m.validate()
    with progress_bar() as p:
        path = import_interactions(interactions, out_dir, m, users=users, items=items, overwrite=overwrite,
                                   progress=day_progress(p, "import interactions"),
                                   rows=RowFilter(positives_only, min_user_positives, interacted_only,
                                                  min_item_positives))
    _print_stats(path)


@data_app.command("inspect")
@user_errors
def data_inspect(
    path: Annotated[Path, typer.Argument(help="dataset directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
):
    """Print a dataset's statistics."""
    _print_stats(path, as_json)


def _print_stats(path: Path, as_json: bool = False) -> None:
    from fedpa.recdata.inspect import dataset_stats
    from fedpa.recdata.store import Dataset

    stats = dataset_stats(Dataset(path))
    if as_json:
        out.print_json(json.dumps(stats))
        return
    t = Table(title=f"dataset {stats['path']} ({stats['source']})", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("days", f"{stats['days']} ({stats['first_day']} .. {stats['last_day']})")
    for k in ("users", "users_with_exposures", "items", "requests", "exposures", "stage_samples", "history_views"):
        t.add_row(k.replace("_", " "), f"{stats[k]:,}")
    t.add_row("exposures / request", f"{stats['exposures_per_request']:.2f}")
    for s, c in stats["stage_samples_per_stage"].items():
        t.add_row(f"  {s}", f"{c:,} ({stats['stage_samples_per_request'][s]:.1f} / request)")
    for lab, r in stats["label_rates"].items():
        t.add_row(f"rate {lab}", "not observed" if r is None else f"{r:.4f}")
    for name, d in stats["domains"].items():
        rate = "-" if d["effective_view_rate"] is None else f"{d['effective_view_rate']:.4f}"
        t.add_row(f"domain {name}", f"{d['exposures']:,} exposures, {d['users']:,} users, effective views {rate}")
    q = stats["exposures_per_user_quantiles"]
    t.add_row("exposures / user", "  ".join(f"{k} {v:g}" for k, v in q.items()))
    out.print(t)
