"""Everything a client process needs for its users, built once per process.

A Flower node serves one user (a device, or stock simulation) or a cohort of
users (fast simulation): node ``p`` of ``N`` serves the clients (private users) with
client indices ``p*C .. (p+1)*C-1`` where ``C = ceil(num_clients / N)``. The
frozen foundation, the dataset handles and each user's cached tower inputs are
kept here, keyed by configuration, so a process pays for them once, not once
per round.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from fedpa.client.device_data import COMPILED_DIR, DeviceData, foundation_digest
from fedpa.client.event_log import LOG_FILE, EventLog
from fedpa.client.feature_cache import FeatureCache, build, cache_key, default_root, entries, prune
from fedpa.common.config import FederationConfig
from fedpa.common.heap import freeze_long_lived, release_frozen
from fedpa.common.models import build_compiled_model, build_personal_model
from fedpa.foundation.device import resolve_device
from fedpa.foundation.errors import FedpaError
from fedpa.recdata.examples import Examples, Lookups, user_table
from fedpa.recdata.partition import (
    PartitionConfig,
    SplitConfig,
    UserSplits,
    make_partition,
    read_exposures,
    read_views,
    round_training_rows,
    select_domains,
    split_users,
)
from fedpa.recdata.schema import LABELS
from fedpa.recdata.stage_rows import with_stage_negatives
from fedpa.recdata.store import Dataset
from fedpa.recmodels.personalization import LocalTraining, PersonalModel, UserTensors, get_algorithm

if TYPE_CHECKING:   # imported where a node of several users first needs it (a device never does)
    from fedpa.recmodels.cohort import CohortEngine

EVAL_BATCH = 1024

log = logging.getLogger("fedpa.client")


def partition_config(cfg: FederationConfig) -> PartitionConfig:
    values = tuple(int(v) for v in cfg.active_values.split(",") if v.strip())
    return PartitionConfig(seed=cfg.partition_seed, active_top_fraction=cfg.active_top_fraction,
                           activity_attribute=cfg.activity_attribute or None, active_values=values,
                           open_active_fraction=cfg.open_active_fraction, open_rest_fraction=cfg.open_rest_fraction,
                           max_clients=cfg.max_clients or None, federate_open_users=cfg.federate_open_users)


def clients_of_node(partition_id: int, num_partitions: int, num_clients: int) -> range:
    if not 0 <= partition_id < num_partitions:
        raise FedpaError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    size = math.ceil(num_clients / num_partitions)
    return range(partition_id * size, min((partition_id + 1) * size, num_clients))


@dataclass
class UserData:
    user_id: int
    profile: np.ndarray
    train: UserTensors
    val: UserTensors
    test: UserTensors
    group_size: int
    reference: list[np.ndarray] | None = None  # val / test scored by the frozen foundation (computed once)
    split_rows: int | None = None  # the leading training rows that are the split's (None: all; a device's log
                                   # appends its own after them, which a negative pool never samples)


class ClientRuntime:
    def __init__(self, cfg: FederationConfig, *, compiled: bool = True):
        """``compiled``: on a device, train and score with its compiled model when it has one for this run's
        options (`recmodels.compiled`: torch alone, no modelling stack); False: always the full model."""
        self.cfg = cfg
        # a GPU asked for and absent: refused here, before anything is built or trained
        self.engine_device = resolve_device(cfg.engine_device, "engine-device")
        self.algorithm = get_algorithm(cfg.algorithm)
        path = Path(cfg.data_dir)
        self.dataset = Dataset(path)
        self.profiles = user_table(self.dataset)
        self._lookups: Lookups | None = None  # item tables: only built when a user's rows must be encoded
        # a device knows its own users (client index -> user id) and the population size, nothing else; a
        # simulated node derives both from the partition of the whole dataset
        self.device = DeviceData.open(cfg.device_data) if cfg.device_data else None
        self.partition = None if self.device else make_partition(self.dataset, partition_config(cfg))
        self.model = self._device_model(cfg) if self.device and compiled else build_personal_model(cfg)
        self.local = LocalTraining(epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                   ditto_lambda=cfg.ditto_lambda, listwise_weight=cfg.listwise_weight)
        self._users: dict[int, UserData] = {}
        self._base: dict[int, UserData] = {}    # a device's users before their logged events
        self._log_seq: dict[int, int] = {}      # the event log's sequence number their rows were read at
        self._log: EventLog | None = None
        self._exposures: dict[int, pa.Table] = {}   # a device user's provisioned exposures (its views' source)
        self._engine: CohortEngine | None = None
        self.cache = None if self.device else open_feature_cache(cfg, self.partition.clients)

    def _device_model(self, cfg: FederationConfig) -> PersonalModel:
        """The device's compiled model when it was made for this run and this foundation, else the full one
        (which imports transformers and peft: ~100 MiB more resident memory; the log says why)."""
        path = self.device.path / COMPILED_DIR
        if path.is_dir():
            from fedpa.recmodels.compiled import CompiledModelError

            try:
                return build_compiled_model(cfg, path, foundation_digest=foundation_digest(self.device.foundation_dir))
            except CompiledModelError as e:
                log.warning("%s: training with the full model", e)
        return build_personal_model(cfg)

    def local_for(self, round_: int) -> LocalTraining:
        """Local training settings of one round (the learning rate decays over rounds with lr-decay)."""
        return replace(self.local, lr=self.cfg.round_lr(round_), item_bias_lr=self.cfg.round_item_bias_lr(round_),
                       embedding_lr=self.cfg.round_embedding_lr(round_),
                       round=max(int(round_), 1))

    @property
    def lookups(self) -> Lookups:
        if self._lookups is None:
            self._lookups = Lookups.for_foundation(self.dataset, self.cfg.foundation)
        return self._lookups

    @property
    def cohort_engine(self) -> CohortEngine:
        if self._engine is None:
            from fedpa.recmodels.cohort import CohortEngine

            self._engine = CohortEngine(self.model, device=self.engine_device)
        return self._engine

    @property
    def num_clients(self) -> int:
        return self.device.num_clients if self.device else self.partition.num_clients

    def node_clients(self, partition_id: int, num_partitions: int) -> list[int]:
        """The client indices this node serves: a device's own, else its share of the partition."""
        if self.device:
            return sorted(self.device.clients)
        return list(clients_of_node(partition_id, num_partitions, self.num_clients))

    def user_of(self, client_index: int) -> int:
        if self.device:
            if client_index not in self.device.clients:
                raise FedpaError(f"client {client_index} is not held by this device (holds "
                                 f"{sorted(self.device.clients)})")
            return self.device.clients[client_index]
        return self.partition.user_of(client_index)

    def reference(self, data: UserData) -> list[np.ndarray] | None:
        """The user's validation and test rows scored by the frozen foundation, computed once per process (the
        foundation never changes); None when the algorithm has no foundation to compare with."""
        if data.reference is None:
            ref = [self.model.reference_scores(d) for d in (data.val, data.test)]
            data.reference = None if ref[0] is None else ref
        return data.reference

    def user(self, client_index: int) -> UserData:
        uid = self.user_of(client_index)
        if self.device is not None:
            return self._with_logged_events(uid)
        data = self._users.get(uid)
        if data is None:
            data = self._provisioned(uid)
            self._users[uid] = data
        return data

    def round_train(self, data: UserData, round_: int) -> UserTensors:
        """The rows a user trains on in round ``round_``: with a negative pool (split loo), every positive and
        that round's share of the sampled negatives (`round_training_rows`); otherwise every training row."""
        if self.cfg.split != "loo" or self.cfg.negative_pool <= 1:
            return data.train
        n = len(data.train) if data.split_rows is None else data.split_rows
        rows = round_training_rows(data.train.labels[:n, 0].numpy(), self.cfg.negative_pool, seed=self.cfg.seed,
                                   user=data.user_id, round_=max(int(round_), 1))
        return data.train.rows(torch.from_numpy(np.r_[rows, np.arange(n, len(data.train))]))

    def _provisioned(self, uid: int) -> UserData:
        """The user's rows as the dataset holds them (a simulated node's whole dataset, or a device's own)."""
        if self.cache is not None:
            return UserData(uid, self.profiles[uid], *self.cache.user(uid), group_size=self.cache.group_size)
        s = user_splits(self.cfg, self.dataset, np.array([uid]), self.lookups)
        feats = [self.model.features(ex.iter_batches(EVAL_BATCH)) for ex in (s.train, s.val, s.test)]
        return UserData(uid, self.profiles[uid], *feats, group_size=s.group_size)

    # ------------------------------------------------------------------ a device's event log

    def event_log(self) -> EventLog | None:
        """The device's interaction log (client/event_log.py), when it has one."""
        if self.device is None or not (self.device.path / LOG_FILE).exists():
            return None
        if self._log is None:
            self._log = EventLog(self.device.path / LOG_FILE, next(iter(self.device.clients.values())),
                                 num_items=len(self.lookups.item_table))
        return self._log

    def _with_logged_events(self, uid: int) -> UserData:
        """A device's user: the provisioned rows, and for training every logged impression whose labels had
        arrived when this round read the log (one read per round: a later label counts in the next)."""
        base = self._base.get(uid)
        if base is None:
            base = self._base[uid] = self._provisioned(uid)
        log = self.event_log()
        snap = log.snapshot() if log is not None and len(self.device.clients) == 1 else None
        if snap is None or not snap.labelled:
            self._users[uid] = base
            return base
        cached = self._users.get(uid)
        if cached is not None and self._log_seq.get(uid) == snap.seq:
            return cached
        ex = Examples.from_exposures(snap.exposures, self._views(uid, snap.exposures), self.lookups)
        logged = self.model.features(ex.iter_batches(EVAL_BATCH))
        train = UserTensors(*(None if a is None else torch.cat([a, b]) for a, b in
                              zip((base.train.features, base.train.labels, base.train.items),
                                  (logged.features, logged.labels, logged.items))))
        data = replace(base, train=train, split_rows=len(base.train))
        self._users[uid], self._log_seq[uid] = data, snap.seq
        return data

    def _views(self, uid: int, logged: pa.Table | None = None):
        """The user's effective views: the provisioned ones and those in the log."""
        rows = self._exposures.get(uid)
        if rows is None:   # the provisioned rows never change: read once, not at every recommendation
            rows = self._exposures[uid] = read_exposures(self.dataset, np.array([uid]))
        if logged is not None and logged.num_rows:
            rows = pa.concat_tables([rows.select(logged.column_names), logged])
        return read_views(self.dataset, np.array([uid]), rows)

    def candidate_rows(self, uid: int, candidates: np.ndarray, now_ms: int) -> UserTensors:
        """Tower inputs of ``candidates`` shown to the user at ``now_ms`` (what a device recommends from)."""
        return self.model.features(self.candidate_examples(uid, candidates, now_ms).iter_batches(EVAL_BATCH))

    def candidate_examples(self, uid: int, candidates: np.ndarray, now_ms: int) -> Examples:
        """Rows of ``candidates`` shown to the user at ``now_ms``, their sequence read from the data and the log."""
        log = self.event_log()
        snap = log.snapshot() if log is not None else None
        views = self._views(uid, snap.exposures if snap is not None else None)
        n = len(candidates)
        labels = np.full((n, len(LABELS)), -1, np.int8)
        return Examples.from_rows(np.full(n, uid, np.int64), np.full(n, now_ms, np.int64), candidates, labels,
                                  views, self.lookups)


def split_config(cfg: FederationConfig) -> SplitConfig:
    return SplitConfig(cfg.split, negatives=cfg.negatives, negative_pool=cfg.negative_pool)


def user_splits(cfg: FederationConfig, ds: Dataset, users: np.ndarray, lookups: Lookups) -> UserSplits:
    """The rows ``users`` train and are evaluated on: their exposures, split, and when a funnel stage is
    personalized, each request's negatives for that stage."""
    splits = split_users(ds, users, split_config(cfg), lookups=lookups, seed=cfg.seed)
    splits = select_domains(ds, splits, cfg.train_domains, cfg.eval_domains, cfg.eval_users, cfg.domains)
    if cfg.stage:
        splits = with_stage_negatives(ds, splits, users, cfg.stage, cfg.stage_negatives, cfg.seed, lookups)
    return splits


def _cache_path(cfg: FederationConfig, clients: np.ndarray) -> Path | None:
    if cfg.feature_cache == "none":
        return None
    root = Path(cfg.feature_cache) if cfg.feature_cache else default_root()
    rows = f"stage-negatives:{cfg.stage}:{cfg.stage_negatives}" if cfg.stage and cfg.stage_negatives else ""
    if cfg.split == "loo" and cfg.negative_pool > 1:
        rows += f"|negative-pool:{cfg.negative_pool}"
    if cfg.domains or cfg.train_domains or cfg.eval_domains:
        rows += f"|domains:{cfg.domains}:{cfg.train_domains}:{cfg.eval_domains}:{cfg.eval_users}"
    return root / cache_key(cfg.foundation, cfg.data_dir, cfg.split, cfg.negatives, cfg.seed, clients, rows)


def open_feature_cache(cfg: FederationConfig, clients: np.ndarray) -> FeatureCache | None:
    """The built entry of this run's clients, or None (a node then encodes its users' rows itself)."""
    return _open_entry(_cache_path(cfg, clients))


def _open_entry(path: Path | None) -> FeatureCache | None:
    if path is None or not (path / "meta.json").exists():
        return None
    try:
        return FeatureCache(path)
    except FileNotFoundError:   # pruned by another run between the check and the open
        return None


def ensure_feature_cache(cfg: FederationConfig, progress=None) -> FeatureCache | None:
    """Build the cache of every client's tower inputs unless it exists (simulation only)."""
    ds = Dataset(cfg.data_dir)
    part = make_partition(ds, partition_config(cfg))
    path = _cache_path(cfg, part.clients)
    if path is None:
        return None
    cache = _open_entry(path)
    if cache is not None:
        return cache
    from fedpa.foundation.model import load_foundation

    lookups = Lookups.for_foundation(ds, cfg.foundation)
    splits = user_splits(cfg, ds, part.clients, lookups)
    model = PersonalModel(load_foundation(cfg.foundation), get_algorithm("foundation"))
    source = {"data": str(Path(cfg.data_dir).resolve()), "foundation": str(Path(cfg.foundation).resolve()),
              "split": cfg.split, "seed": cfg.seed, "negatives": cfg.negatives,
              "negative-pool": cfg.negative_pool, "stage": cfg.stage, "users": len(part.clients)}
    cache = build(path, model, splits, part.clients, progress=progress, source=source)
    bound_feature_cache(path.parent, cfg.feature_cache_limit_gb, keep=path)
    return cache


def bound_feature_cache(root: Path, limit_gb: float, keep: Path) -> None:
    """Keep the cache root within ``limit_gb`` (0 = unbounded) by removing its least recently used entries."""
    if limit_gb <= 0:
        return
    removed = prune(root, max_bytes=int(limit_gb * 2**30), keep=[keep])
    if removed:
        log.warning("feature cache %s: removed %d least recently used entries (%.0f MiB) to stay within "
                    "feature-cache-limit-gb=%g", root, len(removed), sum(e.bytes for e in removed) / 2**20,
                    limit_gb)
    total = sum(e.bytes for e in entries(root))
    if total > limit_gb * 2**30:
        log.warning("feature cache %s holds %.0f MiB, over feature-cache-limit-gb=%g: what remains is in use "
                    "or this run's own entry", root, total / 2**20, limit_gb)


_RUNTIMES: dict[tuple, ClientRuntime] = {}


def get_runtime(cfg: FederationConfig) -> ClientRuntime:
    """The process-wide runtime for this configuration, rebuilt whenever a value it is built from changes
    (`FederationConfig.runtime_key`: every key not marked as read afresh from each message)."""
    key = cfg.runtime_key()
    rt = _RUNTIMES.get(key)
    if rt is None:
        if len(_RUNTIMES) >= 2:  # a process serves one run at a time; keep memory bounded
            _RUNTIMES.clear()
            release_frozen()   # what the dropped runtimes held is freed before the heap is frozen again
        torch.set_num_threads(1)
        rt = _RUNTIMES[key] = ClientRuntime(cfg)
        freeze_long_lived()    # the imports and the runtime live as long as the process: no full pass walks them
    return rt


def user_seed(seed: int, round_: int, user_id: int) -> int:
    return int(np.random.SeedSequence([seed, round_, user_id]).generate_state(1)[0])
