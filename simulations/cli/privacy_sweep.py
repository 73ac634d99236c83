"""`fedpa privacy-sweep`: the privacy–utility trade-off over a grid of noise, clip and SecAgg."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedpa.foundation.errors import FedpaError
from fedpa.simulations.progress import progress_bar, round_progress

from .common import Settings, app, config_options, out, user_errors


@app.command("privacy-sweep")
@user_errors
@config_options(exclude=("dp-noise-multiplier", "dp-clip", "dp-mode", "secagg", "seed", "run-dir"))
def privacy_sweep_cmd(
    settings: Settings,
    noise: Annotated[str, typer.Option(help="comma-separated noise multipliers z (0 = no DP)")] = "0,0.5,1,2",
    clip: Annotated[str, typer.Option(help="comma-separated clip norms C")] = "0.5",
    secagg: Annotated[str, typer.Option(help="off, on or off,on")] = "off,on",
    dp_mode: Annotated[str, typer.Option(help="auto (distributed with SecAgg, central without) | central | "
                                              "distributed | local")] = "auto",
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1")] = 1,
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the runs, table, plots and report")] = Path(
        "runs/privacy-sweep"),
    attack_targets: Annotated[int, typer.Option(help="users attacked by the update attack per run")] = 64,
    cohort_size: Annotated[int, typer.Option(help="users per virtual SuperNode (0 = default)")] = 0,
):
    """Privacy–utility trade-off: a grid over z, C and SecAgg; a table with ε, utility, attack AUCs and
    bytes; plots of utility and attack success against ε; a report in plain words."""
    from fedpa.simulations.privacy_sweep import make_grid, privacy_sweep

    if seeds < 1:
        raise FedpaError(f"--seeds must be at least 1, got {seeds}")
    if dp_mode not in ("auto", "central", "distributed", "local"):
        raise FedpaError(f"--dp-mode must be auto, central, distributed or local, got '{dp_mode}'")
    flags = {"off": False, "on": True}
    try:
        zs = [float(v) for v in noise.split(",") if v.strip()]
        cs = [float(v) for v in clip.split(",") if v.strip()]
        sa = [flags[v.strip()] for v in secagg.split(",") if v.strip()]
        points = make_grid(zs, cs, sa, dp_mode)
    except (KeyError, ValueError) as e:
        raise FedpaError(f"bad grid (--noise '{noise}', --clip '{clip}', --secagg '{secagg}'): {e}") from None
    if not points:
        raise FedpaError("the grid is empty (distributed noise needs --secagg on)")
    # the update attack replays rounds without FedPA's item-side tables (their per-row counts already name the
    # items a user read): the sweep runs the recipe without them unless they are asked for
    cfg = settings.resolve(item_side=not attack_targets)
    with progress_bar() as p:
        overall = p.add_task("privacy sweep", total=len(points) * seeds)
        state = {"task": None}

        def on_start(point, seed):
            if state["task"] is not None:
                p.advance(overall)
            state["progress"] = round_progress(p, f"{point.name} seed {seed}", cfg.num_rounds)
            state["task"] = p.task_ids[-1]

        result = privacy_sweep(cfg, points, list(range(seeds)), out_dir, cohort_size=cohort_size,
                               attack_targets=attack_targets, on_start=on_start,
                               progress=lambda *a: state["progress"](*a))
        p.advance(overall)
    out.print(result["markdown"])
    out.print(f"page: [bold]{out_dir / 'sweep.html'}[/]  report: [bold]{out_dir / 'report.md'}[/]  plots: "
              f"[bold]{out_dir}/utility_vs_epsilon.png, attack_vs_epsilon.png[/]")
