"""`fedpa demo`: the whole pipeline on the embedded default, ending in a report a person can read.

synthesize `small` → pre-train the foundation on open users → compare FedPA with
the baselines (same data, split and seeds) → ``OUT/report.md`` with the tables
and plots. Steps whose output already exists are reused, so a second run only
redoes what is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from fedpa.common.config import FederationConfig
from fedpa.recdata.inspect import dataset_stats
from fedpa.recdata.store import Dataset
from fedpa.recmodels.algorithms import COMPARED_BY_DEFAULT
from fedpa.recmodels.personalization import ALGORITHMS
from fedpa.simulations.compare import compare
from fedpa.simulations.html_report import markdown_page
from fedpa.simulations.progress import day_progress, progress_bar, round_progress

DEMO_ALGORITHMS = list(COMPARED_BY_DEFAULT)
# PFedRec's item step is lr x catalogue items x eta; its official eta (80) was set on catalogues of a few thousand
# items, and on `small`'s 100,000 it diverges (test AUC 0.68 after its first local fine-tune, 0.56 by round 5).
# Searched on `small`'s validation GAUC, seed 0 (docs/results.md, "PFedRec's η on `small`"):
# eta 80, 8, 0.8, 0.2, 0.08, 0.03, 0.008 gave 0.544, 0.539, 0.560, 0.569, 0.568, 0.565, 0.555.
DEMO_PFEDREC_ETA = 0.2
OFFICIAL_PFEDREC_ETA = FederationConfig().pfedrec_eta


def demo_config(data: Path, foundation: Path, rounds: int) -> FederationConfig:
    """The demo's federation: every private user is a client in every round (FedPA's protocol), one local
    epoch, by-day split (train on earlier days, validate and test on the last two). The published
    recommenders replace lr, batch and epochs by their official codes' (`Algorithm.recipe`)."""
    return FederationConfig(data_dir=str(data), foundation=str(foundation), num_rounds=rounds,
                            clients_per_round=1.0, local_epochs=1, lr=0.01, batch_size=64,
                            pfedrec_eta=DEMO_PFEDREC_ETA)


def run_demo(out: Path, data: Path, *, rounds: int = 8, seeds: int = 1, console: Console | None = None) -> Path:
    from fedpa.recdata.synth import generate
    from fedpa.simulations.pretraining import pretrain_foundation

    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}
    if not (data / "manifest.json").exists():
        console.print(f"[bold]1/3[/] synthesizing the `small` RecFlow world into {data}")
        with progress_bar() as p:
            generate("small", data, seed=0, progress=day_progress(p, "synth small"))
    else:
        console.print(f"[bold]1/3[/] using the dataset at {data}")
        stale = _stale_world(Dataset(data))
        if stale:
            console.print(f"[yellow]{data} was generated before the `small` preset changed ({stale}); its numbers "
                          f"will differ from the README's. Delete {data} and {out / 'foundation'} to regenerate.[/]")
    timings["data_s"] = time.time() - t0
    foundation = out / "foundation"
    report_file = foundation / "pretrain_report.json"
    t1 = time.time()
    if not report_file.exists():
        console.print("[bold]2/3[/] pre-training the foundation on open users")
        with progress_bar() as p:
            task = p.add_task("pretrain", total=None)
            pretrain_foundation(data, foundation, epochs=1, batch_size=1024, dropout="auto",   # as `fedpa pretrain`
                                progress=lambda e, s, tot, m: p.update(
                                    task, completed=s, total=tot, description=f"pretrain (dropout {m['dropout']:g})"))
    else:
        console.print(f"[bold]2/3[/] using the foundation at {foundation}")
    timings["pretrain_s"] = time.time() - t1
    pre = json.loads(report_file.read_text())
    console.print(f"[bold]3/3[/] federated personalization: {', '.join(DEMO_ALGORITHMS)} ({rounds} rounds, "
                  f"{seeds} seed(s))")
    t2 = time.time()
    base = demo_config(data, foundation, rounds)
    with progress_bar() as p:
        state = {}

        def on_start(variant, seed):
            if "task" in state:
                p.remove_task(state["task"])
            state["update"] = round_progress(p, f"{variant} seed {seed}", rounds)
            state["task"] = p.task_ids[-1]

        result = compare(base, DEMO_ALGORITHMS, list(range(seeds)), out / "compare", on_start=on_start,
                         progress=lambda *a: state["update"](*a))
    timings["compare_s"] = time.time() - t2
    timings["total_s"] = time.time() - t0
    path = write_report(out, Dataset(data), pre, result, base, timings)
    return path


def _stale_world(ds: Dataset) -> str:
    """How a reused `small` dataset differs from the preset as defined now ("" = it does not)."""
    from fedpa.recdata.synth import preset_differences

    return ", ".join(f"{k} {mine} here, {now} now"
                     for k, (mine, now) in preset_differences(ds.manifest, "small").items())


def _dropout_line(pre: dict) -> list[str]:
    from fedpa.simulations.pretraining import dropout_choice

    chosen = dropout_choice(pre)   # None: a foundation pre-trained at one rate
    return [f"Dropout in the user encoder: {chosen}."] if chosen else []


def write_report(out: Path, ds: Dataset, pre: dict, result: dict, base: FederationConfig, timings: dict) -> Path:
    stats = dataset_stats(ds)
    stale = _stale_world(ds)
    table = result["table"]
    lines = [
        "# fedpa demo report", "",
        "Federated personalization of a frozen recommender with adapters, on the synthetic RecFlow world "
        "(`small` preset). Every number below was computed by this run; the raw data is next to this file.", "",
        "## 1. Data", "",
        f"- {stats['users']:,} users, {stats['items']:,} items, {stats['days']} days "
        f"({stats['first_day']} … {stats['last_day']}), {stats['requests']:,} requests, "
        f"{stats['exposures']:,} exposures ({stats['exposures_per_request']:.2f} per request), "
        f"{stats['stage_samples']:,} funnel stage samples.",
        f"- effective-view rate {stats['label_rates']['effective_view']:.3f}; "
        f"exposures per user: median {stats['exposures_per_user_quantiles']['p50']:.0f}, "
        f"p90 {stats['exposures_per_user_quantiles']['p90']:.0f}.",
        f"- Split: train on the first {stats['days'] - 2} days, validate on day {stats['days'] - 1}, "
        f"test on day {stats['days']} (RecFlow's protocol). Open users (FedPA's rule: 80% of the 20% most active "
        f"users + 20% of the rest): {pre['open_users']:,}; private users, one federated client each: "
        f"{pre['private_users']:,}.",
        *([f"- **This dataset predates the current `small` preset** ({stale}): regenerate it for the README's "
           "numbers."] if stale else []), "",
        "## 2. Foundation (pre-trained centrally on open users only, then frozen)", "",
        f"{pre['parameters']:,} parameters ({pre['arch']}); {pre['train_rows']:,} training rows, "
        f"{pre['samples_per_second']:.0f} samples/s, {pre['train_seconds']:.0f} s.", *_dropout_line(pre), "",
        "| held-out rows | model | AUC | GAUC | LogLoss |", "|---|---|---|---|---|",
    ]
    for split, rows in pre["evaluation"].items():
        for name, m in rows.items():
            lines.append(f"| {split} | {name} | {m['auc']:.4f} | {m['gauc']:.4f} | {m['logloss']:.4f} |")
    lines += [
        "", "*AUC* pools all test rows; *GAUC* is the mean of per-user AUCs (users with both classes): it measures "
        "how well each user's own items are ordered, which is what personalization should improve.", "",
        "## 3. Federated personalization", "",
        f"{base.num_rounds} rounds, every client every round, {base.local_epochs} local epoch (Adam, lr {base.lr}, "
        f"batch {base.batch_size}), adapter rank {base.rank}. The published recommenders without a foundation "
        f"(fedmf, pfedrec, fedrap) train with their official codes' settings"
        + (f", except PFedRec's item-step factor η = {base.pfedrec_eta:g}, searched on this world's validation (its "
           f"official {OFFICIAL_PFEDREC_ETA:g} diverges on a catalogue of {stats['items']:,} items)"
           if base.pfedrec_eta != OFFICIAL_PFEDREC_ETA else "")
        + ". Test metrics at each run's best validation round (mean ± std over seeds).", "",
        result["markdown"], "",
        "![comparison](compare/compare.png)", "",
        "The same as one page (tables, curves, who gains and who loses per user, the configuration): "
        "[compare/compare.html](compare/compare.html).", "",
        "![FedPA learning curves](compare/fedpa/seed-0/curves.png)", "",
        *_per_user_section(result, out),
        "### What each algorithm is", "",
    ]
    for name in table:
        a = ALGORITHMS.get(name)
        lines.append(f"- **{name}**: {a.description if a else name}.")
    fedpa = table.get("fedpa")
    if fedpa:
        others = {n: r for n, r in table.items() if n not in ("fedpa", "centralized")}
        beaten = [n for n, r in others.items() if fedpa["gauc"][0] >= r["gauc"][0]]
        lines += ["", f"FedPA's test GAUC {fedpa['gauc'][0]:.4f} is at least that of {len(beaten)} of the "
                  f"{len(others)} federated/local baselines"
                  + (f" (not: {', '.join(sorted(set(others) - set(beaten)))})"
                     if len(beaten) < len(others) else "") + ".",
                  f"FedPA shares {fedpa['shared_params']:,} parameters per round "
                  f"({fedpa['bytes_up_per_client_round'] / 1024:.1f} KB up per client) and keeps "
                  f"{fedpa['private_params_per_user']:,} private parameters per user; the frozen foundation has "
                  f"{fedpa['foundation_params']:,}."]
    lines += ["", "## 4. Time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k.removesuffix('_s')} | {v:.0f} |" for k, v in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    markdown_page(path.read_text(), out, "fedpa demo report", out / "report.html")   # the same, one page
    return path


def _per_user_section(result: dict, out: Path) -> list[str]:
    """Who gains and who loses against the frozen foundation, overall and by activity group."""
    if not (out / "compare" / "per_user.png").exists():
        return []
    lines = ["### Who gains, who loses", "",
             "Each user's own test AUC minus the frozen foundation's on the same rows (first seed; red: the user "
             "loses). Counted on the nodes and summed: the server sees no user's value.", "",
             "![per-user change](compare/per_user.png)", ""]
    if result.get("by_activity_markdown"):
        lines += ["By activity (how many rows the user trained on, mean over seeds):", "",
                  result["by_activity_markdown"], "",
                  "![by activity](compare/per_user_by_activity.png)", ""]
    return lines
