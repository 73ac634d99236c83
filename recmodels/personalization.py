"""How each algorithm personalizes the frozen foundation, for one user at a time.

Plain PyTorch (no Flower): the Flower client, the centralized baseline and the
benchmarks all run users through this module.

Speed: adapters sit on the prediction tower only (the default targets), so the
foundation's encoders are frozen *and* unaffected by personalization. A
user's tower inputs (``FoundationOutput.features``) are therefore computed once
(`PersonalModel.features`) and every local step afterwards is a small MLP with
low-rank paths: a local round costs milliseconds, not a transformer pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedpa.foundation.batch import ITEM_FIELDS
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.functional import masked_bce, masked_softmax_ce

from .adam import Adam
from .algorithms import ALGORITHMS, Algorithm, get_algorithm  # noqa: F401  (re-exported)
from .item_bias import (
    CLICKS,
    EMBEDDING,
    MISSING_ITEMS,
    PER_ROW,
    POPULARITY,
    TALLY,
    USER_VECTOR,
    ItemBias,
    newton_row_statistics,
)
from .item_bias import PREFIX as ITEM_BIAS_PREFIX

if TYPE_CHECKING:   # the modelling stack is imported where a model is built from it, never on a compiled device
    from fedpa.foundation.model import FoundationModel

    from .compiled import CompiledAdapters, CompiledFoundation


@dataclass(frozen=True)
class LocalTraining:
    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 64
    ditto_lambda: float = 0.1
    item_bias_lr: float | None = None  # the item-side tables' own learning rate (None: lr)
    embedding_lr: float | None = None  # the item embeddings' and user vectors' (None: item_bias_lr)
    round: int = 1                     # the federated round these settings train (schedules that depend on it)
    listwise_weight: float = 0.0       # the sampled-softmax term's weight beside binary cross-entropy (`local_loss`)

    def __post_init__(self):
        if self.epochs < 0:
            raise FedpaError(f"local epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise FedpaError(f"learning rate must be > 0, got {self.lr}")
        if self.item_bias_lr is not None and not self.item_bias_lr > 0:
            raise FedpaError(f"item-bias learning rate must be > 0, got {self.item_bias_lr}")
        if self.embedding_lr is not None and not self.embedding_lr > 0:
            raise FedpaError(f"item-embedding learning rate must be > 0, got {self.embedding_lr}")
        if self.batch_size < 1:
            raise FedpaError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.listwise_weight >= 0:
            raise FedpaError(f"listwise weight must be >= 0, got {self.listwise_weight}")


def local_loss(logits: torch.Tensor, labels: torch.Tensor, listwise: float = 0.0) -> torch.Tensor:
    """A mini-batch's training loss: binary cross-entropy over its observed labels, plus ``listwise`` times the
    sampled softmax of its positives against its negatives (in a federation the batch is one user's rows, so the
    softmax orders that user's items; in the pooled baseline, `train_pooled`, it contrasts the batch's users' rows).
    The one definition that one-user training, the cohort engine and the pooled baseline differentiate."""
    loss = masked_bce(logits, labels)
    if listwise:
        loss = loss + listwise * masked_softmax_ce(logits, labels)
    return loss


@dataclass
class UserTensors:
    """One user's cached tower inputs and labels for a split (and the rows' raw item features, which
    item-side tables read)."""

    features: torch.Tensor  # [n, D] float32
    labels: torch.Tensor    # [n, T] float32 (-1 = unobserved)
    items: torch.Tensor | None = None  # [n, len(ITEM_FIELDS)] int64

    def __len__(self) -> int:
        return self.features.shape[0]

    def rows(self, idx) -> UserTensors:
        return UserTensors(self.features[idx], self.labels[idx], None if self.items is None else self.items[idx])


class Scorer(torch.nn.Module):
    """Logits of cached rows: the (adapted) tower, plus shared item-side offsets when enabled."""

    def __init__(self, tower: torch.nn.Module, item_bias: ItemBias | None):
        super().__init__()
        self.tower = tower
        self.item_bias = item_bias

    def forward(self, x: torch.Tensor, items: torch.Tensor | None = None, slot: torch.Tensor | int = 0) -> torch.Tensor:
        logits = self.tower(x)
        if self.item_bias is not None:
            if items is None:
                raise FedpaError(MISSING_ITEMS)
            logits = logits + self.item_bias(items, slot)
        return logits


class PersonalModel:
    """The foundation with one algorithm's adapters, serving ``user_slots`` users (1 on a device).

    Shared tensors are exchanged as a flat dict of numpy arrays whose names come
    from `foundation.adapters.parameter_kinds` (group adapters: one entry per
    (attribute, value) row); private tensors likewise, per user slot.
    """

    def __init__(self, foundation: FoundationModel | CompiledFoundation, algorithm: Algorithm, *, seed: int = 0,
                 user_slots: int = 1, host: torch.nn.Module | None = None, compiled: CompiledAdapters | None = None,
                 item_bias_fields: tuple[str, ...] | list[str] = (), item_embedding_dim: int = 0,
                 item_rows: int = 0, item_popularity: bool | str = False, item_bias_newton: bool = False,
                 item_domains: np.ndarray | None = None,
                 **adapter_overrides):
        """``host``: personalize a stage head instead of the foundation's tower
        (`recmodels.stages.pointwise.StageHost`, scoring the same cached tower inputs).
        ``item_bias_fields``: shared item-side logit offsets keyed by these item fields
        (`recmodels.item_bias`; FedPA's model only). ``item_embedding_dim`` > 0: shared item embeddings and
        a private user vector beside them (the same module). ``item_domains``: each video id's domain code
        (`recdata.store.Dataset.item_domains`): FedPA's adapter gets a domain-specific shared path, each row
        routed by its item's domain (UniCDR+'s domain-specific part beside the domain-invariant paths).
        ``compiled``: the adapted tower as a device loads it (`recmodels.compiled`), with ``foundation`` its
        `CompiledFoundation`: no peft, no transformers; the same parameters, training and exchange."""
        self.algorithm = algorithm
        self.foundation = foundation
        self.host = host
        self.task_columns = foundation.label_columns if host is None else host.task_columns
        torch.manual_seed(seed)
        # how the adapted model is routed, indexed and restricted: peft's functions (foundation.adapters, imported
        # only here), or a compiled tower's methods of the same signatures
        self._ops = compiled
        if compiled is not None:
            if algorithm.preset is None or host is not None:
                raise FedpaError(f"a compiled model carries adapters of the foundation's tower (algorithm "
                                 f"'{algorithm.name}'{', a stage head' if host is not None else ''})")
            self.model = compiled
            self.config = None
            self.tower = compiled.tower
            self.group_attributes = list(compiled.group_attributes)
            self._index_parameters()
        elif algorithm.preset is None:
            self.model = None
            self.tower = foundation.tower if host is None else host.tower
            self.group_attributes: list[str] = []
            self._shared, self._private = {}, {}
        else:
            if host is not None:
                adapter_overrides = {"target_modules": host.adapter_targets, "head_module": "tower.head",
                                     **adapter_overrides}
            if item_domains is not None:
                adapter_overrides["domain_values"] = max(int(np.max(item_domains, initial=0)) + 1, 2)
            from fedpa.foundation import adapters as peft_ops
            from fedpa.foundation.adapters import adapter_config, attach_adapters

            self._ops = peft_ops
            cfg = adapter_config(foundation.config, algorithm.preset, user_slots=user_slots, **adapter_overrides)
            self.model = attach_adapters(foundation if host is None else host, cfg)
            self.config = cfg
            self.tower = self.model.get_base_model().tower
            self.group_attributes = list(cfg.group_attributes)
            self._index_parameters()
        self.item_bias = None
        # item-bias-update newton: the offset tables do not train locally; each user's per-row statistics at the
        # round's start travel instead (`item_statistics`, set by train_user)
        self.item_bias_newton = bool(item_bias_newton and item_bias_fields)
        self.item_statistics: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if item_bias_fields or item_embedding_dim or item_popularity:
            if algorithm.preset != "fedpa" or host is not None:
                raise FedpaError(f"item-side tables are a FedPA option for the foundation's scorer (algorithm "
                                 f"'{algorithm.name}'{', a stage head' if host is not None else ''})")
            self.item_bias = ItemBias(foundation.config, item_bias_fields, len(self.task_columns),
                                      embedding_dim=item_embedding_dim, user_slots=user_slots, seed=seed,
                                      max_rows=item_rows, popularity=item_popularity)
            for f, p in self.item_bias.tables.items():
                self._shared[ITEM_BIAS_PREFIX + f] = (p, None, PER_ROW)
            if item_embedding_dim:
                self._shared[EMBEDDING] = (self.item_bias.embedding, None, PER_ROW)
                self._private[USER_VECTOR] = (self.item_bias.user, True)
            if item_popularity:
                self._shared[CLICKS] = (self.item_bias.clicks, None, TALLY)
                self._shared[POPULARITY] = (self.item_bias.popularity_weight, None, None)
        self.scorer = Scorer(self.tower, self.item_bias)
        self.item_domains = None
        if item_domains is not None:
            if self.model is None:
                raise FedpaError(f"a domain-specific path needs adapters (algorithm '{algorithm.name}' has none)")
            self.item_domains = torch.as_tensor(np.asarray(item_domains, dtype=np.int64))
        self.group_columns = [foundation.config.user_fields.index(a) for a in self.group_attributes]
        self.initial_private = self.get_private(0) if self._private else {}
        # the private entry holding per-user logit offsets (use_user_bias), and the slots whose state was
        # set fresh: their offsets are calibrated on the user's own rows before its first local step
        self.user_bias_key = next((n for n in self._private if n.endswith(".lora_user_bias")), None)
        self._fresh: set[int] = set()

    def _index_parameters(self) -> None:
        params = dict(self.model.named_parameters())
        self._shared: dict[str, tuple[torch.Tensor, int | None, str | None]] = {}
        self._private: dict[str, tuple[torch.Tensor, bool]] = {}
        for name, k in self._ops.parameter_kinds(self.model).items():
            if k.kind == "shared":
                group = None if k.group is None else f"{k.group[0]}={k.group[1]}"
                self._shared[name] = (params[k.param], k.row, group)
            elif k.kind == "private":
                self._private[name] = (params[k.param], k.per_slot)

    # ------------------------------------------------------------------ exchange

    def shared_spec(self) -> list[tuple[str, tuple[int, ...], str | None]]:
        """(name, shape, group) of every shared entry; group None = shared by everyone, else 'attr=value'."""
        return [(n, tuple((p[r] if r is not None else p).shape), g) for n, (p, r, g) in self._shared.items()]

    def get_shared(self) -> dict[str, np.ndarray]:
        return {n: (p[r] if r is not None else p).detach().numpy().copy() for n, (p, r, _) in self._shared.items()}

    @torch.no_grad()
    def set_shared(self, values: Mapping[str, np.ndarray]) -> None:
        for n, (p, r, _) in self._shared.items():
            (p[r] if r is not None else p).copy_(torch.from_numpy(np.asarray(values[n])))

    def get_private(self, slot: int = 0) -> dict[str, np.ndarray]:
        return {n: (p[slot] if per_slot else p).detach().numpy().copy() for n, (p, per_slot) in self._private.items()}

    @torch.no_grad()
    def set_private(self, values: Mapping[str, np.ndarray] | None, slot: int = 0) -> None:
        if values is None:
            self._fresh.add(slot)
            values = self.initial_private
        else:
            self._fresh.discard(slot)
        for n, (p, per_slot) in self._private.items():
            if n not in values:
                raise FedpaError(f"personal state lacks '{n}' (was it saved by another algorithm or foundation?)")
            dst = p[slot] if per_slot else p
            v = torch.from_numpy(np.asarray(values[n]))
            if tuple(v.shape) != tuple(dst.shape):
                raise FedpaError(f"personal state '{n}' has shape {list(v.shape)}, the model expects {list(dst.shape)}")
            dst.copy_(v)

    @property
    def count_terms(self) -> int:
        """Counts beside the global one that a user's contribution moves by a unit norm each: one per
        group attribute, one per item-side table (`common.privacy.sensitivity`)."""
        tables = len(self.item_bias.table_names) + int(self.item_bias.popularity) if self.item_bias is not None else 0
        return len(self.group_attributes) + tables

    def group_values(self, profile: np.ndarray) -> dict[str, int]:
        return {a: int(profile[c]) for a, c in zip(self.group_attributes, self.group_columns)}

    def groups_of(self, profile: np.ndarray) -> set[str]:
        return {f"{a}={v}" for a, v in self.group_values(profile).items()}

    # ------------------------------------------------------------------ features

    @torch.no_grad()
    def features(self, batches) -> UserTensors:
        """Frozen tower inputs for a stream of batches (the foundation's encoders run once here)."""
        feats, labels, items = [], [], []
        for b in batches:
            feats.append(self._encoder(**b)[0])
            labels.append(b["labels"])
            items.append(b["item"])
        if not feats:
            return UserTensors(torch.zeros(0, self.tower_in), torch.zeros(0, 6),
                               torch.zeros(0, len(ITEM_FIELDS), dtype=torch.long))
        return UserTensors(torch.cat(feats), torch.cat(labels), torch.cat(items))

    @property
    def _encoder(self):
        # peft injects in place: the foundation object is the (adapted) base model, encoders untouched
        return self.foundation.encode

    @property
    def tower_in(self) -> int:
        if not hasattr(self.foundation, "tower"):   # a compiled foundation states it
            return self.foundation.tower_in
        return self.foundation.tower.fc1.in_features if hasattr(self.foundation.tower, "fc1") else 0

    # ------------------------------------------------------------------ one user

    def row_domains(self, data: UserTensors) -> torch.Tensor | None:
        """Each row's domain code, from its item (None without a domain-specific path; 0 = unknown item)."""
        if self.item_domains is None:
            return None
        if data.items is None:
            raise FedpaError("the domain-specific path routes rows by their item's domain: these rows carry no "
                             "item features")
        vid, table = data.items[:, 0].long(), self.item_domains
        return torch.where(vid < len(table), table[vid.clamp(0, len(table) - 1)], 0)

    def _route(self, data: UserTensors, groups: torch.Tensor | None, slot: int | torch.Tensor = 0):
        if self.model is None:
            return _nullcontext()
        n = len(data)
        g = None
        if groups is not None and self.group_columns:  # one user's values, or one row per example
            g = groups if groups.dim() == 2 else groups.reshape(1, -1).expand(n, -1)
        s = slot if isinstance(slot, torch.Tensor) else torch.full((n,), slot, dtype=torch.long)
        return self._ops.use_routing(self.model, group_index=g, user_slot=s, domain=self.row_domains(data))

    def _loss(self, data: UserTensors, groups, slot, listwise: float = 0.0) -> torch.Tensor:
        with self._route(data, groups, slot):
            logits = self.scorer(data.features, data.items, slot)
        return local_loss(logits, data.labels[:, self.task_columns], listwise)

    def _optimizer(self, train: LocalTraining) -> Adam:
        """Adam over the adapters (and the popularity weight) at lr, the item-side tables at their own lr."""
        main = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": main}]
        if self.item_bias is not None:
            weight = self.item_bias.popularity_weight if self.item_bias.popularity else None
            main += [weight] if weight is not None else []
            vectors = [self.item_bias.embedding, self.item_bias.user] if self.item_bias.embedding_dim else []
            tables = [p for p in self.item_bias.parameters() if p.requires_grad and p is not weight
                      and not any(p is v for v in vectors)
                      and not (self.item_bias_newton and any(p is t for t in self.item_bias.tables.values()))]
            if tables:
                groups.append({"params": tables, "lr": train.item_bias_lr or train.lr})
            if vectors:
                groups.append({"params": vectors, "lr": train.embedding_lr or train.item_bias_lr or train.lr})
        return Adam(groups, lr=train.lr)

    def touched_rows(self, data: UserTensors) -> dict[str, np.ndarray] | None:
        """Per-row counts this user contributes to the item-side tables, and the rows it adds to the click
        tally (None without them)."""
        if self.item_bias is None:
            return None
        if data.items is None:
            raise FedpaError(MISSING_ITEMS)
        out = self.item_bias.touched_rows(data.items)
        if self.item_bias.popularity:
            clicked = np.zeros(self.item_bias.emb_size, np.float32)
            clicked[self.item_bias.click_rows(data.items, data.labels)] = 1.0
            out[CLICKS] = clicked
        return out

    def train_user(self, data: UserTensors, profile: np.ndarray, train: LocalTraining, *,
                   seed: int, slot: int = 0, exclude: np.ndarray | None = None) -> dict[str, float]:
        """Local epochs for one user; returns the mean training loss and the example count. (``exclude``: items
        a model that samples its own negatives must not draw; these rows come with theirs.)"""
        self.item_statistics = {}   # this user's only: a user without rows sends none
        if self.model is None or train.epochs == 0 or len(data) == 0:
            return {"loss": float("nan"), "n": float(len(data))}
        groups = torch.as_tensor(profile[self.group_columns], dtype=torch.long) if self.group_columns else None
        logits = (self._calibrate_user_bias(data, groups, slot) if self.user_bias_key and slot in self._fresh
                  else None)
        if self.item_bias_newton:
            if logits is None:
                with torch.no_grad(), self._route(data, groups, slot):
                    logits = self.scorer(data.features, data.items, slot)
            self.item_statistics = newton_row_statistics(self.item_bias, logits, data.labels[:, self.task_columns],
                                                         data.items)
        gen = torch.Generator().manual_seed(int(seed))
        with self._others_clicks(data):
            if self.algorithm.ditto:
                # Ditto: the personal path with a proximal term to the received global path, then the global path.
                loss = self._epochs(data, groups, train, gen, slot, paths=("user",), prox=train.ditto_lambda)
                self._epochs(data, groups, train, gen, slot, paths=("global",))
                return {"loss": loss, "n": float(len(data))}
            return {"loss": self._epochs(data, groups, train, gen, slot), "n": float(len(data))}

    @contextlib.contextmanager
    def _others_clicks(self, data: UserTensors):
        """While a user trains, the click tally it reads leaves out its own clicks (the tally counts them from
        its earlier rounds): otherwise "I clicked it" would teach the popularity weight that clicked rows are
        popular. The tally is restored afterwards; what the user adds to it travels as its click rows
        (`touched_rows`), not as a delta."""
        if self.item_bias is None or not self.item_bias.popularity:
            yield
            return
        own = torch.from_numpy(self.item_bias.click_rows(data.items, data.labels))
        with torch.no_grad():
            self.item_bias.clicks[own] -= 1.0
        try:
            yield
        finally:
            with torch.no_grad():
                self.item_bias.clicks[own] += 1.0

    @torch.no_grad()
    def _calibrate_user_bias(self, data: UserTensors, groups, slot: int) -> torch.Tensor:
        """Sets a fresh slot's logit offsets from its rows; returns the rows' logits with them (the offsets add
        to the logits: no second scoring pass for what needs the start state)."""
        with self._route(data, groups, slot):
            logits = self.scorer(data.features, data.items, slot)
        bias, per_slot = self._private[self.user_bias_key]
        offsets = calibrated_bias(logits, data.labels[:, self.task_columns]).to(bias.dtype)
        (bias[slot] if per_slot else bias).copy_(offsets)
        self._fresh.discard(slot)
        return logits + offsets

    def _epochs(self, data, groups, train, gen, slot, paths=None, prox: float = 0.0) -> float:
        opt = self._optimizer(train)
        self._ops.set_active_paths(self.model, paths)
        total, count = 0.0, 0
        try:
            for _ in range(train.epochs):
                order = torch.randperm(len(data), generator=gen)
                for s in range(0, len(order), train.batch_size):
                    idx = order[s:s + train.batch_size]
                    loss = self._loss(data.rows(idx), groups, slot, train.listwise_weight)
                    if prox:
                        loss = loss + 0.5 * prox * self._ops.ditto_penalty(self.model)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
        finally:
            self._ops.set_active_paths(self.model, None)
        return total / max(count, 1)

    @torch.no_grad()
    def predict(self, data: UserTensors, profile: np.ndarray, slot: int = 0) -> np.ndarray:
        """Probability of the primary task (effective_view) for each row."""
        if len(data) == 0:
            return np.zeros(0, np.float32)
        groups = torch.as_tensor(profile[self.group_columns], dtype=torch.long) if self.group_columns else None
        paths = ("user",) if self.algorithm.ditto else None
        if self.model is not None:
            self._ops.set_active_paths(self.model, paths)
        try:
            with self._route(data, groups, slot):
                logits = self.scorer(data.features, data.items, slot)
        finally:
            if self.model is not None:
                self._ops.set_active_paths(self.model, None)
        return torch.sigmoid(logits[:, 0]).numpy()

    @torch.no_grad()
    def reference_scores(self, data: UserTensors) -> np.ndarray:
        """Probability of the primary task by the frozen foundation alone (adapters and item tables off):
        the reference each user's personalized scores are compared with."""
        if len(data) == 0:
            return np.zeros(0, np.float32)
        if self.model is None:
            return torch.sigmoid(self.tower(data.features)[:, 0]).numpy()
        with self.model.disable_adapter():
            return torch.sigmoid(self.tower(data.features)[:, 0]).numpy()

    @torch.no_grad()
    def example_losses(self, data: UserTensors, profile: np.ndarray, slot: int = 0) -> np.ndarray:
        """Per-row training loss (BCE summed over the observed tasks) with the current state."""
        if len(data) == 0:
            return np.zeros(0, np.float32)
        groups = torch.as_tensor(profile[self.group_columns], dtype=torch.long) if self.group_columns else None
        with self._route(data, groups, slot):
            logits = self.scorer(data.features, data.items, slot)
        y = data.labels[:, self.task_columns]
        seen = y >= 0
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.clamp(min=0), reduction="none")
        return (bce * seen).sum(dim=1).numpy()

    def personalized_scores(self, train: UserTensors, evals: list[UserTensors], profile: np.ndarray,
                            local: LocalTraining, *, seed: int) -> list[np.ndarray]:
        """Scores of a user's evaluation rows with the current state; PFedRec fine-tunes a copy of the
        received shared part on the user's training rows first (the state is restored afterwards)."""
        if not self.algorithm.finetune_before_eval or self.model is None:
            return [self.predict(e, profile) for e in evals]
        shared, private = self.get_shared(), self.get_private()
        self.train_user(train, profile, local, seed=seed)
        try:
            return [self.predict(e, profile) for e in evals]
        finally:
            self.set_shared(shared)
            self.set_private(private)


    # ------------------------------------------------------------------ many users in one model

    def train_pooled(self, data: UserTensors, groups: torch.Tensor, slots: torch.Tensor,
                     train: LocalTraining, *, seed: int) -> float:
        """One pass of ``train.epochs`` over pooled rows of many users (the centralized upper bound):
        each row routed to its user's slot and groups."""
        opt = self._optimizer(train)
        gen = torch.Generator().manual_seed(int(seed))
        total, count = 0.0, 0
        for _ in range(train.epochs):
            order = torch.randperm(len(data), generator=gen)
            for s in range(0, len(order), train.batch_size):
                idx = order[s:s + train.batch_size]
                loss = self._loss(data.rows(idx), groups[idx], slots[idx], train.listwise_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        return total / max(count, 1)

    @torch.no_grad()
    def predict_pooled(self, data: UserTensors, groups: torch.Tensor, slots: torch.Tensor) -> np.ndarray:
        out = []
        for s in range(0, len(data), 4096):
            sl = slice(s, s + 4096)
            part = data.rows(sl)
            with self._route(part, groups[sl], slots[sl]):
                out.append(torch.sigmoid(self.scorer(part.features, part.items, slots[sl])[:, 0]))
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


USER_BIAS_PRIOR_VAR = 1.0
"""Prior variance of a user's logit offset: users' base rates spread by about one unit of log-odds
(KuaiSAR-R: the std of users' smoothed click log-odds is 0.9); probed on validation, 0.5–2 within 0.001 AUC."""


@torch.no_grad()
def calibrated_bias(logits: torch.Tensor, labels: torch.Tensor, prior_var: float = USER_BIAS_PRIOR_VAR,
                    steps: int = 8, *, users: torch.Tensor | None = None, n_users: int = 1) -> torch.Tensor:
    """Per-task offsets b [T] that a user's rows ask of the model: the MAP estimate of
    y ~ Bernoulli(sigmoid(logit + b)) with b ~ N(0, prior_var), by Newton's method (convex, 1-D per task).

    ``labels`` [n, T] use -1 for unobserved; a task without observations gets 0. Few rows give an
    offset shrunk towards 0, many rows the user's own base rate relative to the model's.
    ``users`` [n] (row → 0..n_users-1): the rows of several users, each solved on its own rows → [n_users, T]."""
    seen = labels >= 0
    y = labels.clamp(min=0).double()
    z = logits.double()
    if users is None:
        b = torch.zeros(logits.shape[-1], dtype=torch.float64, device=logits.device)
        for _ in range(steps):
            p = torch.sigmoid(z + b)
            grad = ((p - y) * seen).sum(0) + b / prior_var
            hess = (p * (1 - p) * seen).sum(0) + 1.0 / prior_var
            b = b - grad / hess
        return b.to(logits.dtype)
    b = torch.zeros(n_users, logits.shape[-1], dtype=torch.float64, device=logits.device)
    for _ in range(steps):
        p = torch.sigmoid(z + b[users])
        grad = torch.zeros_like(b).index_add_(0, users, (p - y) * seen) + b / prior_var
        hess = torch.zeros_like(b).index_add_(0, users, p * (1 - p) * seen) + 1.0 / prior_var
        b = b - grad / hess
    return b.to(logits.dtype)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
