"""`fedpa simulate`: one federation on Flower's simulation runtime (or a personalized funnel with --stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedpa.common.config import FederationConfig
from fedpa.foundation.errors import FedpaError
from fedpa.simulations.progress import progress_bar, round_progress

from .common import Settings, app, config_options, out, print_summary, user_errors


@app.command("simulate")
@user_errors
@config_options()
def simulate_cmd(
    settings: Settings,
    cohort_size: Annotated[int, typer.Option(help="users per virtual SuperNode (0 = one node per CPU core; 1 = "
                                                  "Flower's stock one user per node)")] = 0,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory from its last checkpoint, with "
                                                     "its own configuration")] = None,
    stages: Annotated[str | None, typer.Option(help="personalize funnel stage heads instead of the foundation's "
                                                    "scorer: retrieval,prerank,rank or all (one federation per "
                                                    "stage, then the personalized funnel end to end)")] = None,
    funnel: Annotated[Path, typer.Option(help="with --stages: the `fedpa funnel` run whose trained heads are "
                                              "personalized")] = Path("runs/funnel"),
):
    """Run one federated simulation on Flower's simulation runtime; writes a run directory."""
    from fedpa.simulations.simulate import check_inputs, simulate

    if resume is not None:
        if settings.given:
            raise FedpaError(f"--resume continues a run with its own configuration; drop {', '.join(settings.given)}")
        cfg = FederationConfig.from_run_dir(resume)
        cfg.resume = True
        cfg.run_dir = str(resume)
        with progress_bar() as p:
            summary = simulate(cfg, cohort_size=cohort_size, progress=round_progress(p, cfg.algorithm, cfg.num_rounds))
        print_summary(summary, cfg.run_dir)
        return
    cfg = settings.resolve()
    check_inputs(cfg)
    if stages is not None:
        _simulate_stages(cfg, stages, funnel, cohort_size)
        return
    with progress_bar() as p:
        summary = simulate(cfg, cohort_size=cohort_size, progress=round_progress(p, cfg.algorithm, cfg.num_rounds))
    print_summary(summary, cfg.run_dir)


def _simulate_stages(cfg: FederationConfig, stages: str, funnel: Path, cohort_size: int) -> None:
    from fedpa.simulations.stage_federation import parse_stages, simulate_stages, stages_markdown

    names = parse_stages(stages)
    with progress_bar() as p:
        state = {}

        def on_stage(stage: str) -> None:
            if stage == "funnel":
                p.add_task("personalized funnel end to end", total=None)
            else:
                state["progress"] = round_progress(p, f"{cfg.algorithm} {stage}", cfg.num_rounds)

        result = simulate_stages(cfg, names, funnel, cohort_size=cohort_size, on_stage=on_stage,
                                 progress=lambda *a: state["progress"](*a))
    out.print(stages_markdown({cfg.algorithm: [result]}))
    out.print(f"run directory: [bold]{cfg.run_dir}[/] (stages.md, stages.json, one run directory per stage)")
