"""`fedpa pretrain`: the foundation, pre-trained centrally on the open users."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedpa.foundation.errors import FedpaError
from fedpa.simulations.progress import progress_bar

from .common import app, out, user_errors


@app.command("pretrain")
@user_errors
def pretrain_cmd(
    data: Annotated[Path, typer.Option(help="dataset directory")] = Path("data/small"),
    out_dir: Annotated[Path, typer.Option("--out", help="checkpoint directory to write")] = Path("runs/foundation"),
    arch: Annotated[str, typer.Option(help="transformer | mlp (FedPA's released foundation)")] = "transformer",
    epochs: Annotated[int, typer.Option(help="at most this many passes over the open users' training rows")] = 20,
    patience: Annotated[int, typer.Option(help="stop after this many epochs without a better validation AUC "
                                               "(0 = train every epoch; the best epoch is kept either way)")] = 2,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 1024,
    split: Annotated[str, typer.Option(help="by-day | chrono | last | loo")] = "by-day",
    seed: Annotated[int, typer.Option(help="random seed; also picks the open/private users (a federation's "
                                           "partition-seed must be the same)")] = 0,
    user_encoder: Annotated[str, typer.Option(help="bert (self-attention over the history) | elastic (ELASTIC: "
                                                   "interest experts in linear time, an interest memory)")] = "bert",
    seq_len: Annotated[int, typer.Option(help="views per behaviour sequence (RecFlow keeps 50; ELASTIC reads "
                                              "1,000+ in linear time)")] = 50,
    graph_expansion: Annotated[int, typer.Option(help="fill up to this many empty history slots of a sparse user "
                                                      "with co-viewed items (MMBee's graph-guided interest "
                                                      "expansion; the graph is built from the open users' "
                                                      "training views and ships with the foundation; 0 = off)")] = 0,
    dropout: Annotated[str, typer.Option(help="dropout in the user encoder's hidden layers while it pre-trains "
                                              "(regularizes what it learns of the open users' histories): a rate "
                                              "in [0, 1), or auto: pre-train with 0 and with 0.3 and keep the "
                                              "better on the open users' validation AUC (twice the time)")] = "auto",
    domains: Annotated[str, typer.Option(help="in a dataset of several domains: pre-train on these domains' rows and "
                                              "sequences only (comma-separated names; '' = all)")] = "",
    activity_attribute: Annotated[str | None, typer.Option(help="profile attribute that marks highly active users "
                                                                "(default: the top 20% by exposures)")] = None,
    active_values: Annotated[str | None, typer.Option(help="comma-separated values of that attribute that count as "
                                                           "highly active")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when torch sees one) | cpu | cuda[:N]")] = "auto",
):
    """Pre-train the foundation on open users; report AUC/GAUC/LogLoss against popularity and untrained."""
    from fedpa.recdata.partition import PartitionConfig
    from fedpa.simulations.pretraining import pretrain_foundation

    partition = None
    if activity_attribute:
        try:
            values = tuple(int(v) for v in (active_values or "").split(",") if v.strip())
        except ValueError:
            raise FedpaError(f"--active-values must be comma-separated integers, got '{active_values}'") from None
        if not values:
            raise FedpaError("--activity-attribute needs --active-values (which values count as highly active)")
        partition = PartitionConfig(seed=seed, activity_attribute=activity_attribute, active_values=values)
    if epochs < 1:
        raise FedpaError(f"--epochs must be at least 1, got {epochs}")
    if patience < 0:
        raise FedpaError(f"--patience must be >= 0, got {patience}")
    if graph_expansion < 0:
        raise FedpaError(f"--graph-expansion must be >= 0, got {graph_expansion}")
    if seq_len < 1:
        raise FedpaError(f"--seq-len must be at least 1, got {seq_len}")
    if dropout != "auto":
        try:
            rate = float(dropout)
        except ValueError:
            raise FedpaError(f"--dropout must be auto or a rate in [0, 1), got '{dropout}'") from None
        if not 0.0 <= rate < 1.0:
            raise FedpaError(f"--dropout must be auto or a rate in [0, 1), got {dropout}")
        dropout = rate
    with progress_bar() as p:
        task = p.add_task("pretrain", total=None)

        def on_step(epoch, step, total, metrics):
            metrics = dict(metrics)
            which = f"dropout {metrics.pop('dropout'):g} " if "dropout" in metrics else ""
            p.update(task, completed=step, total=total,
                     description=f"pretrain {which}epoch {epoch + 1}/{epochs} " + " ".join(
                         f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

        report = pretrain_foundation(data, out_dir, arch=arch, epochs=epochs, patience=patience, lr=lr,
                                     batch_size=batch_size,
                                     seed=seed, split=split, partition=partition, progress=on_step,
                                     user_encoder=user_encoder, seq_len=seq_len, graph_expansion=graph_expansion,
                                     dropout=dropout, domains=domains, device=device)
    _print_pretrain(report)


def _print_pretrain(report: dict) -> None:
    ranked = any("hr@10" in m for rows in report["evaluation"].values() for m in rows.values())
    t = Table(title=f"foundation ({report['arch']}, {report['parameters']:,} parameters, "
                    f"{report['samples_per_second']:.0f} samples/s, best of {report.get('epochs_trained', '?')} "
                    f"epoch(s): {report['best_epoch'] + 1 if report['best_epoch'] is not None else '-'})")
    for c in ("held-out rows", "model", "AUC", "GAUC", "LogLoss", *(("HR@10", "NDCG@10") if ranked else ()), "n"):
        t.add_column(c)
    for split, rows in report["evaluation"].items():
        for name, m in rows.items():
            rank = (f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}") if ranked else ()
            t.add_row(split, name, f"{m['auc']:.4f}", f"{m['gauc']:.4f}", f"{m['logloss']:.4f}", *rank, f"{m['n']:,}")
    out.print(t)
    from fedpa.simulations.pretraining import dropout_choice

    chosen = dropout_choice(report)
    if chosen:
        out.print(f"dropout auto: {chosen}")
