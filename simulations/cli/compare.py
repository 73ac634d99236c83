"""`fedpa compare`: algorithms side by side on the same data, split and seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedpa.common.config import FederationConfig
from fedpa.foundation.errors import FedpaError
from fedpa.recmodels.algorithms import COMPARED_BY_DEFAULT
from fedpa.simulations.progress import progress_bar, round_progress

from .common import Settings, app, check_variants, config_options, out, user_errors

DEFAULT_ALGORITHMS = ",".join(COMPARED_BY_DEFAULT)   # the algorithms `make demo` runs


@app.command("compare")
@user_errors
@config_options(exclude=("algorithm", "seed", "run-dir"))
def compare_cmd(
    settings: Settings,
    algorithms: Annotated[str, typer.Option(help="comma-separated algorithms and ablations (fedpa-release, "
                                                 "fedpa-no-item-embeddings, fedpa-no-popularity, fedpa-no-item-table, "
                                                 "fedpa-no-user-bias, "
                                                 "fedpa-no-decay, fedpa-no-scale, fedpa-video-table, "
                                                 "fedpa-adam-tables, fedpa-user-only, fedpa-groups-only, "
                                                 "fedpa-no-gate, fedpa-rankR)")] = DEFAULT_ALGORITHMS,
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1")] = 3,
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the runs and the table")] = Path("runs/compare"),
    cohort_size: Annotated[int, typer.Option(help="users per virtual SuperNode (0 = one node per core)")] = 0,
    stages: Annotated[str | None, typer.Option(help="compare the personalized funnel instead: stages to federate "
                                                    "(retrieval,prerank,rank or all)")] = None,
    funnel: Annotated[Path, typer.Option(help="with --stages: the `fedpa funnel` run whose trained heads are "
                                              "personalized")] = Path("runs/funnel"),
):
    """Run algorithms side by side on the same data, split and seeds; write a table and a plot."""
    from fedpa.simulations.compare import compare

    if seeds < 1:
        raise FedpaError(f"--seeds must be at least 1, got {seeds}")
    cfg = settings.resolve(recipe=False)  # each variant gets its algorithm's recipe in compare()
    variants = [a.strip() for a in algorithms.split(",") if a.strip()]
    check_variants(variants)
    if stages is not None:
        _compare_stages(cfg, variants, seeds, stages, funnel, out_dir, cohort_size)
        return
    with progress_bar() as p:
        overall = p.add_task("compare", total=len(variants) * seeds)
        state = {"task": None}

        def on_start(variant, seed):
            if state["task"] is not None:  # keep one line per finished run, drop nothing
                p.advance(overall)
            state["progress"] = round_progress(p, f"{variant} seed {seed}", cfg.num_rounds)
            state["task"] = p.task_ids[-1]

        result = compare(cfg, variants, list(range(seeds)), out_dir, cohort_size=cohort_size, on_start=on_start,
                         progress=lambda *a: state["progress"](*a), given=settings.keys)
        p.advance(overall)
    out.print(result["markdown"])
    out.print(f"page: [bold]{out_dir / 'compare.html'}[/]  table: [bold]{out_dir / 'compare.md'}[/]  "
              f"plot: [bold]{out_dir / 'compare.png'}[/]")


def _compare_stages(cfg: FederationConfig, variants: list[str], seeds: int, stages: str, funnel: Path,
                    out_dir: Path, cohort_size: int) -> None:
    from fedpa.recmodels.algorithms import ALGORITHMS
    from fedpa.simulations.stage_federation import compare_stages, parse_stages

    names = parse_stages(stages)
    ablations = [v for v in variants if v not in ALGORITHMS]
    if ablations:
        raise FedpaError(f"--stages compares algorithms; ablations ({', '.join(ablations)}) are for the single scorer")
    with progress_bar() as p:
        overall = p.add_task("compare stages", total=len(variants) * seeds * (len(names) + 1))
        state = {}

        def on_start(variant, seed, stage):
            p.advance(overall)
            if stage != "funnel":
                state["progress"] = round_progress(p, f"{variant} seed {seed} {stage}", cfg.num_rounds)

        result = compare_stages(cfg, variants, list(range(seeds)), names, funnel, out_dir, cohort_size=cohort_size,
                                on_start=on_start, progress=lambda *a: state["progress"](*a))
    out.print(result["markdown"])
    out.print(f"table: [bold]{out_dir / 'stages.md'}[/]  plot: [bold]{out_dir / 'stages.png'}[/]")
