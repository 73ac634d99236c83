"""`fedpa funnel`: train the funnel's stage heads over the frozen foundation and run the funnel."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedpa.foundation.errors import FedpaError
from fedpa.simulations.progress import console, progress_bar

from .common import app, user_errors


@app.command("funnel")
@user_errors
def funnel_cmd(
    data: Annotated[str, typer.Option(
        help="dataset directory (at least 2 days: training days, then the test day)")] = "data/small",
    foundation: Annotated[str, typer.Option(help="foundation checkpoint directory")] = "runs/foundation",
    out: Annotated[str,
                   typer.Option(help="directory to write (config.json, metrics.json, funnel.png, models/; "
                                     "ablation.json)")] = "runs/funnel",
    stage_samples: Annotated[bool, typer.Option("--stage-samples/--no-stage-samples",
                                                help="train the stages with RecFlow's stage samples")] = True,
    rerank: Annotated[str, typer.Option(help="cdm (CDM student) | mmr (greedy MMR baseline)")] = "cdm",
    interests: Annotated[int, typer.Option(help="retrieval user vectors (1, or K > 1 for multi-interest)")] = 1,
    train_requests: Annotated[int, typer.Option(help="training requests (sampled from the training days)")] = 4000,
    test_requests: Annotated[int, typer.Option(help="test-day requests run through the funnel")] = 1500,
    epochs: Annotated[int, typer.Option(help="epochs per stage")] = 2,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    ablation_seeds: Annotated[int,
                              typer.Option(help="> 0: the stage-sample ablation (with / without) over this many "
                                                "seeds")] = 0,
):
    """Train retrieval, pre-ranking, HoME ranking and CDM re-ranking over the frozen foundation; run the funnel."""
    from fedpa.simulations.funnel import FunnelConfig, run_funnel_experiment, stage_ablation

    for name, v in (("--train-requests", train_requests), ("--test-requests", test_requests), ("--epochs", epochs),
                    ("--interests", interests)):
        if v < 1:
            raise FedpaError(f"{name} must be >= 1, got {v}")
    for path, what in ((data, "dataset"), (foundation, "foundation")):
        if not Path(path).exists():
            raise FedpaError(f"{path}: no such {what} directory")
    cfg = FunnelConfig(data_dir=data, foundation=foundation, out_dir=out, use_stage_samples=stage_samples,
                       rerank=rerank, interests=interests, train_requests=train_requests,
                       test_requests=test_requests, epochs=epochs, seed=seed)
    with progress_bar() as p:
        task = p.add_task("funnel", total=None)

        def progress(step: str, done: int, total: int) -> None:
            p.update(task, description=f"funnel: {step}", completed=done, total=total)

        if ablation_seeds:
            result = stage_ablation(cfg, list(range(ablation_seeds)), progress=progress)
        else:
            result = run_funnel_experiment(cfg, progress=progress)
    if ablation_seeds:
        t = Table(title=f"stage samples: with vs without ({ablation_seeds} seeds, mean ± std)")
        for col in ("metric", "with", "without"):
            t.add_column(col)
        for key, row in result["table"].items():
            t.add_row(key, *(f"{row[a]['mean']:.4f} ± {row[a]['std']:.4f}" for a in ("with", "without")))
        console.print(t)
        console.print(f"written: {Path(out) / 'ablation.json'}")
        return
    t = Table(title="funnel on the test day")
    t.add_column("stage")
    t.add_column("metric")
    t.add_column("value")
    for stage in ("retrieval", "prerank", "rank", "exposed"):
        for k, v in result[stage].items():
            t.add_row(stage, k, f"{v:.4f}" if isinstance(v, float) else str(v))
    for k, v in {**result["rerank"], **result["end_to_end"]}.items():
        t.add_row("re-rank / end to end", k, f"{v:.4f}")
    for task_name, m in result["ranking_tasks"].items():
        t.add_row("rank", f"{task_name} AUC / GAUC", f"{m['auc']:.4f} / {m['gauc']:.4f}")
    console.print(t)
    console.print(f"written: {Path(out) / 'metrics.json'} ({result['seconds']:.0f} s)")
