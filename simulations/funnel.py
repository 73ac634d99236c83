"""Train the four stage heads over a frozen foundation and evaluate the whole funnel (`fedpa funnel`).

Protocol (RecFlow's, by day): requests of the training days train every stage; the last day's
requests are run through the funnel. A request's *relevant* items are its effective views; every
stage is scored by Recall@K / NDCG@K of them among what it kept (K = its output size), ranking also
by AUC / GAUC per task over the last day's exposures, re-ranking by intra-list distance and category
coverage of what it exposed, and the funnel end to end by the effective-view rate and watch time of
the exposed items (exposures with feedback; an exposed item the log never showed counts as no view)
and, on synthetic data, their oracle utility.

`stage_ablation` repeats this with and without stage samples over seeds (mean ± std per metric).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fedpa.common.files import atomic_write_bytes, atomic_write_json, save_figure
from fedpa.foundation.batch import TASKS
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.metrics import auc, gauc
from fedpa.foundation.model import load_foundation
from fedpa.recdata.examples import Lookups
from fedpa.recdata.funnel import RequestPools, load_request_pools, sample_requests
from fedpa.recdata.partition import read_exposures, read_views
from fedpa.recdata.schema import LEVEL_CLICK
from fedpa.recdata.store import Dataset
from fedpa.recmodels.stages.features import StageEncoder
from fedpa.recmodels.stages.funnel import FunnelSizes, StageModels, pair_batch, run_funnel
from fedpa.recmodels.stages.pointwise import RETRIEVAL_KINDS, build_stage_head
from fedpa.recmodels.stages.ranking import HoMERanker
from fedpa.recmodels.stages.rerank import CDMReranker, category_coverage, intra_list_distance
from fedpa.recmodels.stages.towers import recall_ndcg_at_k
from fedpa.recmodels.stages.training import (
    RequestTensors,
    StageTraining,
    train_prerank,
    train_ranking,
    train_rerank,
    train_retrieval,
)

STAGE_NAMES = ("retrieval", "prerank", "rank", "exposed")


@dataclass(frozen=True)
class FunnelConfig:
    data_dir: str = "data/small"
    foundation: str = "runs/foundation"
    out_dir: str = "runs/funnel"
    train_requests: int = 4000
    test_requests: int = 1500
    random_per_request: int = 100
    use_stage_samples: bool = True
    rerank: str = "cdm"                 # cdm | mmr
    interests: int = 1                  # retrieval: 1 = one user vector; > 1 = multi-interest
    retrieval: str = "two-tower"        # two-tower | dimerec (DimeRec's diffusion-generated query; interests >= 2)
    validation: bool = False            # evaluate on the last training day (trained on the days before it)
    epochs: int = 10                    # the best of 2, 6, 10 on the validation day (benchmarks/bench_retrieval.py)
    seed: int = 0
    retrieval_size: int = 72
    prerank_size: int = 36
    rank_size: int = 12
    exposed: int = 6

    def sizes(self) -> FunnelSizes:
        return FunnelSizes(self.retrieval_size, self.prerank_size, self.rank_size, self.exposed)


def request_tensors(pools: RequestPools, lookups: Lookups) -> RequestTensors:
    """Pools as padded tensors; item feature rows from the catalogue."""
    r = len(pools)
    mask = pools.padded(np.ones(len(pools.video_id), bool), False)
    vid = pools.padded(pools.video_id, 0)
    items = pools.requests._item_rows(vid.reshape(-1)).reshape(r, vid.shape[1], -1)
    level = pools.padded(pools.level.astype(np.int64), -1)
    labels = pools.padded(pools.labels, -1).astype(np.float32)
    return RequestTensors(pools.requests.batch(), torch.from_numpy(items), torch.from_numpy(mask),
                          torch.from_numpy(level), torch.from_numpy(labels),
                          torch.from_numpy(items[..., 2].copy()))  # ITEM_FIELDS[2] = category_level_one


def _days(ds: Dataset, validation: bool = False) -> tuple[list[str], str]:
    """Training days and the evaluated day: the last day, or (``validation``) the last training day,
    with the days before it for training, so that settings are chosen without reading the test day."""
    if len(ds.days) < 2 + validation:
        raise FedpaError(f"{ds.path}: the funnel needs at least {2 + validation} days (training days, then "
                         f"{'a validation day' if validation else 'a test day'})")
    end = len(ds.days) - validation
    return list(ds.days[:end - 1]), ds.days[end - 1]


def load_funnel_data(cfg: FunnelConfig, with_train: bool = True
                     ) -> tuple[Dataset, Lookups, RequestPools | None, RequestPools]:
    """The dataset, its lookups, the sampled training requests' pools (None unless ``with_train``) and the
    test day's."""
    ds = Dataset(cfg.data_dir)
    train_days, test_day = _days(ds, cfg.validation)
    lookups = Lookups.for_foundation(ds, cfg.foundation)
    users = ds.users(["user_id"]).column("user_id").to_numpy()
    views = read_views(ds, users, read_exposures(ds, users))
    # requests without an exposure are dropped after sampling, so a few more are drawn than asked for
    train = None
    if with_train:
        train = load_request_pools(ds, train_days, views=views, lookups=lookups, n_random=cfg.random_per_request,
                                   seed=cfg.seed,
                                   request_ids=sample_requests(ds, train_days, 2 * cfg.train_requests, cfg.seed))
        if len(train) > cfg.train_requests:
            train = train.subset(np.sort(np.random.default_rng(cfg.seed).choice(len(train), cfg.train_requests,
                                                                               replace=False)))
    test = load_request_pools(ds, [test_day], views=views, lookups=lookups, n_random=cfg.random_per_request,
                              seed=cfg.seed + 1_000_003,
                              request_ids=sample_requests(ds, [test_day], 2 * cfg.test_requests, cfg.seed + 1))
    if len(test) > cfg.test_requests:
        test = test.subset(np.sort(np.random.default_rng(cfg.seed + 1).choice(len(test), cfg.test_requests,
                                                                             replace=False)))
    return ds, lookups, train, test


def build_models(encoder: StageEncoder, cfg: FunnelConfig) -> StageModels:
    torch.manual_seed(cfg.seed)
    config = encoder.foundation.config
    return StageModels(
        retrieval=build_stage_head("retrieval", config, cfg.interests, cfg.retrieval),
        prerank=build_stage_head("prerank", config),
        rank=build_stage_head("rank", config),
        rerank=CDMReranker(encoder.item_dim) if cfg.rerank == "cdm" else None)


STEPS = ("data", "retrieval", "prerank", "rank", "rerank", "evaluate")


def _tick(progress, step: str) -> None:
    if progress is not None:
        progress(step, STEPS.index(step), len(STEPS))


def train_stages(models: StageModels, encoder: StageEncoder, train: RequestTensors, cfg: FunnelConfig,
                 progress=None) -> dict:
    tc = StageTraining(epochs=cfg.epochs, seed=cfg.seed)
    s = cfg.use_stage_samples
    out = {}
    for name, fn in (("retrieval", lambda: train_retrieval(models.retrieval, encoder, train, tc, s)),
                     ("prerank", lambda: train_prerank(models.prerank, encoder, train, tc, s)),
                     ("rank", lambda: train_ranking(models.rank, encoder, train, tc, s))):
        _tick(progress, name)
        t0 = time.perf_counter()
        out[name] = {"loss": fn(), "seconds": time.perf_counter() - t0}
    if models.rerank is not None:
        _tick(progress, "rerank")
        t0 = time.perf_counter()
        out["rerank"] = {"loss": train_rerank(models.rerank, models.rank, encoder, train, tc, s),
                         "seconds": time.perf_counter() - t0}
    return out


def kept_scores(kept: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Pool-shaped scores [B, N] of what a stage kept (positions [B, K], best first, -1 = none): the
    kept items by their order, everything else -inf (never in the stage's top-K)."""
    scores = torch.full(shape, float("-inf"))
    valid = kept >= 0
    ranks = torch.arange(kept.shape[1], 0, -1, dtype=torch.float32).expand_as(kept)
    rows = torch.arange(len(kept))[:, None].expand_as(kept)
    scores[rows[valid], kept[valid]] = ranks[valid]
    return scores


def funnel_kept(models: StageModels, encoder: StageEncoder, test: RequestTensors, sizes: FunnelSizes,
                batch: int = 128) -> dict[str, torch.Tensor]:
    """Pool positions each stage kept for every test request ([R, size] per stage, -1 = none)."""
    kept: dict[str, list[torch.Tensor]] = {s: [] for s in STAGE_NAMES}
    for s in range(0, len(test), batch):
        rows = test.rows(torch.arange(s, min(s + batch, len(test))))
        out = run_funnel(models, encoder, rows.requests, rows.items, rows.mask, sizes)
        for name in STAGE_NAMES:
            kept[name].append(out.kept[name])
    return {name: torch.cat(parts) for name, parts in kept.items()}


def evaluate_funnel(models: StageModels, encoder: StageEncoder, test: RequestTensors, pools: RequestPools,
                    ds: Dataset, cfg: FunnelConfig, batch: int = 128) -> dict:
    metrics = funnel_metrics(funnel_kept(models, encoder, test, cfg.sizes(), batch), encoder, test, pools, ds, cfg)
    metrics["ranking_tasks"] = _ranking_task_metrics(models.rank, encoder, test, pools)
    return metrics


def funnel_metrics(kept: dict[str, torch.Tensor], encoder: StageEncoder, test: RequestTensors,
                   pools: RequestPools, ds: Dataset, cfg: FunnelConfig) -> dict:
    """Per-stage Recall / NDCG, diversity of what was exposed and the end-to-end metrics of ``kept``."""
    sizes = cfg.sizes()
    relevant = (test.level == LEVEL_CLICK) & test.mask
    metrics: dict = {"requests": len(test), "requests_with_views": int(relevant.any(dim=1).sum())}
    for name, size in zip(STAGE_NAMES, (sizes.retrieval, sizes.prerank, sizes.rank, sizes.exposed)):
        idx = kept[name]
        metrics[name] = recall_ndcg_at_k(kept_scores(idx, tuple(test.mask.shape)), relevant, [size])
    exposed = kept["exposed"]
    valid = exposed >= 0
    safe = exposed.clamp(min=0)
    clicks = (relevant.gather(1, safe) & valid).float()
    labels_ev = test.labels[..., 0].gather(1, safe)
    play = torch.from_numpy(pools.padded(pools.playing_time, -1)).gather(1, safe)
    e2e = {"effective_view_rate": float(clicks.sum() / valid.sum().clamp(min=1)),
           "exposed_with_feedback": float(((labels_ev >= 0) & valid).sum() / valid.sum().clamp(min=1)),
           "watch_time_s_per_request": float(torch.where(valid & (play > 0), play, 0).sum() / 1000 / len(test))}
    emb = encoder.items(test.items.reshape(-1, test.items.shape[-1])).reshape(*test.items.shape[:2], -1)
    ild, cov = [], []
    n_categories = int(ds.vocab.get("category_level_one", 0)) or int(test.category.max()) + 1
    for r in range(len(test)):
        pick = exposed[r][valid[r]]
        if len(pick) >= 2:
            ild.append(intra_list_distance(emb[r, pick]))
            cov.append(category_coverage(test.category[r, pick], n_categories))
    metrics["rerank"] = {"intra_list_distance": float(np.mean(ild)) if ild else float("nan"),
                         "category_coverage": float(np.mean(cov)) if cov else float("nan")}
    oracle = _oracle(ds, pools, exposed, valid, _days(ds, cfg.validation)[1])
    if oracle is not None:
        e2e["oracle_utility"] = oracle
    metrics["end_to_end"] = e2e
    return metrics


def _oracle(ds: Dataset, pools: RequestPools, exposed: torch.Tensor, valid: torch.Tensor,
            day: str) -> float | None:
    from fedpa.recdata.synth import oracle_utility

    if not (ds.path / "oracle" / "world.json").exists():
        return None
    vid = np.take_along_axis(pools.padded(pools.video_id, 0), exposed.clamp(min=0).numpy(), axis=1)
    users = np.broadcast_to(pools.requests.user_id[:, None], vid.shape)
    util = oracle_utility(ds, users[valid.numpy()], vid[valid.numpy()], day)
    return float(np.mean(util)) if len(util) else float("nan")


@torch.no_grad()
def _ranking_task_metrics(ranker: HoMERanker, encoder: StageEncoder, test: RequestTensors,
                          pools: RequestPools) -> dict:
    """AUC / GAUC per task of the ranker over the test day's exposures (independent of the funnel)."""
    ranker.eval()
    shown = test.mask & (test.level >= 5)
    r_idx, n_idx = torch.nonzero(shown, as_tuple=True)
    if len(r_idx) == 0:
        return {}
    out_logits = []
    for s in range(0, len(r_idx), 2048):
        rr, nn_ = r_idx[s:s + 2048], n_idx[s:s + 2048]
        req = {k: v[rr] for k, v in test.requests.items()}
        batch = pair_batch(req, test.items[rr, nn_][:, None, :])
        out_logits.append(ranker(encoder.pairs(batch)))
    logits = torch.cat(out_logits).numpy()
    labels = test.labels[r_idx, n_idx].numpy()
    users = pools.requests.user_id[r_idx.numpy()]
    out = {}
    for t, task in enumerate(TASKS):
        seen = labels[:, t] >= 0
        y, p = labels[seen, t], logits[seen, t]
        if len(y) and 0 < y.sum() < len(y):
            g = gauc(users[seen], y, p)
            out[task] = {"auc": auc(y, p), "gauc": g.value}
    return out


def run_funnel_experiment(cfg: FunnelConfig, data=None, progress=None) -> dict:
    """Train the stages, evaluate the funnel, write ``out_dir`` (config.json, metrics.json, models/)."""
    t0 = time.perf_counter()
    if cfg.rerank not in ("cdm", "mmr"):
        raise FedpaError(f"unknown re-ranker '{cfg.rerank}' (cdm, mmr)")
    if cfg.retrieval not in RETRIEVAL_KINDS:
        raise FedpaError(f"unknown retrieval head '{cfg.retrieval}' ({', '.join(RETRIEVAL_KINDS)})")
    if cfg.retrieval == "dimerec" and cfg.interests < 2:
        raise FedpaError(f"DimeRec's retrieval is guided by several interests: interests must be >= 2 "
                         f"(got {cfg.interests}; fedpa funnel --retrieval dimerec --interests 4)")
    foundation = load_foundation(cfg.foundation)
    encoder = StageEncoder(foundation)
    _tick(progress, "data")
    ds, lookups, train_pools, test_pools = data or load_funnel_data(cfg)
    train = request_tensors(train_pools, lookups)
    test = request_tensors(test_pools, lookups)
    models = build_models(encoder, cfg)
    training = train_stages(models, encoder, train, cfg, progress)
    _tick(progress, "evaluate")
    metrics = evaluate_funnel(models, encoder, test, test_pools, ds, cfg)
    metrics["training"] = training
    metrics["seconds"] = time.perf_counter() - t0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))
    save_stage_models(models, out / "models")
    atomic_write_json(out / "metrics.json", metrics)
    plot_funnel(metrics, cfg, out / "funnel.png")
    if progress is not None:
        progress("done", len(STEPS), len(STEPS))
    return metrics


def save_stage_models(models: StageModels, out: Path) -> None:
    """Each trained head as ``<stage>.safetensors`` (written atomically), reloadable with `load_stage_models`."""
    from safetensors.torch import save

    for name in ("retrieval", "prerank", "rank", "rerank"):
        head = getattr(models, name)
        if head is not None:
            state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
            atomic_write_bytes(out / f"{name}.safetensors", save(state))


def load_stage_models(encoder: StageEncoder, cfg: FunnelConfig, directory: Path,
                      replaced: Collection[str] = ()) -> StageModels:
    """The heads a finished `fedpa funnel` run saved (shapes are checked against its configuration).
    ``replaced``: stages whose head the caller sets itself (left untrained here, not read twice)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    models = build_models(encoder, cfg)
    for name in ("retrieval", "prerank", "rank", "rerank"):
        head = getattr(models, name)
        if head is None or name in replaced:
            continue
        path = Path(directory) / f"{name}.safetensors"
        try:
            head.load_state_dict(load_file(path))
        except (OSError, SafetensorError, RuntimeError) as e:
            raise FedpaError(f"{path}: cannot load the {name} head ({str(e).splitlines()[0]})") from None
    return models.eval()


def plot_funnel(metrics: dict, cfg: FunnelConfig, path: Path) -> Path:
    """Recall and NDCG of the request's effective views after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = (cfg.retrieval_size, cfg.prerank_size, cfg.rank_size, cfg.exposed)
    labels = [f"{s}\n(top {k})" for s, k in zip(STAGE_NAMES, sizes)]
    recall = [metrics[s][f"recall@{k}"] for s, k in zip(STAGE_NAMES, sizes)]
    ndcg = [metrics[s][f"ndcg@{k}"] for s, k in zip(STAGE_NAMES, sizes)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, recall, 0.4, label="Recall@K")
    ax.bar(x + 0.2, ndcg, 0.4, label="NDCG@K")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    ax.set_title("effective views kept through the funnel (test day)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def _flatten(metrics: dict) -> dict[str, float]:
    flat = {}
    for stage in STAGE_NAMES:
        for k, v in metrics[stage].items():
            if k != "requests":
                flat[f"{stage}.{k}"] = v
    for k, v in metrics["rerank"].items():
        flat[f"rerank.{k}"] = v
    for k, v in metrics["end_to_end"].items():
        flat[f"end_to_end.{k}"] = v
    for task, m in metrics["ranking_tasks"].items():
        for k, v in m.items():
            flat[f"rank.{task}.{k}"] = v
    return flat


def stage_ablation(cfg: FunnelConfig, seeds: list[int], progress=None) -> dict:
    """Every stage with and without stage samples, over seeds: mean and std of each metric."""
    runs: dict[str, list[dict]] = {"with": [], "without": []}
    data_by_seed = {}
    for seed in seeds:
        base = FunnelConfig(**{**asdict(cfg), "seed": seed})
        data_by_seed[seed] = load_funnel_data(base)
        for arm, flag in (("with", True), ("without", False)):
            c = FunnelConfig(**{**asdict(base), "use_stage_samples": flag,
                                "out_dir": str(Path(cfg.out_dir) / f"{arm}-seed{seed}")})
            if progress is not None:
                progress(f"seed {seed}, {arm} stage samples", len(runs["with"]) + len(runs["without"]), 2 * len(seeds))
            runs[arm].append(_flatten(run_funnel_experiment(c, data=data_by_seed[seed])))
    table = {}
    for key in runs["with"][0]:
        row = {}
        for arm in runs:
            vals = np.array([r.get(key, math.nan) for r in runs[arm]], dtype=np.float64)
            row[arm] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals))}
        table[key] = row
    result = {"seeds": seeds, "table": table}
    atomic_write_json(Path(cfg.out_dir) / "ablation.json", result)
    return result
