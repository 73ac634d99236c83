"""The cohort engine: many users' local training and scoring in one vectorized computation (`torch.func.vmap`
of `grad` over the same adapted tower), equal to one-user training to rounding in float64.

Design notes: docs/design/cohort-engine.md
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedpa.foundation.adapters import ditto_penalty, parameter_kinds, set_active_paths, use_routing
from fedpa.foundation.errors import FedpaError

from .adam import adam_update
from .item_bias import (
    CLICKS,
    EMBEDDING,
    MISSING_ITEMS,
    POPULARITY,
    USER_VECTOR,
    ItemBias,
    popularity_term,
    users_newton_row_statistics,
)
from .item_bias import PREFIX as ITEM_BIAS_PREFIX
from .personalization import LocalTraining, PersonalModel, UserTensors, calibrated_bias, local_loss


@dataclass
class CohortUser:
    """One user of a cohort: training rows, profile, private state (None = fresh) and seed."""

    train: UserTensors
    profile: np.ndarray
    private: Mapping[str, np.ndarray] | None
    seed: int
    user_id: int | None = None  # only to name the user in errors


@dataclass
class ChunkResult:
    """The outcome for a chunk of users (``users`` = their positions in the input list).

    ``private[k]``: user k's private state (numpy, as `PersonalModel.get_private`).
    ``deltas``: shared entry name -> (positions into ``users`` of the users who contribute to it,
    their deltas local − global stacked [k, *shape]); group entries list only that group's members,
    global entries every user. ``finite[k]``: False if user k's private state or update is not finite.
    Per-row (item-side) entries come as `RowDeltas`: each user's own rows and their deltas.
    ``rows``: per-row entry -> per user, the rows its training items read (its per-row counts).
    """

    users: np.ndarray
    private: list[dict[str, np.ndarray]]
    deltas: dict[str, tuple[np.ndarray, np.ndarray]]
    loss: np.ndarray
    n: np.ndarray
    finite: np.ndarray
    groups: list[set[str]] = field(default_factory=list)
    rows: dict[str, list[np.ndarray]] | None = None


@dataclass
class RowDeltas:
    """A per-row entry's deltas, sparse: for each user (``users``: positions in the chunk), the rows it holds
    and their deltas [len(rows), *row shape]; every other row of the table did not move for that user."""

    users: np.ndarray
    rows: list[np.ndarray]
    values: list[np.ndarray]
    # item-bias-update newton: each user's curvature sum per row, what it adds to the row's count (else 1 per row)
    weights: list[np.ndarray] | None = None

    def dense(self, k: int, shape: tuple[int, ...]) -> np.ndarray:
        """User k's delta as the whole table (tests, one-user comparisons)."""
        out = np.zeros(shape, self.values[k].dtype)
        out[self.rows[k]] = self.values[k]
        return out


@dataclass
class _Param:
    """How one trainable parameter becomes a per-user tensor."""

    name: str                 # parameter name inside the scorer (tower.* or item_bias.*)
    tensor: torch.Tensor      # the model's parameter (holds the global shared state)
    mode: str                 # "slot": private per-slot (user's own row); "group": the row of the user's
                              # group; "whole": the whole tensor (shared globally, or private unsliced);
                              # "rows": an item-side table's rows the chunk reads (`_ChunkRows`)
    private_key: str | None = None       # private-state entry name (slot mode and private whole)
    group_column: int | None = None      # index into PersonalModel.group_columns (group mode)
    group_keys: dict[int, str] = field(default_factory=dict)  # group value -> shared entry name
    shared_key: str | None = None        # shared entry name (whole, shared)
    field: str | None = None             # item field of an item-side table ("rows": the chunk's rows of it)


def _of(u: CohortUser) -> str:
    return "" if u.user_id is None else f" of user {u.user_id}"


class _ScorerLoss(nn.Module):
    """The personal model's scorer (adapted tower, item-side offsets) plus Ditto's proximal term, so one
    functional_call sees both."""

    def __init__(self, scorer: nn.Module):
        super().__init__()
        self.scorer = scorer

    def forward(self, x: torch.Tensor, items: torch.Tensor | None, y: torch.Tensor, prox: float,
                listwise: float) -> torch.Tensor:
        loss = local_loss(self.scorer(x, items), y, listwise)   # y: the task columns' labels (`_training_rows`)
        if prox:
            loss = loss + 0.5 * prox * ditto_penalty(self.scorer.tower)
        return loss


SCORE_ROWS = 8192
"""Padded rows scored at once (`CohortEngine._logits`): a group's activations, [rows × hidden] per layer, stay
nearer the cache. It pays in the recipe's Newton scoring pass over every training row (a `small` round 4–10 %
faster than with 65,536), and costs evaluation's few rows per user a little (docs/simulation.md, 2026-12-07)."""

VIDEO_KEY = "video"  # the video-id rows of the embeddings and the click tally among a chunk's tables (`_ChunkRows`)


class _ChunkRows:
    """Per user of a chunk, the item-side table rows its own data reads, and the rows' positions in them.

    A user's copy of a table needs only the rows that user reads: a row it never reads gets no gradient, and
    Adam leaves a row that never had a gradient exactly where it was. So the engine copies each table per user
    over its own rows only, [users, widest user's rows, ...] instead of [users, all rows, ...] (a video-id
    table has 131,072 rows; a user reads a few hundred). Position 0 of every user is the zero item's row,
    which padding rows read; the user's other rows follow in ascending order; a user with fewer rows than the
    widest repeats its last one (never read, never written back).

    Every user's rows are found at once, not user by user: the table rows of all the chunk's item tensors in
    one `ItemBias.rows` call, kept per tensor (`read`), and each user's sorted rows as one sorted array of
    codes user * span + row per table, so a row's position is one `searchsorted` for any number of users."""

    def __init__(self, item_bias: ItemBias, per_user: Sequence[Sequence[torch.Tensor]]):
        self.item_bias = item_bias
        self.keys = list(item_bias.fields) + ([VIDEO_KEY] if item_bias.reads_video_rows else [])
        n_fields = next(t for ts in per_user for t in ts).shape[-1]
        self.zero = {k: int(r.reshape(-1)[0])
                     for k, r in zip(self.keys, item_bias.rows(torch.zeros(1, n_fields, dtype=torch.long)))}
        tensors = [(u, t) for u, ts in enumerate(per_user) for t in ts]
        flat = [t.reshape(-1, n_fields) for _, t in tensors]
        read = item_bias.rows(torch.cat(flat)) if flat else [torch.zeros(0, dtype=torch.long) for _ in self.keys]
        sizes = [len(f) for f in flat]
        self._clicks: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        parts = [r.split(sizes) for r in read]
        # keyed by identity, with the tensor kept alive so that its id cannot be reused meanwhile
        self._read: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {
            id(t): (t, [p[j].reshape(t.shape[:-1]) for p in parts]) for j, (_, t) in enumerate(tensors)}
        owner = torch.cat([torch.full((n,), u, dtype=torch.long) for (u, _), n in zip(tensors, sizes)]
                          + [torch.zeros(0, dtype=torch.long)])
        n_users = len(per_user)
        self.rows: dict[str, list[torch.Tensor]] = {}
        self._codes: dict[str, torch.Tensor] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._span: dict[str, int] = {}
        self.index = {}
        for k, r in zip(self.keys, read):
            span = int(r.max()) + 1 if len(r) else 1
            mine = r != self.zero[k]
            codes = torch.unique(owner[mine] * span + r[mine])           # sorted: by user, then by row
            user = codes // span
            counts = torch.bincount(user, minlength=n_users)
            start = torch.cumsum(counts, 0) - counts
            self._codes[k], self._span[k], self._start[k] = codes, span, start
            # [users, 1 + most rows of a user]: the zero row, the user's rows, then its last row repeated
            row = codes % span
            last = torch.where(counts > 0, row[(start + counts - 1).clamp(min=0)] if len(row) else counts,
                               torch.full_like(counts, self.zero[k]))
            index = last[:, None].repeat(1, 1 + int(counts.max()) if n_users else 1)
            index[:, 0] = self.zero[k]
            index[user, 1 + torch.arange(len(codes)) - start[user]] = row
            self.index[k] = index
            self.rows[k] = [index[u, :1 + n] for u, n in enumerate(counts.tolist())]

    def read(self, items: torch.Tensor) -> list[torch.Tensor]:
        """`ItemBias.rows` of ``items``: found when the chunk was made for the tensors it was made from."""
        held = self._read.get(id(items))
        return held[1] if held is not None and held[0] is items else self.item_bias.rows(items)

    def positions(self, key: str, user: int | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Table rows of chunk user ``user`` (or of each row's user: a tensor like ``rows``) -> their positions in
        that user's own copy of table ``key``."""
        user = torch.as_tensor(user, dtype=torch.long)
        at = torch.searchsorted(self._codes[key], user * self._span[key] + rows.clamp(max=self._span[key] - 1))
        pos = 1 + at - self._start[key][user]
        return torch.where(rows == self.zero[key], torch.zeros_like(pos), pos)

    def local(self, items: torch.Tensor, user: int | torch.Tensor) -> torch.Tensor:
        """[..., F] raw item features of chunk user ``user`` (or of each row's user) -> [..., tables] positions
        into its own rows."""
        return torch.stack([self.positions(k, user, r) for k, r in zip(self.keys, self.read(items))], dim=-1)

    def local_many(self, items: Sequence[torch.Tensor], users: Sequence[int]) -> torch.Tensor:
        """`local` of several users' [n_i, F] items, concatenated: [Σ n_i, tables], in one pass."""
        if not items:
            return torch.zeros(0, len(self.keys), dtype=torch.long)
        owner = torch.cat([torch.full((len(t),), u, dtype=torch.long) for t, u in zip(items, users)])
        read = [self.read(t) for t in items]
        return torch.stack([self.positions(k, owner, torch.cat([r[j] for r in read]))
                            for j, k in enumerate(self.keys)], dim=-1)

    def click_rows(self, items: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """`ItemBias.click_rows` from the rows found for the chunk (once per tensor: training asks three times)."""
        held = self._clicks.get(id(items))
        if held is None or held[0] is not items:
            held = self._clicks[id(items)] = (items, self.item_bias.click_rows(items, labels,
                                                                                video_rows=self.read(items)[-1]))
        return held[1]


class _CompactTables(nn.Module):
    """Item-side offsets (and item embeddings times the user's vector) read from tables compacted to a chunk's
    rows (the per-user copies are passed in by `functional_call` under the names `ItemBias` uses)."""

    def __init__(self, item_bias: ItemBias):
        super().__init__()
        self.fields = list(item_bias.fields)
        self.n_out = item_bias.n_out
        self.tables = nn.ParameterDict({f: nn.Parameter(torch.zeros(1, self.n_out)) for f in self.fields})
        self.embedding_dim = item_bias.embedding_dim
        if self.embedding_dim:
            self.embedding = nn.Parameter(torch.zeros(1, self.embedding_dim))
            self.user = nn.Parameter(torch.zeros(1, self.embedding_dim))   # one user's vector (slot 0)
        self.popularity = item_bias.popularity
        if self.popularity:
            self.clicks = nn.Parameter(torch.zeros(1), requires_grad=False)
            self.popularity_weight = nn.Parameter(torch.zeros_like(item_bias.popularity_weight))

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        out = None
        for j, f in enumerate(self.fields):
            v = self.tables[f][local[..., j]]
            out = v if out is None else out + v
        if self.popularity:   # the tally is read, never trained (detached: its gradient is zero)
            pop = popularity_term(self.clicks.detach()[local[..., -1]], self.popularity_weight)
            out = pop if out is None else out + pop
        if self.embedding_dim:
            dot = (self.embedding[local[..., -1]] * self.user[0]).sum(-1)
            if out is None:
                out = dot.new_zeros(*dot.shape, self.n_out)
            out = torch.cat([out[..., :1] + dot.unsqueeze(-1), out[..., 1:]], dim=-1)
        return out


class _CompactScorer(nn.Module):
    """`PersonalModel.scorer` reading compacted tables (`_ChunkRows.local` positions instead of item features)."""

    def __init__(self, tower: nn.Module, item_bias: ItemBias):
        super().__init__()
        self.tower = tower
        self.item_bias = _CompactTables(item_bias)

    def forward(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return self.tower(x) + self.item_bias(local)


class CohortEngine:
    """Vectorized local training and scoring for many users of one `PersonalModel`.

    ``device`` (None: the CPU) is where the engine computes: the per-user parameter stacks, the rows, the
    schedule and Adam's state go there, and the scorer's frozen tensors travel as a copy in every
    `functional_call`; the model ``pm`` itself stays on the CPU, untouched. What it returns is numpy."""

    def __init__(self, pm: PersonalModel, max_users: int = 256, device: torch.device | str | None = None):
        if pm.model is None:
            raise ValueError(f"algorithm '{pm.algorithm.name}' has no adapters to train")
        self.pm = pm
        self.device = torch.device("cpu" if device is None else device)
        self._item_statistics = None   # item-bias-update newton: the current chunk's per-row statistics
        self.max_users = max(1, int(max_users))
        self.scorer = pm.scorer if pm.item_bias is None else _CompactScorer(pm.tower, pm.item_bias)
        self.loss_module = _ScorerLoss(self.scorer)
        # functional_call's search for tied weights walks every module at every call (a tenth of a one-user step);
        # it is only needed when one tensor sits under two names
        self._tied = (len(list(self.loss_module.named_parameters(remove_duplicate=False)))
                      != len(list(self.loss_module.named_parameters())))
        self.params = self._index()
        self.n_groups = len(pm.group_columns)
        self._frozen: dict[str, torch.Tensor] = {}   # the scorer's other tensors on the device (`_copy_frozen`)

    def _copy_frozen(self) -> None:
        """The scorer's tensors that are not per-user parameters (the frozen tower, buffers), copied to the
        device at the start of every call, so a model changed between calls is read afresh; on the CPU none is
        needed (`functional_call` reads them from the model)."""
        if self.device.type == "cpu":
            self._frozen = {}
            return
        per_user = {p.name for p in self.params}
        self._frozen = {name: t.detach().to(self.device)
                        for name, t in (*self.scorer.named_parameters(), *self.scorer.named_buffers())
                        if name not in per_user}

    # ------------------------------------------------------------------ parameter layout

    def _index(self) -> list[_Param]:
        tower_prefix = self._tower_prefix()
        by_param: dict[str, _Param] = {}
        model_params = dict(self.pm.model.named_parameters())
        for key, kind in parameter_kinds(self.pm.model).items():
            if kind.kind == "frozen":
                continue
            local = "tower." + kind.param[len(tower_prefix):]
            tensor = model_params[kind.param]
            if not kind.param.startswith(tower_prefix):
                raise ValueError(f"adapter parameter {kind.param} is outside the tower")
            if kind.kind == "private":
                by_param[local] = _Param(local, tensor, "slot" if kind.per_slot else "whole", private_key=key)
            elif kind.group is not None:
                p = by_param.get(local) or _Param(local, tensor, "group",
                                                  group_column=self.pm.group_attributes.index(kind.group[0]))
                p.group_keys[int(kind.group[1])] = key
                by_param[local] = p
            else:
                by_param[local] = _Param(local, tensor, "whole", shared_key=key)
        if self.pm.item_bias is not None:
            for f, tensor in self.pm.item_bias.tables.items():
                local = f"item_bias.tables.{f}"
                by_param[local] = _Param(local, tensor, "rows", shared_key=ITEM_BIAS_PREFIX + f, field=f)
            if self.pm.item_bias.embedding_dim:
                by_param["item_bias.embedding"] = _Param("item_bias.embedding", self.pm.item_bias.embedding, "rows",
                                                         shared_key=EMBEDDING, field=VIDEO_KEY)
                by_param["item_bias.user"] = _Param("item_bias.user", self.pm.item_bias.user, "slot",
                                                    private_key=USER_VECTOR)
            if self.pm.item_bias.popularity:
                by_param["item_bias.clicks"] = _Param("item_bias.clicks", self.pm.item_bias.clicks, "rows",
                                                      shared_key=CLICKS, field=VIDEO_KEY)
                by_param["item_bias.popularity_weight"] = _Param(
                    "item_bias.popularity_weight", self.pm.item_bias.popularity_weight, "whole", shared_key=POPULARITY)
        trainable = {n for n, p in self.pm.scorer.named_parameters() if p.requires_grad}
        missing = trainable - set(by_param)
        if missing:
            raise ValueError(f"trainable scorer parameter(s) without a kind: {sorted(missing)[:3]}")
        return [by_param[n] for n in sorted(by_param)]

    def _tower_prefix(self) -> str:
        for name, module in self.pm.model.named_modules():
            if module is self.pm.tower:
                return name + "."
        raise ValueError("the personal model's tower is not inside its adapted model")

    def _group_rows(self, users: Sequence[CohortUser]) -> np.ndarray:
        cols = self.pm.group_columns
        return np.array([[int(u.profile[c]) for c in cols] for u in users],
                        dtype=np.int64).reshape(len(users), len(cols))

    def _stack(self, users: Sequence[CohortUser], groups: np.ndarray,
               chunk_rows: _ChunkRows | None) -> dict[str, torch.Tensor]:
        """Per-user copies [C, ...] of every trainable parameter (the model holds the global state)."""
        c = len(users)
        out = {}
        for p in self.params:
            base = p.tensor.detach()
            if p.mode == "rows":
                out[p.name] = base[chunk_rows.index[p.field]].clone()
            elif p.mode == "group":
                out[p.name] = base[torch.from_numpy(groups[:, p.group_column])].unsqueeze(1).clone()
            elif p.private_key is not None:
                want = tuple(base.shape[1:]) if p.mode == "slot" else tuple(base.shape)
                rows = []
                for u in users:
                    state = u.private if u.private is not None else self.pm.initial_private
                    if p.private_key not in state:
                        raise FedpaError(f"personal state{_of(u)} lacks '{p.private_key}' (saved by another "
                                         "algorithm or foundation?)")
                    v = np.asarray(state[p.private_key])
                    if tuple(v.shape) != want:
                        raise FedpaError(f"personal state '{p.private_key}'{_of(u)} has shape {list(v.shape)}, "
                                         f"the model expects {list(want)}")
                    rows.append(torch.as_tensor(v, dtype=base.dtype))
                t = torch.stack(rows)
                out[p.name] = t.unsqueeze(1) if p.mode == "slot" else t
            else:
                out[p.name] = base.unsqueeze(0).expand(c, *base.shape).clone()
        return {name: t.to(self.device) for name, t in out.items()}

    def _chunk_rows(self, data: Sequence[Sequence[UserTensors]]) -> _ChunkRows | None:
        """The table rows each user's ``data`` (its splits) reads (None without item-side tables)."""
        if self.pm.item_bias is None:
            return None
        if any(d.items is None for ds in data for d in ds):
            raise FedpaError(MISSING_ITEMS)
        return _ChunkRows(self.pm.item_bias, [[d.items for d in ds] for ds in data])

    def _items(self, data: Sequence[UserTensors], chunk_rows: _ChunkRows | None, *, users: Sequence[int] | None = None,
               pad_rows: int = 0, width: int | None = None):
        """The rows' positions in their users' table rows (None without tables; ``users``: each data's chunk
        position, default 0..n-1): concatenated with ``pad_rows`` zero rows, or padded per user to
        [users, width, tables] (``width``). Found on the host, where the rows' items are, and sent at once."""
        if chunk_rows is None:
            return None
        users = list(range(len(data))) if users is None else list(users)
        n_keys = len(chunk_rows.keys)
        found = chunk_rows.local_many([d.items for d in data], users)
        if width is None:
            return torch.cat([found, torch.zeros(pad_rows, n_keys, dtype=torch.long)]).to(self.device)
        out = torch.zeros(len(data), width, n_keys, dtype=torch.long)
        for k, part in enumerate(found.split([len(d) for d in data])):
            out[k, :len(part)] = part
        return out.to(self.device)

    def _domains(self, data: Sequence[UserTensors], *, pad_rows: int = 0, width: int | None = None):
        """Each row's domain code (the domain-specific path; None without one): concatenated with ``pad_rows``
        zeros, or padded per user to [users, width] (``width``). Checked here, outside vmap."""
        if self.pm.item_domains is None:
            return None
        if width is None:
            return torch.cat([self.pm.row_domains(d) for d in data]
                             + [torch.zeros(pad_rows, dtype=torch.long)]).to(self.device)
        out = torch.zeros(len(data), width, dtype=torch.long)
        for k, d in enumerate(data):
            out[k, :len(d)] = self.pm.row_domains(d)
        return out.to(self.device)

    def _domain_routing(self, domains: torch.Tensor | None, zeros_g: torch.Tensor, zeros_s: torch.Tensor):
        """Inside a vmapped call: the same routing with this user's rows' domain codes (batched under vmap)."""
        if domains is None:
            return contextlib.nullcontext()
        return use_routing(self.pm.model, group_index=zeros_g if self.n_groups else None, user_slot=zeros_s,
                           domain=domains)

    # ------------------------------------------------------------------ training

    def train(self, users: Sequence[CohortUser], shared: Mapping[str, np.ndarray] | None,
              local: LocalTraining) -> Iterator[ChunkResult]:
        """Local training of every user from ``shared`` (None: the model's current shared state) and its
        private state; yields one `ChunkResult` per chunk. The model's parameters are left as they were."""
        if shared:
            self.pm.set_shared(shared)
        self._copy_frozen()
        for chunk in self._chunks(users, local):
            sub = [users[i] for i in chunk]
            groups = self._group_rows(sub)
            chunk_rows = self._chunk_rows([[u.train] for u in sub])
            params, loss_sum = self._fit(sub, groups, local, chunk_rows)
            n = np.array([len(u.train) for u in sub], dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                loss = (np.full(len(sub), np.nan) if loss_sum is None
                        else np.where(n > 0, loss_sum.cpu().numpy() / (n * local.epochs), np.nan))
            yield self._result(chunk, sub, groups, params, loss, n, chunk_rows)

    def _chunks(self, users: Sequence[CohortUser], local: LocalTraining) -> list[np.ndarray]:
        # by size: a chunk's users then have about as many steps and rows per step (little padding)
        order = np.argsort(np.array([len(u.train) for u in users]), kind="stable")
        return [order[s:s + self.max_users] for s in range(0, len(order), self.max_users)]

    def _phases(self) -> list[tuple[tuple[str, ...] | None, bool]]:
        """(active paths, proximal term?) of each training phase, as `PersonalModel.train_user` runs them."""
        if self.pm.algorithm.ditto:
            return [(("user",), True), (("global",), False)]
        return [(None, False)]

    def _fit(self, users: Sequence[CohortUser], groups: np.ndarray, local: LocalTraining,
             chunk_rows: _ChunkRows | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The chunk's parameters after local training, and each user's loss summed over the first phase's
        rows (None when nothing trained), both on the device."""
        params = self._stack(users, groups, chunk_rows)
        sizes = np.array([len(u.train) for u in users])
        if local.epochs == 0 or sizes.sum() == 0:
            return params, None
        feats, labels, items, domains = self._training_rows(users, chunk_rows)
        pad = len(feats) - 1
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        scored = self._calibrate_fresh(users, params, chunk_rows) if self.pm.user_bias_key else {}
        self._item_statistics = (self._newton_statistics(users, params, chunk_rows, scored)
                                 if self.pm.item_bias_newton else None)
        popularity = self.pm.item_bias is not None and self.pm.item_bias.popularity
        if popularity:
            self._count_clicks(users, params, chunk_rows, -1.0)
        gens = [torch.Generator().manual_seed(int(u.seed)) for u in users]   # on the host: the CPU's permutations
        loss_phase0 = None
        for k, (paths, prox) in enumerate(self._phases()):
            index, counts = self._schedule(sizes, offsets, gens, local, pad)
            loss_sum = self._run_phase(params, feats, items, labels, index, counts.numpy(), local, paths,
                                       local.ditto_lambda if prox else 0.0, domains)
            if k == 0:
                loss_phase0 = loss_sum
        if popularity:
            self._count_clicks(users, params, chunk_rows, +1.0)
        return params, loss_phase0

    def _training_rows(self, users: Sequence[CohortUser], chunk_rows: _ChunkRows | None):
        """Every user's training rows one after another, then one all-unobserved padding row, on the device:
        tower inputs, the task columns' labels, item positions (`_items`) and domain codes (`_domains`)."""
        train = [u.train for u in users]
        feats = torch.cat([d.features for d in train] + [train[0].features.new_zeros(1, self.pm.tower_in)])
        labels = torch.cat([d.labels[:, self.pm.task_columns] for d in train]
                           + [train[0].labels.new_full((1, len(self.pm.task_columns)), -1.0)])
        items = self._items(train, chunk_rows, pad_rows=1)
        return feats.to(self.device), labels.to(self.device), items, self._domains(train, pad_rows=1)

    @torch.no_grad()
    def _calibrate_fresh(self, users: Sequence[CohortUser], params: dict[str, torch.Tensor],
                         chunk_rows: _ChunkRows | None) -> dict[int, torch.Tensor]:
        """Users starting fresh get their logit offsets from their own rows, as `PersonalModel.train_user`
        sets them (`calibrated_bias`) before the first step: their rows scored at once (`_logits`), then one
        Newton solve over every fresh user's rows. Returns each fresh user's logits with its new offset (user
        index -> [rows, T]): the offset adds to the logits, so the Newton statistics need no second pass."""
        fresh = [i for i, u in enumerate(users) if u.private is None and len(u.train)]
        if not fresh:
            return {}
        name = next(p.name for p in self.params if p.private_key == self.pm.user_bias_key)
        empty = users[0].train.rows(slice(0, 0))
        data = [u.train if u.private is None else empty for u in users]
        logits = self._logits(params, data, chunk_rows, paths=None)
        owner = torch.cat([torch.full((len(data[i]),), k, dtype=torch.long) for k, i in enumerate(fresh)])
        labels = torch.cat([data[i].labels[:, self.pm.task_columns] for i in fresh])
        offsets = calibrated_bias(torch.cat([logits[i] for i in fresh]), labels.to(self.device),
                                  users=owner.to(self.device), n_users=len(fresh))
        params[name][torch.as_tensor(fresh, device=self.device), 0] = offsets
        return {i: logits[i] + offsets[k] for k, i in enumerate(fresh)}

    @torch.no_grad()
    def _newton_statistics(self, users: Sequence[CohortUser], params: dict[str, torch.Tensor],
                           chunk_rows: _ChunkRows | None,
                           scored: Mapping[int, torch.Tensor]) -> dict[str, tuple[list, list, list]]:
        """item-bias-update newton: each user's per-row statistics at the start state (`newton_row_statistics`),
        as `PersonalModel.train_user` computes them: table -> (rows, -Σ(p - y), Σ p(1 - p)) per user. Users in
        ``scored`` (index -> logits at the start state) are not scored again."""
        empty = users[0].train.rows(slice(0, 0))
        logits = self._logits(params, [empty if k in scored else u.train for k, u in enumerate(users)], chunk_rows,
                              paths=None)
        logits = torch.cat([scored.get(k, z).cpu() for k, z in enumerate(logits)])   # they travel as numpy
        train = [u.train for u in users]
        labels = torch.cat([d.labels[:, self.pm.task_columns] for d in train])
        read = [chunk_rows.read(d.items) for d in train]
        rows = [torch.cat([r[j] for r in read]) for j in range(len(chunk_rows.keys))]
        owner = torch.cat([torch.full((len(d),), k, dtype=torch.long) for k, d in enumerate(train)])
        return users_newton_row_statistics(self.pm.item_bias, logits, labels, rows, owner, len(users))

    @torch.no_grad()
    def _count_clicks(self, users: Sequence[CohortUser], params: dict[str, torch.Tensor],
                      chunk_rows: _ChunkRows, sign: float) -> None:
        """Each user's copy of the click tally without its own clicks while it trains (``sign`` -1), and with
        them again afterwards (+1), as `PersonalModel.train_user` reads it."""
        clicked = [torch.from_numpy(chunk_rows.click_rows(u.train.items, u.train.labels)) if len(u.train)
                   else torch.zeros(0, dtype=torch.long) for u in users]
        owner = torch.cat([torch.full((len(r),), k, dtype=torch.long) for k, r in enumerate(clicked)])
        if len(owner):   # a user's click rows are distinct: one write per (user, row)
            at = chunk_rows.positions(VIDEO_KEY, owner, torch.cat(clicked))
            params["item_bias.clicks"][owner.to(self.device), at.to(self.device)] += sign

    @staticmethod
    def _schedule(sizes, offsets, gens, local: LocalTraining, pad: int):
        """Row indices [C, S, batch] of every user's step s (its own permutations, epoch after epoch) and the
        real rows per step [C, S]; padding points at the all-unobserved row ``pad``."""
        bs = local.batch_size
        per_user = []
        for size, off, gen in zip(sizes, offsets, gens):
            batches = []
            for _ in range(local.epochs):
                if size == 0:
                    continue
                order = torch.randperm(int(size), generator=gen) + int(off)
                batches.extend(order[s:s + bs] for s in range(0, int(size), bs))
            per_user.append(batches)
        steps = max(max(len(b) for b in per_user), 1)
        index = torch.full((len(sizes), steps, bs), pad, dtype=torch.long)
        counts = torch.zeros((len(sizes), steps), dtype=torch.long)
        for i, batches in enumerate(per_user):
            for s, b in enumerate(batches):
                index[i, s, :len(b)] = b
                counts[i, s] = len(b)
        return index[:, :, :max(int(counts.max()), 1)], counts

    def _run_phase(self, params: dict[str, torch.Tensor], feats, items, labels, index, counts: np.ndarray,
                   local: LocalTraining, paths, prox: float, domains: torch.Tensor | None = None) -> torch.Tensor:
        """One phase of local training for a chunk; updates ``params`` in place, returns each user's loss sum
        (float64, on the engine's device).

        Users come sorted by size (`_chunks`), so the users still training at step s are a suffix of the
        chunk, all at their (s+1)-th Adam step: their tensors are views, their bias corrections scalars.
        ``counts`` (real rows per user and step) is numpy: which users still train is decided on the host,
        without reading the device."""
        index = index.to(self.device)
        c, steps, bs = index.shape
        loss_sum = torch.zeros(c, dtype=torch.float64, device=self.device)
        weights = torch.as_tensor(counts, dtype=torch.float64).to(self.device)
        zeros_g = torch.zeros(bs, self.n_groups, dtype=torch.long, device=self.device)
        zeros_s = torch.zeros(bs, dtype=torch.long, device=self.device)
        frozen = {f"scorer.{n}": t for n, t in self._frozen.items()}

        def one_user(p, q, x, k, y, d):
            with self._domain_routing(d, zeros_g, zeros_s):
                return functional_call(self.loss_module,
                                       {**frozen, **{f"scorer.{n}": val for n, val in (*p.items(), *q.items())}},
                                       (x, k, y, prox, local.listwise_weight), tie_weights=self._tied)

        step_fn = vmap(grad_and_value(one_user), in_dims=(0, 0, 0, None if items is None else 0, 0,
                                                           None if domains is None else 0))
        # the item-side tables step at their own learning rate; the adapters and the popularity weight at lr
        # (item-bias-update newton: the offset tables do not train locally, their newton statistics travel; the
        # item embeddings and the user's vector still do)
        items_lr = local.lr if local.item_bias_lr is None else local.item_bias_lr
        vectors_lr = items_lr if local.embedding_lr is None else local.embedding_lr
        rate = {n: 0.0 if self.pm.item_bias_newton and n.startswith("item_bias.tables.")
                else vectors_lr if n in ("item_bias.embedding", "item_bias.user")
                else items_lr if n.startswith("item_bias.") and n != "item_bias.popularity_weight"
                else local.lr for n in params}
        # what does not step (the Newton tables, the click tally) is read, not differentiated: no gradient,
        # no Adam moments over a table of every user's rows (Adam at rate 0 would leave it where it is)
        fixed = {p.name for p in self.params if rate[p.name] == 0.0 or not p.tensor.requires_grad}
        names = [n for n in params if n not in fixed]
        rates = [rate[n] for n in names]
        m = {n: torch.zeros_like(params[n]) for n in names}
        v = {n: torch.zeros_like(params[n]) for n in names}
        set_active_paths(self.pm.model, paths)
        try:
            with use_routing(self.pm.model, group_index=zeros_g if self.n_groups else None, user_slot=zeros_s):
                for s in range(steps):
                    active = counts[:, s] > 0
                    first = int((~active).sum())
                    if first == c:
                        break
                    if not active[first:].all():
                        raise AssertionError("cohort chunk is not sorted by size")
                    sub = {n: params[n][first:] for n in names}
                    read = {n: params[n][first:] for n in fixed}
                    rows = index[first:, s]
                    grads, loss = step_fn(sub, read, feats[rows], None if items is None else items[rows], labels[rows],
                                          None if domains is None else domains[rows])
                    loss_sum[first:] += loss.double() * weights[first:, s]
                    # Adam's update for every live user at once (their (s+1)-th step)
                    adam_update([sub[n] for n in names], [grads[n] for n in names], [m[n][first:] for n in names],
                                [v[n][first:] for n in names], s + 1, rates)
        finally:
            set_active_paths(self.pm.model, None)
        return loss_sum

    def _result(self, chunk: np.ndarray, users: Sequence[CohortUser], groups: np.ndarray,
                params: dict[str, torch.Tensor], loss: np.ndarray, n: np.ndarray,
                chunk_rows: _ChunkRows | None) -> ChunkResult:
        c = len(users)
        private = [dict() for _ in range(c)]
        deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        finite = np.ones(c, dtype=bool)
        everyone = np.arange(c)
        for p in self.params:
            val = params[p.name].detach().cpu()
            finite &= torch.isfinite(val.reshape(c, -1)).all(dim=1).numpy()
            if p.mode == "rows" and self._item_statistics and p.shared_key in self._item_statistics:
                rows_k, g_k, h_k = self._item_statistics[p.shared_key]   # item-bias-update newton
                deltas[p.shared_key] = RowDeltas(everyone, rows_k, g_k, weights=h_k)
            elif p.mode == "rows":  # each user's own rows: the others did not move
                held = chunk_rows.rows[p.field]
                moved = (val - p.tensor.detach()[chunk_rows.index[p.field]]).numpy()   # every user's copy at once
                deltas[p.shared_key] = RowDeltas(everyone, [r.numpy() for r in held],
                                                 [moved[k, :len(r)] for k, r in enumerate(held)])
            elif p.private_key is not None:
                arr = (val[:, 0] if p.mode == "slot" else val).numpy()
                for k in range(c):
                    private[k][p.private_key] = arr[k].copy()
            elif p.mode == "group":
                base = p.tensor.detach()
                col = groups[:, p.group_column]
                for value, key in p.group_keys.items():
                    members = np.nonzero(col == value)[0]
                    if len(members):
                        d = val[torch.from_numpy(members), 0] - base[value]
                        deltas[key] = (members, d.numpy())
            else:
                deltas[p.shared_key] = (everyone, (val - p.tensor.detach()).numpy())
        group_sets = [{f"{a}={int(g)}" for a, g in zip(self.pm.group_attributes, row)} for row in groups]
        rows = None
        if self.pm.item_bias is not None:
            table = self.pm.item_bias
            read = [chunk_rows.read(u.train.items) for u in users]
            rows = {name: [np.unique(r[j].reshape(-1).numpy()) for r in read]
                    for j, name in enumerate(table.table_names)}
            if table.popularity:
                rows[CLICKS] = [chunk_rows.click_rows(u.train.items, u.train.labels) for u in users]
        return ChunkResult(users=np.asarray(chunk), private=private, deltas=deltas, loss=loss, n=n,
                           finite=finite, groups=group_sets, rows=rows)

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def predict(self, users: Sequence[CohortUser], evals: Sequence[Sequence[UserTensors]],
                shared: Mapping[str, np.ndarray] | None, local: LocalTraining) -> list[list[np.ndarray]]:
        """Scores (effective_view probability) of each user's evaluation splits with its personalized model:
        what `PersonalModel.personalized_scores` returns user by user (PFedRec fine-tunes first; Ditto scores
        with its personal path)."""
        if shared:
            self.pm.set_shared(shared)
        self._copy_frozen()
        out: list[list[np.ndarray]] = [[] for _ in users]
        finetune = self.pm.algorithm.finetune_before_eval
        for chunk in self._chunks(users, local):
            sub = [users[i] for i in chunk]
            groups = self._group_rows(sub)
            # the tables' rows scoring reads, and fine-tuning's (PFedRec) when it trains first
            chunk_rows = self._chunk_rows([((users[i].train,) if finetune else ()) + tuple(evals[i]) for i in chunk])
            if finetune:
                with torch.enable_grad():
                    params, _ = self._fit(sub, groups, local, chunk_rows)
            else:
                params = self._stack(sub, groups, chunk_rows)
            for split in range(len(evals[chunk[0]])):
                scores = self._score(params, [evals[i][split] for i in chunk], chunk_rows)
                for k, i in enumerate(chunk):
                    out[i].append(scores[k])
        return out

    def _score(self, params: dict[str, torch.Tensor], data: Sequence[UserTensors], chunk_rows: _ChunkRows | None,
               max_rows: int = SCORE_ROWS) -> list[np.ndarray]:
        """Each user's rows through its own parameters: effective_view probabilities (Ditto scores with its
        personal path)."""
        paths = ("user",) if self.pm.algorithm.ditto else None
        return [torch.sigmoid(z[:, 0]).cpu().numpy().copy()
                for z in self._logits(params, data, chunk_rows, paths=paths, max_rows=max_rows)]

    def _logits(self, params: dict[str, torch.Tensor], data: Sequence[UserTensors], chunk_rows: _ChunkRows | None,
                *, paths: tuple[str, ...] | None, max_rows: int = SCORE_ROWS) -> list[torch.Tensor]:
        """Each user's rows through its own parameters (``data[k]`` read with user k's, ``paths`` active):
        logits [rows, T] per user; users padded to a common length in groups of similar sizes (at most
        ``max_rows`` padded rows at once)."""
        out: list[torch.Tensor] = [torch.zeros(0, len(self.pm.task_columns), device=self.device) for _ in data]
        sizes = np.array([len(d) for d in data])
        order = [int(i) for i in np.argsort(sizes, kind="stable") if sizes[i] > 0]

        with_domains = self.pm.item_domains is not None

        def one_user(p, xu, ku, du):
            with self._domain_routing(du, zeros_g, zeros_s):
                return functional_call(self.scorer, {**self._frozen, **p}, (xu, ku), tie_weights=self._tied)

        with_items = self.pm.item_bias is not None
        score_fn = vmap(one_user, in_dims=(0, 0, 0 if with_items else None, 0 if with_domains else None))

        set_active_paths(self.pm.model, paths)
        try:
            start = 0
            while start < len(order):
                stop = start + 1
                # a group pads its users to its largest: bound the padded rows and the waste (a fifth)
                while (stop < len(order) and (stop + 1 - start) * sizes[order[stop]] <= max_rows
                       and sizes[order[stop]] <= 1.25 * sizes[order[start]] + 16):
                    stop += 1
                group = order[start:stop]
                width = int(sizes[group[-1]])
                x = data[group[0]].features.new_zeros(len(group), width, self.pm.tower_in)
                items = (self._items([data[i] for i in group], chunk_rows, users=group, width=width)
                         if with_items else None)
                for k, i in enumerate(group):
                    x[k, :sizes[i]] = data[i].features
                x = x.to(self.device)
                sel = torch.as_tensor(group, device=self.device)
                sub = {n: v[sel] for n, v in params.items()}
                zeros_g = torch.zeros(width, self.n_groups, dtype=torch.long, device=self.device)
                zeros_s = torch.zeros(width, dtype=torch.long, device=self.device)
                domains = self._domains([data[i] for i in group], width=width) if with_domains else None
                with use_routing(self.pm.model, group_index=zeros_g if self.n_groups else None, user_slot=zeros_s):
                    logits = score_fn(sub, x, items, domains)
                for k, i in enumerate(group):
                    out[i] = logits[k, :sizes[i]]
                start = stop
        finally:
            set_active_paths(self.pm.model, None)
        return out
