"""`fedpa simulate --stages ...`: federated personalization of the funnel's stage heads, end to end.

Starting point: the stage heads a `fedpa funnel` run trained centrally (on every training-day request,
as a platform trains its production models). For each stage asked for (retrieval, prerank, rank), one
ordinary federation personalizes that head: the same Flower apps, algorithms, cohort engine, secure
aggregation and DP as the single scorer, with the head's own layers adapted
(`recmodels.stages.pointwise`). Each stage run is a run directory ``RUN/<stage>/`` whose users keep
their private adapters in an encrypted personal store ``RUN/<stage>/personal`` (key
``RUN/personal-store.key``), exactly as deployed clients would.

Then the funnel runs end to end on the funnel run's test-day requests of the federation's users, each
request through *its user's* personalized heads: the final shared state of each stage run plus the
user's private adapters from the store (a user never selected keeps the initial private state: the
shared part alone). Heads that were not federated, and re-ranking, stay as trained. The metrics are
the funnel's (`simulations.funnel.funnel_metrics`): per stage Recall@K / NDCG@K of the effective
views, re-ranking diversity, end-to-end effective-view rate, watch time and oracle utility.

`compare_stages` repeats this for several algorithms and seeds into one table.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpa.client.personal_store import PersonalStore, generate_key_file
from fedpa.common.config import FederationConfig
from fedpa.common.files import atomic_write_bytes, atomic_write_json, save_figure
from fedpa.common.models import build_personal_model
from fedpa.foundation.adapters import set_active_paths, use_routing
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import load_foundation
from fedpa.recmodels.stages.features import StageEncoder
from fedpa.recmodels.stages.pointwise import FEDERATED_STAGES
from fedpa.server.rundir import RunDir
from fedpa.simulations.compare import mean_std

KEY_FILE = "personal-store.key"


def parse_stages(text: str) -> list[str]:
    """``retrieval,prerank,rank`` or ``all``, in funnel order; unknown names are a clear error."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(FEDERATED_STAGES)
    unknown = [s for s in names if s not in FEDERATED_STAGES]
    if "rerank" in unknown:
        raise FedpaError("re-ranking cannot be federated: CDM's student reads whole candidate lists, not one "
                         f"(request, item) row; federate {', '.join(FEDERATED_STAGES)} (or 'all')")
    if unknown or not names:
        raise FedpaError(f"unknown stage(s) {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(FEDERATED_STAGES)} or 'all'")
    return [s for s in FEDERATED_STAGES if s in names]


def funnel_config(funnel_dir: str | Path, cfg: FederationConfig):
    """The `fedpa funnel` run's configuration, checked against the federation's data and foundation."""
    from fedpa.simulations.funnel import FunnelConfig

    path = Path(funnel_dir) / "config.json"
    try:
        written = json.loads(path.read_text())
    except OSError:
        raise FedpaError(f"{funnel_dir}: not a `fedpa funnel` run (no config.json); train the stage heads first: "
                         f"fedpa funnel --data {cfg.data_dir} --foundation {cfg.foundation} --out {funnel_dir}"
                         ) from None
    except ValueError as e:
        raise FedpaError(f"{path}: not valid JSON ({e})") from None
    fc = FunnelConfig(**{k: v for k, v in written.items() if k in FunnelConfig.__dataclass_fields__})
    if fc.validation:
        raise FedpaError(f"{funnel_dir} was trained with --validation (without the last training day, to choose "
                         "settings): train the heads to federate without it")
    for what, theirs, ours in (("dataset", fc.data_dir, cfg.data_dir), ("foundation", fc.foundation, cfg.foundation)):
        if Path(theirs).resolve() != Path(ours).resolve():
            raise FedpaError(f"{funnel_dir} trained its stage heads on {what} {theirs}, this federation uses {ours}: "
                             "personalize heads trained on the same data and foundation")
    return fc


def stage_config(cfg: FederationConfig, stage: str, funnel_dir: str | Path) -> FederationConfig:
    root = Path(cfg.run_dir)
    return replace(cfg, stage=stage, stage_models=str(funnel_dir), run_dir=str(root / stage),
                   personal_store=str(root / stage / "personal"), personal_store_key_file=str(root / KEY_FILE))


def simulate_stages(cfg: FederationConfig, stages: list[str], funnel_dir: str | Path, *, cohort_size: int = 0,
                    progress=None, on_stage=None, run_one=None) -> dict:
    """Federate each stage, then evaluate the personalized funnel; writes RUN/stages.json and RUN/stages.md.
    ``run_one(cfg)`` runs one stage federation (default: `simulations.simulate.simulate`)."""
    from fedpa.simulations.simulate import simulate

    cfg.validate()
    funnel_config(funnel_dir, cfg)  # fails before any training if the heads do not fit
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / KEY_FILE).exists():
        generate_key_file(root / KEY_FILE)
    t0 = time.perf_counter()
    summaries = {}
    for stage in stages:
        sc = stage_config(cfg, stage, funnel_dir)
        if on_stage:
            on_stage(stage)
        # a fresh run: personal state left by an earlier run in this directory must not leak into it
        shutil.rmtree(sc.personal_store, ignore_errors=True)
        summaries[stage] = run_one(sc) if run_one else simulate(sc, cohort_size=cohort_size, progress=progress)
    if on_stage:
        on_stage("funnel")
    funnel = evaluate_personalized_funnel(cfg, stages, funnel_dir)
    result = {"algorithm": cfg.algorithm, "seed": cfg.seed, "stages": stages, "funnel_dir": str(funnel_dir),
              "stage_runs": {s: _stage_summary(summaries[s]) for s in stages}, "funnel": funnel,
              "wall_s": time.perf_counter() - t0}
    atomic_write_json(root / "stages.json", result)
    atomic_write_bytes(root / "stages.md", (stages_markdown({cfg.algorithm: [result]}) + "\n").encode())
    return result


def _stage_summary(summary: dict) -> dict:
    return {"test": summary.get("test", {}), "best_round": summary.get("best_round"),
            "seconds_per_round": summary.get("seconds_per_round"),
            "bytes_up_per_client_round": summary.get("bytes_up_per_client_round"),
            "shared_params": summary.get("model", {}).get("shared_params"),
            "private_params_per_user": summary.get("model", {}).get("private_params_per_user")}


@torch.no_grad()
def evaluate_personalized_funnel(cfg: FederationConfig, stages: list[str], funnel_dir: str | Path) -> dict:
    """The funnel on the test-day requests of the federation's users, each with its own personalized heads."""
    from fedpa.client.runtime import partition_config
    from fedpa.recdata.partition import make_partition
    from fedpa.simulations.funnel import (
        funnel_kept,
        funnel_metrics,
        load_funnel_data,
        load_stage_models,
        request_tensors,
    )

    fc = funnel_config(funnel_dir, cfg)
    ds, lookups, _, pools = load_funnel_data(fc, with_train=False)
    clients = make_partition(ds, partition_config(cfg)).clients
    mine = np.nonzero(np.isin(pools.requests.user_id, clients))[0]
    if len(mine) == 0:
        raise FedpaError(f"none of the {len(pools)} test requests of {funnel_dir} belong to the federation's users")
    pools = pools.subset(mine)
    test = request_tensors(pools, lookups)
    foundation = load_foundation(cfg.foundation)
    encoder = StageEncoder(foundation)
    models = load_stage_models(encoder, fc, Path(funnel_dir) / "models", replaced=stages)
    personal = [_PersonalizedStage(stage_config(cfg, s, funnel_dir), foundation) for s in stages]
    for p in personal:
        setattr(models, p.stage, p.head)  # the adapted head: the funnel runner scores with its adapters
    users = pools.requests.user_id
    sizes = fc.sizes()
    kept = {name: torch.full((len(test), size), -1, dtype=torch.long) for name, size in
            zip(("retrieval", "prerank", "rank", "exposed"),
                (sizes.retrieval, sizes.prerank, sizes.rank, sizes.exposed))}
    for uid in np.unique(users):
        rows = torch.from_numpy(np.nonzero(users == uid)[0])
        with contextlib.ExitStack() as stack:
            for p in personal:
                stack.enter_context(p.for_user(int(uid), lookups.user_table[uid]))
            out = funnel_kept(models, encoder, test.rows(rows), sizes)
        for name, k in out.items():
            kept[name][rows, :k.shape[1]] = k
    metrics = funnel_metrics(kept, encoder, test, pools, ds, fc)
    metrics["users"] = int(len(np.unique(users)))
    metrics["users_with_private_state"] = {p.stage: p.loaded for p in personal}  # per stage
    return metrics


class _PersonalizedStage:
    """One federated stage's head with the run's final shared state; private state per user from the store."""

    def __init__(self, cfg: FederationConfig, foundation):
        self.stage = cfg.stage
        self.pm = build_personal_model(cfg, foundation=foundation)
        self.head = self.pm.host.stage_head
        self.loaded = 0
        self.store = None
        if self.pm.model is None:
            return
        run = RunDir(cfg.run_dir, track=cfg.track)
        if self.pm.shared_spec():
            if run.latest_round() is None:
                raise FedpaError(f"{cfg.run_dir}: no checkpoint of the {self.stage} federation to evaluate")
            _, shared, _ = run.load_checkpoint()
            self.pm.set_shared(shared)
        if self.pm.initial_private and Path(cfg.personal_store).exists():
            self.store = PersonalStore.from_key_file(cfg.personal_store, cfg.personal_store_key_file)
        self.algorithm = cfg.algorithm

    @contextlib.contextmanager
    def for_user(self, user_id: int, profile: np.ndarray):
        pm = self.pm
        if pm.model is None:
            yield
            return
        private = None
        if self.store is not None:
            loaded = self.store.load(user_id)
            if loaded is not None and loaded[1].get("algorithm") == self.algorithm:
                private = loaded[0]
                self.loaded += 1
        if pm.initial_private:
            pm.set_private(private)
        groups = torch.as_tensor(profile[pm.group_columns], dtype=torch.long).reshape(1, -1) if pm.group_columns \
            else None
        # Ditto scores with its personal path, as in the federation's evaluation
        set_active_paths(pm.model, ("user",) if pm.algorithm.ditto else None)
        try:
            with use_routing(pm.model, group_index=groups, user_slot=torch.zeros(1, dtype=torch.long)):
                yield
        finally:
            set_active_paths(pm.model, None)


# ---------------------------------------------------------------------------------------------- tables

def _flat(result: dict) -> dict[str, float]:
    f = result["funnel"]
    out = {}
    for stage in ("retrieval", "prerank", "rank", "exposed"):
        for k, v in f[stage].items():
            if k.startswith(("recall@", "ndcg@")):
                out[f"{stage} {k}"] = v
    for k, v in f["end_to_end"].items():
        if k != "exposed_with_feedback":
            out[k] = v
    out.update({f"rerank {k}": v for k, v in f["rerank"].items()})
    for stage, s in result["stage_runs"].items():
        for m in ("auc", "gauc"):
            if m in s["test"]:
                out[f"{stage} head test {m}"] = s["test"][m]
    return out


def stages_table(results: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """algorithm -> metric -> (mean, std over seeds)."""
    table = {}
    for algo, runs in results.items():
        flats = [_flat(r) for r in runs]
        keys = list(dict.fromkeys(k for f in flats for k in f))
        table[algo] = {k: mean_std([f.get(k, math.nan) for f in flats]) for k in keys}
    return table


def stages_markdown(results: dict[str, list[dict]]) -> str:
    table = stages_table(results)
    keys = list(dict.fromkeys(k for row in table.values() for k in row))
    algos = list(table)
    seeds = {a: len(results[a]) for a in algos}
    head = ["metric", *[f"{a} ({seeds[a]} seed{'s' if seeds[a] > 1 else ''})" for a in algos]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = []
        for a in algos:
            m, s = table[a].get(k, (math.nan, math.nan))
            cells.append("n/a" if math.isnan(m) else f"{m:.4f} ± {s:.4f}")
        lines.append("| " + " | ".join([k, *cells]) + " |")
    return "\n".join(lines)


def compare_stages(base: FederationConfig, algorithms: list[str], seeds: list[int], stages: list[str],
                   funnel_dir: str | Path, root: str | Path, *, cohort_size: int = 0, progress=None,
                   on_start=None) -> dict[str, Any]:
    """`simulate_stages` for every (algorithm, seed) under ROOT/ALGORITHM/seed-S; ROOT/stages.{md,json,png}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for algo in algorithms:
        for seed in seeds:
            cfg = replace(base, algorithm=algo, seed=seed, run_dir=str(root / algo / f"seed-{seed}"))
            results.setdefault(algo, []).append(
                simulate_stages(cfg, stages, funnel_dir, cohort_size=cohort_size, progress=progress,
                                on_stage=(lambda s, a=algo, sd=seed: on_start(a, sd, s)) if on_start else None))
    return write_stages_report(root, results, {"stages": stages, "funnel_dir": str(funnel_dir),
                                               "config": base.to_run_config()})


def collect_stage_runs(root: str | Path) -> dict[str, list[dict]]:
    """The finished ``ROOT/ALGORITHM/seed-S/stages.json`` results under ``root``, by algorithm."""
    results: dict[str, list[dict]] = {}
    for path in sorted(Path(root).glob("*/seed-*/stages.json")):
        results.setdefault(path.parent.parent.name, []).append(json.loads(path.read_text()))
    if not results:
        raise FedpaError(f"{root}: no finished stage runs (ALGORITHM/seed-S/stages.json)")
    return results


def write_stages_report(root: Path, results: dict[str, list[dict]], info: dict) -> dict[str, Any]:
    """ROOT/stages.{md,json,png}: mean ± std over seeds of every per-stage and end-to-end metric."""
    md = stages_markdown(results)
    table = stages_table(results)
    atomic_write_json(root / "stages.json", {"algorithms": list(results),
                                             "seeds": {a: [r["seed"] for r in runs] for a, runs in results.items()},
                                             "table": table, **info})
    atomic_write_bytes(root / "stages.md", (md + "\n").encode())
    plot_stages(table, root / "stages.png")
    return {"table": table, "markdown": md, "root": str(root)}


def plot_stages(table: dict[str, dict[str, tuple[float, float]]], path: Path) -> Path:
    """Recall after each stage and the end-to-end effective-view rate, one bar per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(table)
    keys = [k for k in next(iter(table.values())) if k.split(" ")[0] in ("retrieval", "prerank", "rank", "exposed")
            and " recall@" in k] + ["effective_view_rate"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
    for ax, k in zip(np.atleast_1d(axes), keys):
        means = [table[a].get(k, (math.nan, 0))[0] for a in algos]
        stds = [table[a].get(k, (0, 0))[1] for a in algos]
        ax.bar(range(len(algos)), means, yerr=stds, capsize=3,
               color=["C3" if a == "fedpa" else "C0" for a in algos])
        finite = [m for m in means if not math.isnan(m)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(max(0.0, lo - 0.1 * (hi - lo + 0.05)), hi + 0.1 * (hi - lo + 0.05))
        ax.set_xticks(range(len(algos)), algos, rotation=35, ha="right", fontsize=8)
        ax.set_title(k, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
