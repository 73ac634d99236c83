"""`fedpa demo`: the whole pipeline on the embedded default, ending in a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedpa.simulations.progress import console

from .common import app, out, user_errors


@app.command("demo")
@user_errors
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="where the demo writes everything")] = Path("runs/demo"),
    data: Annotated[Path, typer.Option(help="synthetic dataset directory (generated if missing)")] = Path("data/small"),
    rounds: Annotated[int, typer.Option(help="federated rounds per algorithm")] = 5,
    seeds: Annotated[int, typer.Option(help="seeds per algorithm")] = 1,
):
    """The whole pipeline on the embedded default: synthesize `small`, pre-train, compare FedPA with
    the baselines, and write a report."""
    from fedpa.simulations.demo import run_demo

    report = run_demo(out_dir, data, rounds=rounds, seeds=seeds, console=console)
    out.print(f"\n[bold green]report:[/] {report}")
