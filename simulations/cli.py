"""The `fedpa` command line."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpa.foundation.errors import FedpaError

if TYPE_CHECKING:
    from fedpa.common.config import FederationConfig

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
            console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
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
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE: override a world parameter of the preset (repeatable; "
                      "e.g. --set interest_persistence=0.97)")] = None,
):
    """Generate a synthetic RecFlow-shaped dataset (the embedded default)."""
    from fedpa.recdata.synth import generate, parse_overrides

    overrides = parse_overrides(preset, set_ or [])
    with progress_bar() as p:
        path = generate(preset, out_dir, seed=seed, days=days, overwrite=overwrite,
                        progress=_day_progress(p, f"synth {preset}"), **overrides)
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
    from fedpa.recdata.import_movielens import import_movielens

    with progress_bar() as p:
        path = import_movielens(src, out_dir, label=label, threshold=threshold, overwrite=overwrite,
                                progress=_day_progress(p, "import MovieLens"))
    _print_stats(path)


@data_app.command("import-interactions")
@user_errors
def data_import_interactions(
    interactions: Annotated[Path, typer.Argument(help="interactions table (.csv or .parquet)")],
    out_dir: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    users: Annotated[Path | None, typer.Option(help="user-feature table (.csv or .parquet)")] = None,
    items: Annotated[Path | None, typer.Option(help="item-feature table (.csv or .parquet)")] = None,
    mapping: Annotated[Path | None, typer.Option(help="TOML column mapping (see recdata/mappings/kuaisar-r.toml)")] = None,
    user_col: Annotated[str | None, typer.Option(help="user id column of the interactions")] = None,
    item_col: Annotated[str | None, typer.Option(help="item id column of the interactions")] = None,
    time_col: Annotated[str | None, typer.Option(help="timestamp column")] = None,
    time_unit: Annotated[str | None, typer.Option(help="ms | s | iso")] = None,
    label: Annotated[list[str] | None, typer.Option(help="canonical=column, e.g. effective_view=is_click (repeatable)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
):
    """Convert a generic interaction log (+ optional user / item feature tables) with a column mapping."""
    from fedpa.recdata.import_interactions import Mapping, import_interactions

    m = Mapping.from_toml(mapping) if mapping else Mapping()
    for attr, value in (("user", user_col), ("item", item_col), ("timestamp", time_col), ("time_unit", time_unit)):
        if value is not None:
            setattr(m, attr, value)
    if label:
        pairs = [x.split("=", 1) for x in label]
        if any(len(pair) != 2 or not all(pair) for pair in pairs):
            raise FedpaError(f"--label takes canonical=column (e.g. effective_view=is_click), got {label}")
        m.labels = dict(pairs)
    with progress_bar() as p:
        path = import_interactions(interactions, out_dir, m, users=users, items=items, overwrite=overwrite,
                                   progress=_day_progress(p, "import interactions"))
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
    q = stats["exposures_per_user_quantiles"]
    t.add_row("exposures / user", "  ".join(f"{k} {v:g}" for k, v in q.items()))
    out.print(t)


# ----------------------------------------------------------------------------- models and federations


def _federation_config(config_file: Path | None, overrides: dict) -> "FederationConfig":
    import tomllib

    from fedpa.common.config import FederationConfig

    base: dict = {}
    if config_file is not None:
        if not config_file.exists():
            raise FedpaError(f"{config_file}: no such configuration file")
        try:
            base = tomllib.loads(config_file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise FedpaError(f"{config_file}: not valid TOML ({e})") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    return FederationConfig.from_run_config({**base, **{k.replace("_", "-"): v for k, v in given.items()}})


def _round_progress(progress: Progress, label: str, total: int):
    task = progress.add_task(label, total=total)

    def update(r: int, rounds: int, ev) -> None:
        extra = ""
        if ev:
            v = ev.get("val", {})
            extra = "  ".join(f"val {k} {v[k]:.4f}" for k in ("auc", "gauc", "hr@10") if k in v and v[k] == v[k])
        progress.update(task, completed=r, total=rounds, description=f"{label} {extra}")

    return update


@app.command("pretrain")
@user_errors
def pretrain_cmd(
    data: Annotated[Path, typer.Option(help="dataset directory")] = Path("data/small"),
    out_dir: Annotated[Path, typer.Option("--out", help="checkpoint directory to write")] = Path("runs/foundation"),
    arch: Annotated[str, typer.Option(help="transformer | mlp (FedPA's released foundation)")] = "transformer",
    epochs: Annotated[int, typer.Option(help="passes over the open users' training rows")] = 1,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 1024,
    split: Annotated[str, typer.Option(help="by-day | chrono | last | loo")] = "by-day",
    seed: Annotated[int, typer.Option(help="random seed; also picks the open/private users (a federation's "
                                           "partition-seed must be the same)")] = 0,
    activity_attribute: Annotated[str | None, typer.Option(help="profile attribute that marks highly active users "
                                                                "(default: the top 20% by exposures)")] = None,
    active_values: Annotated[str | None, typer.Option(help="comma-separated values of that attribute that count as "
                                                           "highly active")] = None,
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
    with progress_bar() as p:
        task = p.add_task("pretrain", total=None)

        def on_step(epoch, step, total, metrics):
            p.update(task, completed=step, total=total,
                     description=f"pretrain epoch {epoch + 1}/{epochs} " + " ".join(
                         f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

        report = pretrain_foundation(data, out_dir, arch=arch, epochs=epochs, lr=lr, batch_size=batch_size,
                                     seed=seed, split=split, partition=partition, progress=on_step)
    _print_pretrain(report)


def _print_pretrain(report: dict) -> None:
    t = Table(title=f"foundation ({report['arch']}, {report['parameters']:,} parameters, "
                    f"{report['samples_per_second']:.0f} samples/s)")
    for c in ("held-out rows", "model", "AUC", "GAUC", "LogLoss", "n"):
        t.add_column(c)
    for split, rows in report["evaluation"].items():
        for name, m in rows.items():
            t.add_row(split, name, f"{m['auc']:.4f}", f"{m['gauc']:.4f}", f"{m['logloss']:.4f}", f"{m['n']:,}")
    out.print(t)


@app.command("simulate")
@user_errors
def simulate_cmd(
    config: Annotated[Path | None, typer.Option(help="TOML file with federation settings (keys as in pyproject's [tool.flwr.app.config])")] = None,
    data: Annotated[str | None, typer.Option(help="dataset directory")] = None,
    foundation: Annotated[str | None, typer.Option(help="foundation checkpoint directory")] = None,
    run_dir: Annotated[str | None, typer.Option(help="run directory to write")] = None,
    algorithm: Annotated[str | None, typer.Option(help="fedpa | local | fedavg-lora | fedper | pfedrec | ditto | foundation | centralized")] = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds")] = None,
    clients_per_round: Annotated[float | None, typer.Option(help="fraction (<=1) or count (>1) of clients per round")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="local epochs per round")] = None,
    lr: Annotated[float | None, typer.Option(help="local learning rate")] = None,
    lr_decay: Annotated[float | None, typer.Option(help="round r trains at lr * lr-decay^(r-1) (1 = constant)")] = None,
    rank: Annotated[int | None, typer.Option(help="adapter rank")] = None,
    group_attributes: Annotated[str | None, typer.Option(help="comma-separated profile fields with group adapters")] = None,
    split: Annotated[str | None, typer.Option(help="by-day | chrono | loo | last")] = None,
    max_clients: Annotated[int | None, typer.Option(help="use at most this many private users (0 = all)")] = None,
    federate_open_users: Annotated[bool | None, typer.Option("--federate-open-users/--private-users-only", help="open users (the foundation's pre-training users) join the federation as clients too, as MRFF's protocol has it")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    secagg: Annotated[bool | None, typer.Option("--secagg/--no-secagg", help="SecAgg+ over the nodes' updates (needs >= 3 nodes)")] = None,
    dp_noise_multiplier: Annotated[float | None, typer.Option(help="client-level DP noise multiplier z (0 = off)")] = None,
    dp_clip: Annotated[float | None, typer.Option(help="L2 bound C of one user's shared update")] = None,
    dp_mode: Annotated[str | None, typer.Option(help="where DP noise is added: central (server) | distributed (clients, needs --secagg) | local")] = None,
    dp_max_epsilon: Annotated[float | None, typer.Option(help="privacy budget: stop before exceeding it (0 = none)")] = None,
    cohort_size: Annotated[int, typer.Option(help="users per virtual SuperNode (0 = one node per CPU core; 1 = Flower's stock one user per node)")] = 0,
    cohort_engine: Annotated[str | None, typer.Option(help="how a node trains its cohort: vectorized (all users at once) | loop (one after another)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory from its last checkpoint, with its own configuration")] = None,
    stages: Annotated[str | None, typer.Option(help="personalize funnel stage heads instead of the foundation's scorer: retrieval,prerank,rank or all (one federation per stage, then the personalized funnel end to end)")] = None,
    funnel: Annotated[Path, typer.Option(help="with --stages: the `fedpa funnel` run whose trained heads are personalized")] = Path("runs/funnel"),
):
    """Run one federated simulation on Flower's simulation runtime; writes a run directory."""
    given = [k for k, v in locals().items() if k not in ("resume", "cohort_size", "stages", "funnel") and v is not None]
    from fedpa.common.config import FederationConfig
    from fedpa.simulations.simulate import check_inputs, simulate

    if resume is not None:
        if given:
            raise FedpaError(f"--resume continues a run with its own configuration; drop {', '.join('--' + g.replace('_', '-') for g in given)}")
        cfg = FederationConfig.from_run_dir(resume)
        cfg.resume = True
        cfg.run_dir = str(resume)
        with progress_bar() as p:
            summary = simulate(cfg, cohort_size=cohort_size, progress=_round_progress(p, cfg.algorithm, cfg.num_rounds))
        _print_summary(summary, cfg.run_dir)
        return
    cfg = _federation_config(config, dict(data_dir=data, foundation=foundation, run_dir=run_dir, algorithm=algorithm,
                                          num_rounds=rounds, clients_per_round=clients_per_round,
                                          local_epochs=local_epochs, lr=lr, lr_decay=lr_decay, rank=rank,
                                          group_attributes=group_attributes, split=split, max_clients=max_clients,
                                          federate_open_users=federate_open_users, seed=seed, secagg=secagg, dp_noise_multiplier=dp_noise_multiplier,
                                          dp_clip=dp_clip, dp_mode=dp_mode, dp_max_epsilon=dp_max_epsilon,
                                          cohort_engine=cohort_engine))
    check_inputs(cfg)
    if stages is not None:
        _simulate_stages(cfg, stages, funnel, cohort_size)
        return
    with progress_bar() as p:
        summary = simulate(cfg, cohort_size=cohort_size, progress=_round_progress(p, cfg.algorithm, cfg.num_rounds))
    _print_summary(summary, cfg.run_dir)


def _simulate_stages(cfg, stages: str, funnel: Path, cohort_size: int) -> None:
    from fedpa.simulations.stage_federation import parse_stages, simulate_stages

    names = parse_stages(stages)
    with progress_bar() as p:
        state = {}

        def on_stage(stage: str) -> None:
            if stage == "funnel":
                p.add_task("personalized funnel end to end", total=None)
            else:
                state["progress"] = _round_progress(p, f"{cfg.algorithm} {stage}", cfg.num_rounds)

        result = simulate_stages(cfg, names, funnel, cohort_size=cohort_size, on_stage=on_stage,
                                 progress=lambda *a: state["progress"](*a))
    from fedpa.simulations.stage_federation import stages_markdown

    out.print(stages_markdown({cfg.algorithm: [result]}))
    out.print(f"run directory: [bold]{cfg.run_dir}[/] (stages.md, stages.json, one run directory per stage)")


def _print_summary(summary: dict, run_dir: str) -> None:
    t = Table(title=f"{summary['algorithm']}: test at best validation round {summary['best_round']}")
    t.add_column("metric")
    t.add_column("value")
    for k, v in summary["test"].items():
        whole = k in ("n", "gauc_users", "cases")
        t.add_row(k, f"{v:,.0f}" if whole else f"{v:.4f}" if isinstance(v, float) else str(v))
    t.add_row("bytes up / client / round", f"{summary['bytes_up_per_client_round']:,.0f}")
    t.add_row("bytes down / client / round", f"{summary['bytes_down_per_client_round']:,.0f}")
    t.add_row("seconds / round", f"{summary['seconds_per_round']:.2f}")
    mia = summary.get("membership_inference")
    if mia:
        t.add_row("membership-inference attack AUC", f"{mia['auc']:.4f} (0.5 = nothing learned; per user "
                                                     f"{mia['per_user_auc']:.4f})")
    dp = summary.get("differential_privacy")
    if dp:
        t.add_row("privacy", f"ε = {dp['epsilon']:.3f} at δ = {dp['delta']:.2g} ({dp.get('mode', 'central')}, "
                             f"z = {dp['noise_multiplier']}, "
                             f"C = {dp['clip']}, {dp['rounds_accounted']} rounds)")
    out.print(t)
    out.print(f"run directory: [bold]{run_dir}[/]")


@app.command("compare")
@user_errors
def compare_cmd(
    algorithms: Annotated[str, typer.Option(help="comma-separated algorithms / ablations (fedpa-user-only, fedpa-groups-only, fedpa-no-gate, fedpa-user-shift, fedpa-user-bias, fedpa-rankR)")] = "fedpa,local,fedavg-lora,fedper,pfedrec,ditto,foundation,centralized",
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1")] = 3,
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the runs and the table")] = Path("runs/compare"),
    config: Annotated[Path | None, typer.Option(help="TOML file with federation settings")] = None,
    data: Annotated[str | None, typer.Option(help="dataset directory")] = None,
    foundation: Annotated[str | None, typer.Option(help="foundation checkpoint directory")] = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds")] = None,
    clients_per_round: Annotated[float | None, typer.Option(help="fraction (<=1) or count (>1) of clients per round")] = None,
    split: Annotated[str | None, typer.Option(help="by-day | chrono | loo | last")] = None,
    max_clients: Annotated[int | None, typer.Option(help="use at most this many private users (0 = all)")] = None,
    federate_open_users: Annotated[bool | None, typer.Option("--federate-open-users/--private-users-only", help="open users (the foundation's pre-training users) join the federation as clients too, as MRFF's protocol has it")] = None,
    cohort_size: Annotated[int, typer.Option(help="users per virtual SuperNode (0 = one node per core)")] = 0,
    stages: Annotated[str | None, typer.Option(help="compare the personalized funnel instead: stages to federate (retrieval,prerank,rank or all)")] = None,
    funnel: Annotated[Path, typer.Option(help="with --stages: the `fedpa funnel` run whose trained heads are personalized")] = Path("runs/funnel"),
):
    """Run algorithms side by side on the same data, split and seeds; write a table and a plot."""
    from fedpa.simulations.compare import compare

    if seeds < 1:
        raise FedpaError(f"--seeds must be at least 1, got {seeds}")
    cfg = _federation_config(config, dict(data_dir=data, foundation=foundation, num_rounds=rounds,
                                          clients_per_round=clients_per_round, split=split, max_clients=max_clients,
                                          federate_open_users=federate_open_users))
    variants = [a.strip() for a in algorithms.split(",") if a.strip()]
    _check_variants(variants)
    if stages is not None:
        _compare_stages(cfg, variants, seeds, stages, funnel, out_dir, cohort_size)
        return
    with progress_bar() as p:
        overall = p.add_task("compare", total=len(variants) * seeds)
        state = {"task": None}

        def on_start(variant, seed):
            if state["task"] is not None:  # keep one line per finished run, drop nothing
                p.advance(overall)
            state["progress"] = _round_progress(p, f"{variant} seed {seed}", cfg.num_rounds)
            state["task"] = p.task_ids[-1]

        result = compare(cfg, variants, list(range(seeds)), out_dir, cohort_size=cohort_size, on_start=on_start,
                         progress=lambda *a: state["progress"](*a))
        p.advance(overall)
    out.print(result["markdown"])
    out.print(f"table: [bold]{out_dir / 'compare.md'}[/]  plot: [bold]{out_dir / 'compare.png'}[/]")


def _compare_stages(cfg, variants: list[str], seeds: int, stages: str, funnel: Path, out_dir: Path,
                    cohort_size: int) -> None:
    from fedpa.recmodels.personalization import ALGORITHMS
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
                state["progress"] = _round_progress(p, f"{variant} seed {seed} {stage}", cfg.num_rounds)

        result = compare_stages(cfg, variants, list(range(seeds)), names, funnel, out_dir, cohort_size=cohort_size,
                                on_start=on_start, progress=lambda *a: state["progress"](*a))
    out.print(result["markdown"])
    out.print(f"table: [bold]{out_dir / 'stages.md'}[/]  plot: [bold]{out_dir / 'stages.png'}[/]")


def _check_variants(variants: list[str]) -> None:
    from fedpa.recmodels.personalization import ALGORITHMS
    from fedpa.simulations.compare import ABLATIONS

    for v in variants:
        ok = v in ALGORITHMS or v in ABLATIONS or (v.startswith("fedpa-rank") and v.removeprefix("fedpa-rank").isdigit())
        if not ok:
            raise FedpaError(f"unknown algorithm or ablation '{v}' (algorithms: {', '.join(ALGORITHMS)}; "
                             f"ablations: {', '.join(ABLATIONS)}, fedpa-rankR)")


@app.command("privacy-sweep")
@user_errors
def privacy_sweep_cmd(
    noise: Annotated[str, typer.Option(help="comma-separated noise multipliers z (0 = no DP)")] = "0,0.5,1,2",
    clip: Annotated[str, typer.Option(help="comma-separated clip norms C")] = "0.5",
    secagg: Annotated[str, typer.Option(help="off, on or off,on")] = "off,on",
    dp_mode: Annotated[str, typer.Option(help="auto (distributed with SecAgg, central without) | central | distributed | local")] = "auto",
    algorithm: Annotated[str, typer.Option(help="the algorithm to evaluate")] = "fedpa",
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1")] = 1,
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the runs, table, plots and report")] = Path("runs/privacy-sweep"),
    config: Annotated[Path | None, typer.Option(help="TOML file with federation settings")] = None,
    data: Annotated[str | None, typer.Option(help="dataset directory")] = None,
    foundation: Annotated[str | None, typer.Option(help="foundation checkpoint directory")] = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds")] = None,
    clients_per_round: Annotated[float | None, typer.Option(help="fraction (<=1) or count (>1) of clients per round")] = None,
    eval_every: Annotated[int | None, typer.Option(help="evaluate every N rounds (and after the last)")] = None,
    split: Annotated[str | None, typer.Option(help="by-day | chrono | loo | last")] = None,
    max_clients: Annotated[int | None, typer.Option(help="use at most this many private users (0 = all)")] = None,
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
    cfg = _federation_config(config, dict(data_dir=data, foundation=foundation, num_rounds=rounds, algorithm=algorithm,
                                          clients_per_round=clients_per_round, split=split, max_clients=max_clients,
                                          eval_every=eval_every))
    with progress_bar() as p:
        overall = p.add_task("privacy sweep", total=len(points) * seeds)
        state = {"task": None}

        def on_start(point, seed):
            if state["task"] is not None:
                p.advance(overall)
            state["progress"] = _round_progress(p, f"{point.name} seed {seed}", cfg.num_rounds)
            state["task"] = p.task_ids[-1]

        result = privacy_sweep(cfg, points, list(range(seeds)), out_dir, cohort_size=cohort_size,
                               attack_targets=attack_targets, on_start=on_start,
                               progress=lambda *a: state["progress"](*a))
        p.advance(overall)
    out.print(result["markdown"])
    out.print(f"report: [bold]{out_dir / 'report.md'}[/]  plots: [bold]{out_dir}/utility_vs_epsilon.png, "
              f"attack_vs_epsilon.png[/]")


@app.command("funnel")
@user_errors
def funnel_cmd(
    data: Annotated[str, typer.Option(help="dataset directory (at least 2 days: training days, then the test day)")] = "data/small",
    foundation: Annotated[str, typer.Option(help="foundation checkpoint directory")] = "runs/foundation",
    out: Annotated[str, typer.Option(help="directory to write (config.json, metrics.json, funnel.png, models/; ablation.json)")] = "runs/funnel",
    stage_samples: Annotated[bool, typer.Option("--stage-samples/--no-stage-samples", help="train the stages with RecFlow's stage samples")] = True,
    rerank: Annotated[str, typer.Option(help="cdm (CDM student) | mmr (greedy MMR baseline)")] = "cdm",
    interests: Annotated[int, typer.Option(help="retrieval user vectors (1, or K > 1 for multi-interest)")] = 1,
    train_requests: Annotated[int, typer.Option(help="training requests (sampled from the training days)")] = 4000,
    test_requests: Annotated[int, typer.Option(help="test-day requests run through the funnel")] = 1500,
    epochs: Annotated[int, typer.Option(help="epochs per stage")] = 2,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    ablation_seeds: Annotated[int, typer.Option(help="> 0: the stage-sample ablation (with / without) over this many seeds")] = 0,
):
    """Train retrieval, pre-ranking, HoME ranking and CDM re-ranking over the frozen foundation; run the funnel."""
    from fedpa.simulations.stages import FunnelConfig, run_funnel_experiment, stage_ablation

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


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Option("--run", help="the run directory (config + shared checkpoint)")],
    user: Annotated[int, typer.Option(help="the user id whose personalized model to export")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="output directory (default RUN/export/user-U)")] = None,
    store: Annotated[str | None, typer.Option(help="personal store directory (default: the run's personal-store)")] = None,
    key_file: Annotated[str | None, typer.Option(help="the store's key file (default: the run's, else $FEDPA_STORE_KEY)")] = None,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="also write an int8 model")] = True,
):
    """Merge a user's adapters into the foundation and write ONNX models (fp32, int8) for the device;
    parity with PyTorch is checked (<= 1e-4) before anything is kept."""
    from fedpa.simulations.export_user import export_user

    out_dir = out_dir or run_dir / "export" / f"user-{user}"
    report = export_user(run_dir, user, out_dir, store_dir=store, key_file=key_file, int8=int8)
    t = Table(title=f"user {user}: {report['algorithm']} exported")
    t.add_column("model")
    t.add_column("size")
    t.add_column("max |Δp|")
    t.add_column("120 candidates (1 thread)")
    for kind, ref in (("fp32", "vs PyTorch"), ("int8", "vs fp32")):
        if kind in report:
            r = report[kind]
            diff = r.get("max_abs_diff_vs_torch", r.get("max_abs_diff_vs_fp32"))
            t.add_row(Path(r["path"]).name, f"{r['bytes'] / 1024:.0f} KiB", f"{diff:.1e} {ref}",
                      f"{r['latency_120']['median_ms']:.2f} ms median")
    out.print(t)
    out.print(f"report: [bold]{out_dir / 'export.json'}[/]")


@app.command("deploy")
@user_errors
def deploy_cmd(
    nodes: Annotated[int, typer.Option(help="SuperNodes to start (node i serves partition i of N)")] = 3,
    workdir: Annotated[Path, typer.Option(help="certificates, keys, stores, logs and Flower's home")] = Path("runs/deploy"),
    config: Annotated[Path | None, typer.Option(help="TOML file with federation settings")] = None,
    data: Annotated[str | None, typer.Option(help="dataset directory")] = None,
    foundation: Annotated[str | None, typer.Option(help="foundation checkpoint directory")] = None,
    run_dir: Annotated[str | None, typer.Option(help="run directory (default WORKDIR/run)")] = None,
    algorithm: Annotated[str | None, typer.Option(help="the algorithm to run")] = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds")] = None,
    max_clients: Annotated[int | None, typer.Option(help="use at most this many private users (0 = all)")] = None,
    secagg: Annotated[bool, typer.Option("--secagg/--no-secagg", help="SecAgg+ between the SuperNodes")] = True,
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="TLS on the SuperLink (a CA made here)")] = True,
    auth: Annotated[bool, typer.Option("--auth/--no-auth", help="SuperNode authentication (registered keys only)")] = True,
    round_timeout: Annotated[float | None, typer.Option(help="seconds to wait for a round's replies")] = None,
    timeout: Annotated[float, typer.Option(help="give up on the run after this many seconds")] = 3600,
):
    """A real deployment on this machine: CA and keys, SuperLink with TLS and node authentication,
    N SuperNodes with their own encrypted stores, `flwr run`; everything on 127.0.0.1, stopped at the end."""
    from fedpa.simulations.deploy import deploy

    cfg = _federation_config(config, dict(data_dir=data, foundation=foundation, algorithm=algorithm, num_rounds=rounds,
                                          max_clients=max_clients, round_timeout=round_timeout, secagg=secagg))
    if secagg and nodes < 3:
        raise FedpaError(f"secure aggregation needs at least 3 SuperNodes, got --nodes {nodes} (or pass --no-secagg)")
    workdir = workdir.resolve()
    rc = cfg.to_run_config()
    rc.update({"data-dir": str(Path(cfg.data_dir).resolve()), "foundation": str(Path(cfg.foundation).resolve()),
               "run-dir": str(Path(run_dir).resolve() if run_dir else workdir / "run"), "feature-cache": "none"})
    from fedpa.simulations.simulate import check_inputs

    check_inputs(cfg)
    with progress_bar() as p:
        task = p.add_task(f"deployment: {nodes} SuperNodes", total=cfg.num_rounds)
        start = time.time()

        def on_poll(status):
            done = len((Path(rc["run-dir"]) / "metrics.jsonl").read_text().splitlines()) - 1 \
                if (Path(rc["run-dir"]) / "metrics.jsonl").exists() else 0
            p.update(task, completed=max(done, 0),
                     description=f"deployment: {nodes} SuperNodes, {status.get('status', '?')}, {time.time() - start:.0f}s")

        result = deploy(workdir=workdir, run_config=rc, nodes=nodes, tls=tls, auth=auth, timeout=timeout,
                        on_poll=on_poll)
    _print_summary(result["summary"], rc["run-dir"])
    out.print(f"SuperLink {result['superlink']} (TLS {'on' if tls else 'off'}, node auth {'on' if auth else 'off'}), "
              f"{nodes} SuperNodes; traffic {result['network_traffic']}; logs in [bold]{workdir / 'logs'}[/]")


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


if __name__ == "__main__":
    app()
