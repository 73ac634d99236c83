"""The centralized upper bound: FedPA's model trained on the pooled data of all clients.

Not a federation (the data leaves the users), so it runs outside Flower; it writes
the same run directory as a federated run so that `fedpa compare` reads both alike.
A "round" here is ``local_epochs`` passes over the pooled training rows, in batches four times
the clients' local batch.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from fedpa.client.personal_store import open_store
from fedpa.client.runtime import ensure_feature_cache, partition_config, user_splits
from fedpa.common.config import FederationConfig
from fedpa.common.models import build_personal_model
from fedpa.foundation.model import count_parameters, load_foundation
from fedpa.recdata.examples import Examples, Lookups
from fedpa.recdata.partition import make_partition, round_training_rows
from fedpa.recdata.store import Dataset
from fedpa.recmodels.evaluation import MetricSums
from fedpa.recmodels.personalization import LocalTraining, PersonalModel, UserTensors
from fedpa.server.federation import write_summary
from fedpa.server.rundir import RunDir

BATCH = 1024
POOLED_BATCH_FACTOR = 4


def _routing(pm: PersonalModel, ex: Examples, users: np.ndarray, lookups: Lookups):
    slots = torch.from_numpy(np.searchsorted(users, ex.user_id)).long()
    groups = torch.from_numpy(lookups.user_table[ex.user_id][:, pm.group_columns]).long()
    return groups, slots


def _round_rows(cfg: FederationConfig, ex: Examples, round_: int) -> np.ndarray | None:
    """The pooled training rows of round ``round_``: each user's as a federated round trains them (a negative
    pool's share, `round_training_rows`); None: every row."""
    if cfg.split != "loo" or cfg.negative_pool <= 1:
        return None
    bounds = np.r_[0, np.nonzero(np.diff(ex.user_id))[0] + 1, len(ex)]
    return np.concatenate([a + round_training_rows(ex.labels[a:b, 0], cfg.negative_pool, seed=cfg.seed,
                                                   user=int(ex.user_id[a]), round_=round_)
                           for a, b in zip(bounds[:-1], bounds[1:])])


def _evaluate(pm, data: UserTensors, ex: Examples, groups, slots, group_size: int) -> dict:
    probs = pm.predict_pooled(data, groups, slots)
    sums = MetricSums()
    labels = ex.labels[:, 0]
    bounds = np.r_[0, np.nonzero(np.diff(ex.user_id))[0] + 1, len(ex)] if len(ex) else np.zeros(1, np.int64)
    for a, b in zip(bounds[:-1], bounds[1:]):
        sums.add_user(labels[a:b], probs[a:b], group_size)
    return sums.finalize()


def run_centralized(cfg: FederationConfig, progress=None) -> dict:
    run = RunDir(cfg.run_dir, track=cfg.track)
    for name in ("metrics.jsonl", "summary.json"):
        (run.path / name).unlink(missing_ok=True)
    ds = Dataset(cfg.data_dir)
    lookups = Lookups.for_foundation(ds, cfg.foundation)
    part = make_partition(ds, partition_config(cfg))
    users = part.clients
    splits = user_splits(cfg, ds, users, lookups)
    foundation = load_foundation(cfg.foundation)
    foundation_params = count_parameters(foundation)  # before peft injects the adapters into it
    pm = build_personal_model(cfg, "centralized", user_slots=len(users), foundation=foundation)
    sizes = {"foundation_params": foundation_params,
             "shared_params": int(sum(np.prod(s) for _, s, _ in pm.shared_spec())),
             "private_params_per_user": int(sum(v.size for v in pm.initial_private.values()))}
    run.write_config({**cfg.to_run_config(), "model": sizes})
    cache = ensure_feature_cache(cfg)
    data = {k: cache.split(k) if cache is not None else pm.features(getattr(splits, k).iter_batches(BATCH))
            for k in ("train", "val", "test")}
    route = {k: _routing(pm, getattr(splits, k), users, lookups) for k in ("train", "val", "test")}
    # pooled data is ~1000x a user's: larger batches keep a round's step count sane (4x the local batch)
    local = LocalTraining(epochs=cfg.local_epochs, lr=cfg.lr, batch_size=POOLED_BATCH_FACTOR * cfg.batch_size,
                          listwise_weight=cfg.listwise_weight)
    t0 = time.time()
    history = []
    for r in range(cfg.num_rounds + 1):
        rec = {"round": r}
        if r > 0:
            rows = _round_rows(cfg, splits.train, r)
            train, (groups, slots) = data["train"], route["train"]
            if rows is not None:
                index = torch.from_numpy(rows)
                train, groups, slots = train.rows(index), groups[index], slots[index]
            rec["train_loss"] = pm.train_pooled(train, groups, slots, replace(local, lr=cfg.round_lr(r)),
                                                seed=cfg.seed * 100_003 + r)
            rec.update(bytes_down_per_client=0.0, bytes_up_per_client=0.0, selected=len(users), clients_ok=len(users))
        if r % cfg.eval_every == 0 or r == cfg.num_rounds:
            rec["eval"] = {s: _evaluate(pm, data[s], getattr(splits, s), *route[s], splits.group_size)
                           for s in ("val", "test")}
            rec["eval"]["users"] = len(users)
        rec["wall_s"] = time.time() - t0
        if r > 0:
            run.save_checkpoint(r, pm.get_shared(), {"algorithm": "centralized"})
            run.keep_last_checkpoints(cfg.keep_checkpoints)
        run.append_metrics(rec)
        history.append(rec)
        if progress:
            progress(r, cfg.num_rounds, rec.get("eval"))
    store = open_store(cfg.personal_store, cfg.personal_store_key_file)
    if store is not None:  # each user's adapter slot, where a federated run would have left it
        for slot, uid in enumerate(users):
            store.save(int(uid), pm.get_private(slot), {"algorithm": "centralized", "round": cfg.num_rounds,
                                                        "foundation": cfg.foundation})
    return write_summary(run, cfg, history, time.time() - t0, sizes)
