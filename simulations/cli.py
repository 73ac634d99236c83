"""The `fedpa` command line."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from foundation.errors import FedpaError

app = typer.Typer(help="fedpa: federated personalization of recommenders with adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Create, import and inspect canonical datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=True)
out = Console()


def user_errors(fn):
    """Report a user's mistake as one clear line and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedpaError as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _day_progress(progress: Progress, what: str):
    task = progress.add_task(what, total=None)

    def update(label: str, done: int, total: int) -> None:
        progress.update(task, description=f"{what}: {label}", completed=done, total=total)

    return update


# ----------------------------------------------------------------------------- data


@data_app.command("synth")
@user_errors
def data_synth(
    preset: Annotated[str, typer.Option(help="tiny | small | recflow")] = "small",
    out_dir: Annotated[Path, typer.Option("--out", help="dataset directory to write")] = Path("data/small"),
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bytes)")] = 0,
    days: Annotated[int | None, typer.Option(help="number of days (default: the preset's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
):
    """Generate a synthetic RecFlow-shaped dataset (the embedded default)."""
    from simulations.data.synth import generate

    with progress_bar() as p:
        path = generate(preset, out_dir, seed=seed, days=days, overwrite=overwrite,
                        progress=_day_progress(p, f"synth {preset}"))
    _print_stats(path)


@data_app.command("import-recflow")
@user_errors
def data_import_recflow(
    src: Annotated[Path, typer.Argument(help="the RecFlow release directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
):
    """Convert the real RecFlow release (feather + pickles) day by day."""
    from simulations.data.import_recflow import import_recflow

    with progress_bar() as p:
        path = import_recflow(src, out_dir, overwrite=overwrite, progress=_day_progress(p, "import RecFlow"))
    _print_stats(path)


@data_app.command("import-movielens")
@user_errors
def data_import_movielens(
    src: Annotated[Path, typer.Argument(help="a MovieLens 100K or 1M directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    label: Annotated[str, typer.Option(help="explicit (rating >= threshold) | implicit (every rating = 1)")] = "explicit",
    threshold: Annotated[int, typer.Option(help="rating at or above which explicit label is 1")] = 4,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
):
    """Convert a MovieLens 100K / 1M folder."""
    from simulations.data.import_movielens import import_movielens

    with progress_bar() as p:
        path = import_movielens(src, out_dir, label=label, threshold=threshold, overwrite=overwrite,
                                progress=_day_progress(p, "import MovieLens"))
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
    from simulations.data.inspect import dataset_stats
    from simulations.data.store import Dataset

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
    q = stats["exposures_per_user_quantiles"]
    t.add_row("exposures / user", "  ".join(f"{k} {v:g}" for k, v in q.items()))
    out.print(t)


if __name__ == "__main__":
    app()
