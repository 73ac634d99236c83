"""`fedpa privacy-sweep`: the privacy–utility trade-off on one dataset, split and set of seeds.

Every grid point (noise multiplier z, clip norm C, secure aggregation on/off, DP mode) and seed is
an ordinary run directory ``OUT/POINT/seed-S`` (written by `simulations.simulate.simulate`); after
each run the update attack (`simulations.update_attack`) replays one round from the run's final
shared state. The sweep writes ``sweep.json`` and ``sweep.md`` (mean ± std over seeds),
``utility_vs_epsilon.png``, ``attack_vs_epsilon.png`` and ``report.md`` (the table with what each
number means). A point whose run directory already holds a summary for the same configuration is
reused, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedpa.common.config import FIELDS, FederationConfig
from fedpa.common.files import atomic_write_bytes, atomic_write_json, save_figure
from fedpa.recmodels.algorithms import ADAM_TABLES
from fedpa.server.rundir import RunDir
from fedpa.simulations.html_report import sweep_page

from .compare import mean_std, seed_warnings, warning_notes


@dataclass(frozen=True)
class SweepPoint:
    noise: float
    clip: float | None    # None: no DP, nothing is clipped
    secagg: bool
    mode: str

    @property
    def name(self) -> str:
        dp = "no-dp" if self.noise == 0 else f"z{self.noise:g}-C{self.clip:g}-{self.mode}"
        return f"{dp}-{'secagg' if self.secagg else 'plain'}"


def make_grid(noises: list[float], clips: list[float], secagg: list[bool], mode: str) -> list[SweepPoint]:
    """Grid points; z = 0 (no DP) once per SecAgg setting. ``mode`` 'auto' = distributed noise
    with SecAgg (the server never sees an un-noised sum), central without."""
    points = []
    for sa in secagg:
        for z in noises:
            if z < 0:
                raise ValueError(f"noise multipliers must be >= 0, got {z}")
            if z == 0:
                points.append(SweepPoint(0.0, None, sa, "none"))
                continue
            m = ("distributed" if sa else "central") if mode == "auto" else mode
            if m == "distributed" and not sa:
                continue  # refused by the configuration: distributed noise needs SecAgg
            for c in clips:
                if not c > 0:
                    raise ValueError(f"clip norms must be > 0, got {c}")
                points.append(SweepPoint(float(z), float(c), sa, m))
    seen, unique = set(), []
    for p in points:
        if p.name not in seen:
            seen.add(p.name)
            unique.append(p)
    return unique


def point_config(base: FederationConfig, p: SweepPoint, seed: int, out: Path) -> FederationConfig:
    """One point's configuration. Noisy points run FedPA's offset tables with local Adam steps (the recipe's
    `ADAM_TABLES`): the Newton tables' curvature sums have no bounded sensitivity yet."""
    tables = ({FIELDS[k].name: v for k, v in ADAM_TABLES} if p.noise > 0 and base.item_bias_update == "newton"
              else {})
    return replace(base, seed=seed, run_dir=str(out / p.name / f"seed-{seed}"), secagg=p.secagg,
                   dp_noise_multiplier=p.noise, dp_clip=p.clip or base.dp_clip,
                   dp_mode=p.mode if p.noise > 0 else "central", **tables)


def _reusable(cfg: FederationConfig) -> dict | None:
    run = Path(cfg.run_dir)
    try:
        summary = json.loads((run / "summary.json").read_text())
        attack = json.loads((run / "update_attack.json").read_text())
        written = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    same = not cfg.differences(written, ignore={"min-nodes"})  # min-nodes: set by the simulation
    return {**summary, "update_attack": attack} if same else None


def run_point(cfg: FederationConfig, *, cohort_size: int, attack_targets: int, progress=None) -> dict:
    from fedpa.simulations.simulate import simulate
    from fedpa.simulations.update_attack import run_update_attack

    done = _reusable(cfg)
    if done is not None:
        return done
    summary = simulate(cfg, cohort_size=cohort_size, progress=progress)
    _, state, _ = RunDir(cfg.run_dir).load_checkpoint()
    attack = run_update_attack(cfg, state, targets=attack_targets, seed=cfg.seed).as_dict()
    atomic_write_json(Path(cfg.run_dir) / "update_attack.json", attack)
    return {**summary, "update_attack": attack}


def utility_metrics(split: str) -> tuple[str, ...]:
    return ("hr@10", "ndcg@10") if split == "loo" else ("gauc", "auc")


def aggregate_point(p: SweepPoint, runs: list[dict], split: str) -> dict[str, Any]:
    def dp(r, key):
        d = r.get("differential_privacy") or {}
        return d.get(key)

    eps = [dp(r, "epsilon") for r in runs]
    row: dict[str, Any] = {
        "point": p.name, "noise_multiplier": p.noise, "clip": p.clip, "secagg": p.secagg, "dp_mode": p.mode,
        "seeds": [r["seed"] for r in runs],
        "epsilon": math.inf if p.noise == 0 else float(np.mean(eps)),
        "delta": dp(runs[0], "delta"),
        "rounds_accounted": dp(runs[0], "rounds_accounted"),
        "model_attack_auc": mean_std([(r.get("membership_inference") or {}).get("auc") for r in runs]),
        "update_attack_individual_auc": mean_std([r["update_attack"]["individual_auc"] for r in runs]),
        "update_attack_aggregate_auc": mean_std([r["update_attack"]["aggregate_auc"] for r in runs]),
        "server_view_attack_auc": mean_std([r["update_attack"]["aggregate_auc" if p.secagg else "individual_auc"]
                                            for r in runs]),
        "attack_cohort": runs[0]["update_attack"]["cohort"],
        "bytes_up_per_client_round": mean_std([r["bytes_up_per_client_round"] for r in runs])[0],
        "bytes_down_per_client_round": mean_std([r["bytes_down_per_client_round"] for r in runs])[0],
        "run_dirs": [r["run_dir"] for r in runs],
        "best_round": [r["best_round"] for r in runs],
        "final_round_test": {m: mean_std([r["final"]["test"].get(m) for r in runs]) for m in utility_metrics(split)},
        "warnings": seed_warnings(runs),
    }
    for m in utility_metrics(split):
        row[m] = mean_std([r["test"].get(m) for r in runs])
    return row


def _fmt(ms, digits: int = 4) -> str:
    m, s = ms
    return "n/a" if m is None or math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _eps(e: float) -> str:
    return "∞ (no DP)" if math.isinf(e) else f"{e:.3g}"


def markdown_table(rows: list[dict], split: str) -> str:
    metrics = utility_metrics(split)
    head = ["z", "C", "SecAgg", "noise added by", "ε", *[f"test {m}" for m in metrics],
            f"final-round {metrics[0]}", "best round", "model attack AUC", "update attack AUC (server's view)",
            "KB up / client / round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['noise_multiplier']:g}", "–" if r["clip"] is None else f"{r['clip']:g}",
                 "on" if r["secagg"] else "off", "–" if r["dp_mode"] == "none" else r["dp_mode"],
                 _eps(r["epsilon"]), *[_fmt(r[m]) for m in metrics], _fmt(r["final_round_test"][metrics[0]]),
                 ",".join(str(b) for b in r["best_round"]), _fmt(r["model_attack_auc"]),
                 _fmt(r["server_view_attack_auc"]), f"{r['bytes_up_per_client_round'] / 1024:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = warning_notes([(r["point"], r.get("warnings", {})) for r in rows])
    if notes:   # a point whose training diverged under its noise reads as that noise's utility: say which
        lines += ["", "Warnings from the runs' own training curves:", "", *notes]
    return "\n".join(lines)


def _epsilon_axis(rows: list[dict]) -> tuple[list[float], float]:
    """ε per row for plotting; no-DP points sit at a marked position right of the largest ε."""
    finite = [r["epsilon"] for r in rows if not math.isinf(r["epsilon"])]
    inf_at = (max(finite) * 4 if finite else 1.0)
    return [inf_at if math.isinf(r["epsilon"]) else r["epsilon"] for r in rows], inf_at


def plot_sweep(rows: list[dict], split: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, inf_at = _epsilon_axis(rows)
    series: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        label = f"SecAgg {'on' if r['secagg'] else 'off'}" + ("" if r["clip"] is None else f", C={r['clip']:g}")
        series.setdefault(label, []).append(i)
    for label in list(series):  # the no-DP point joins every line of its SecAgg setting
        if "C=" not in label:
            idx = series.pop(label)
            for other in series:
                if other.startswith(label):
                    series[other] += idx
            if not any(o.startswith(label) for o in series):
                series[label] = idx

    ticks = sorted(set(xs))

    def axis(ax):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ticks, ["∞" if t == inf_at else f"{t:.3g}" for t in ticks])
        ax.set_xlabel("ε (∞ = no DP)")
        ax.axvline(inf_at, color="grey", lw=0.5, ls=":")
        ax.grid(alpha=0.3)

    paths = []
    metric = utility_metrics(split)[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    def line(ax, idx, key, **style):  # mean ± std of rows[i][key] against ε, in ε order
        idx = sorted(idx, key=lambda i: xs[i])
        ax.errorbar([xs[i] for i in idx], [rows[i][key][0] for i in idx], yerr=[rows[i][key][1] for i in idx],
                    capsize=3, **style)

    for k, (label, idx) in enumerate(series.items()):
        line(ax, idx, metric, marker="os^v"[k % 4], ls=["-", "--", ":", "-."][k % 4], label=label)
    axis(ax)
    ax.set_ylabel(f"test {metric.upper()}")
    ax.set_title("utility vs privacy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "utility_vs_epsilon.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, idx in series.items():
        line(ax, idx, "server_view_attack_auc", marker="o", label=f"update attack, {label}")
        line(ax, idx, "model_attack_auc", marker="s", ls="--", label=f"model attack, {label}")
    ax.axhline(0.5, color="black", lw=0.8)
    axis(ax)
    ax.set_ylabel("membership-inference AUC (0.5 = chance)")
    ax.set_title("attack success vs privacy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "attack_vs_epsilon.png"))
    return paths


def plain_report(rows: list[dict], base: FederationConfig, seeds: list[int], md: str) -> str:
    metric = utility_metrics(base.split)[0]
    delta = next((r["delta"] for r in rows if r["delta"] is not None), None)
    lines = [
        "# Privacy–utility sweep", "",
        f"Algorithm `{base.algorithm}` on `{base.data_dir}` (split `{base.split}`), {base.num_rounds} rounds, "
        f"clients per round {base.clients_per_round:g}, seeds {', '.join(map(str, seeds))}. "
        "Numbers are mean ± std over seeds.", "",
        md, "",
        "![utility vs ε](utility_vs_epsilon.png) ![attack vs ε](attack_vs_epsilon.png)", "",
        "## What the numbers mean", "",
        "- **z, C**: every user's contribution to the shared parameters is clipped to L2 norm C, and "
        "Gaussian noise with standard deviation z times the sensitivity is added. Larger z: more privacy, "
        "less utility.",
        "- **noise added by**: `central` — the server adds the noise after aggregating (you trust the server); "
        "`distributed` — every client adds a share, so the sum the server unmasks under secure aggregation "
        "already carries the full noise whenever the round completes (you do not have to trust the server); "
        "`local` — every client noises its own update (strongest, costs the most utility).",
        f"- **ε** (at δ = {delta:.2g}): the privacy guarantee after all rounds. Roughly: anyone who sees "
        "what is released cannot tell whether one user took part (or, for `local`, what that user's update was) "
        "with confidence better than a factor e^ε, except with probability δ. Smaller is better; below ~1 is "
        "strong, above ~10 is weak in theory even when attacks fail in practice. ∞ means no DP."
        if delta is not None else "- **ε**: ∞ everywhere — no point of this sweep used DP.",
        f"- **test {metric.upper()}**: recommendation quality on the users' held-out test data at the best "
        "validation round (GAUC: the chance that, for the same user, a clicked item is scored above a "
        "non-clicked one). "
        "**best round** 0 means the noisy training never beat the starting model on validation, so the starting "
        f"model is what you would ship; **final-round {metric}** shows what the noisy training itself reached.",
        "- **model attack AUC**: a membership-inference attack on each user's personalized model: can someone "
        "holding the model tell the user's training interactions from held-out ones by the model's confidence? "
        "0.5 means no better than a coin; 1.0 means always.",
        "- **update attack AUC (server's view)**: the same question asked of what the server receives in a round: "
        "one user's update without secure aggregation, the sum over the round's cohort with it. The attacker "
        "applies the update to the model it sent and checks which candidate interactions got a lower loss. "
        "Secure aggregation should bring it to ~0.5 because one user is hidden among the cohort; DP noise "
        "brings it to ~0.5 even for a single update.",
        "- **KB up**: bytes each client uploads per round (secure aggregation adds keys, shares and "
        "fixed-point encoding).",
        "",
        "Individual figures per run: each point's `seed-S/summary.json` (utility, ε) and "
        "`seed-S/update_attack.json` (both views of the update attack).",
    ]
    return "\n".join(lines) + "\n"


def privacy_sweep(base: FederationConfig, points: list[SweepPoint], seeds: list[int], out: str | Path, *,
                  cohort_size: int = 0, attack_targets: int = 64, on_start=None, progress=None) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in points:
        runs = []
        for seed in seeds:
            cfg = point_config(base, p, seed, out)
            cfg.validate()
            if on_start:
                on_start(p, seed)
            r = run_point(cfg, cohort_size=cohort_size, attack_targets=attack_targets, progress=progress)
            r["run_dir"] = cfg.run_dir
            runs.append(r)
        rows.append(aggregate_point(p, runs, base.split))
    md = markdown_table(rows, base.split)
    stored = [{**r, "epsilon": None if math.isinf(r["epsilon"]) else r["epsilon"]} for r in rows]  # JSON has no ∞
    atomic_write_json(out / "sweep.json", {"seeds": seeds, "config": base.to_run_config(), "rows": stored,
                                           "epsilon_null_means": "no differential privacy (ε = ∞)"})
    atomic_write_bytes(out / "sweep.md", (md + "\n").encode())
    plot_sweep(rows, base.split, out)
    sweep_page(rows, utility_metrics(base.split), base.to_run_config(), out / "sweep.html")
    atomic_write_bytes(out / "report.md", plain_report(rows, base, seeds, md).encode())
    return {"rows": rows, "markdown": md, "root": str(out)}
