"""From canonical tables to model batches (the contract in `foundation.batch`).

An `Examples` set is a table of (user, request time, candidate item, labels)
rows plus, per row, a window into the user's time-sorted effective views. The
behaviour sequence of a row is the last `SEQ_LEN` views *strictly before* its
request timestamp, gathered only when a batch is built: memory stays O(rows),
and no row can see a view from its own request or later.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fedpa.foundation.batch import ITEM_FIELDS, TASKS

from .interest_graph import expand_histories
from .schema import LABELS, SEQ_LEN
from .store import Dataset, DatasetError

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000


@dataclass
class Lookups:
    """Dense id → feature tables for a dataset (built once, shared by all examples)."""

    item_table: np.ndarray  # [max_video_id + 1, F] in ITEM_FIELDS order
    user_table: np.ndarray  # [max_user_id + 1, P] in user_fields order
    user_fields: list[str]
    seq_len: int = SEQ_LEN  # views per behaviour sequence: the foundation's config decides (ELASTIC reads 1,000+)
    graph: np.ndarray | None = None  # item -> co-viewed items (recdata.interest_graph), for sparse users
    expand: int = 0                  # empty history slots filled from the graph (0 = none)

    @classmethod
    def for_foundation(cls, ds: Dataset, foundation: str | Path) -> Lookups:
        """The tables for rows a foundation scores: its history length, and its interest graph if it has one."""
        import json

        from .interest_graph import load_graph

        try:
            config = json.loads((Path(foundation) / "config.json").read_text())
            graph = load_graph(foundation)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{foundation}: cannot read the foundation's config or interest graph ({e})") from None
        lk = cls.build(ds, seq_len=int(config.get("seq_len", SEQ_LEN)))
        expand = int(config.get("graph_expansion", 0))
        if expand and graph is not None:
            lk.graph, lk.expand = graph, expand
        return lk

    @classmethod
    def build(cls, ds: Dataset, seq_len: int = SEQ_LEN) -> Lookups:
        items = ds.items(["video_id", *ITEM_FIELDS[1:]])
        vid = items.column("video_id").to_numpy()
        n_items = max(int(ds.vocab.get("video_id", 0)), int(vid.max()) + 1 if len(vid) else 0)
        item_table = np.zeros((n_items, len(ITEM_FIELDS)), dtype=np.int64)
        item_table[:, 0] = np.arange(n_items)  # unknown items still get their own id
        for j, f in enumerate(ITEM_FIELDS[1:], start=1):
            item_table[vid, j] = items.column(f).to_numpy()
        return cls(item_table, user_table(ds), list(ds.user_features), int(seq_len))


def user_table(ds: Dataset) -> np.ndarray:
    """[max_user_id + 1, P] profile values in user_fields order (what a client needs when its tower
    inputs are cached: far smaller than the item table)."""
    users = ds.users()
    fields = list(ds.user_features)
    uid = users.column("user_id").to_numpy()
    n_users = max(int(ds.vocab.get("user_id", 0)), int(uid.max()) + 1 if len(uid) else 0)
    table = np.zeros((n_users, len(fields)), dtype=np.int64)
    for j, f in enumerate(fields):
        table[uid, j] = users.column(f).to_numpy()
    return table


@dataclass
class Views:
    """Effective views sorted by (user, time): the material behaviour sequences are cut from."""

    user_id: np.ndarray
    timestamp: np.ndarray
    video_id: np.ndarray

    @classmethod
    def from_tables(cls, history: pa.Table, exposures: pa.Table) -> Views:
        eff = exposures.column("effective_view").to_numpy() == 1
        u = np.concatenate([history.column("user_id").to_numpy(),
                            exposures.column("user_id").to_numpy()[eff]])
        t = np.concatenate([history.column("timestamp").to_numpy(),
                            exposures.column("request_timestamp").to_numpy()[eff]])
        v = np.concatenate([history.column("video_id").to_numpy(),
                            exposures.column("video_id").to_numpy()[eff]])
        order = np.lexsort((t, u))
        return cls(u[order].astype(np.int64), t[order].astype(np.int64), v[order].astype(np.int64))

    def windows(self, user_id: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each (user, ts): [lo, hi) into the sorted views, hi = first view at or after ts."""
        lo = np.searchsorted(self.user_id, user_id, side="left")
        hi = np.searchsorted(_time_key(self.user_id, self.timestamp), _time_key(user_id, ts), side="left")
        return lo, hi


def _time_key(user_id: np.ndarray, ts: np.ndarray) -> np.ndarray:
    # (user, time) packed into one sortable int64: ms timestamps stay below 2^42 until 2109.
    if len(ts) and (ts.min() < 0 or ts.max() >= 1 << 42):
        raise DatasetError("timestamps must be ms since 1970 and before 2109")
    return (user_id.astype(np.int64) << 42) | ts.astype(np.int64)


@dataclass
class Examples:
    """Rows to score, with everything needed to build model batches."""

    user_id: np.ndarray          # [N]
    request_timestamp: np.ndarray  # [N] ms
    video_id: np.ndarray         # [N]
    labels: np.ndarray           # [N, T] int8, -1 = unobserved
    view_lo: np.ndarray          # [N] window into views
    view_hi: np.ndarray          # [N]
    views: Views
    lookups: Lookups
    request_id: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.user_id)

    @classmethod
    def from_rows(cls, user_id, request_timestamp, video_id, labels, views: Views,
                  lookups: Lookups, request_id=None) -> Examples:
        user_id = np.asarray(user_id, dtype=np.int64)
        ts = np.asarray(request_timestamp, dtype=np.int64)
        lo, hi = views.windows(user_id, ts)
        return cls(user_id, ts, np.asarray(video_id, dtype=np.int64), np.asarray(labels, dtype=np.int8),
                   lo, hi, views, lookups, None if request_id is None else np.asarray(request_id))

    @classmethod
    def from_exposures(cls, exposures: pa.Table, views: Views, lookups: Lookups) -> Examples:
        labels = np.stack([exposures.column(lab).to_numpy() for lab in LABELS], axis=1) \
            if exposures.num_rows else np.zeros((0, len(LABELS)), np.int8)
        return cls.from_rows(exposures.column("user_id").to_numpy(),
                             exposures.column("request_timestamp").to_numpy(),
                             exposures.column("video_id").to_numpy(), labels, views, lookups,
                             exposures.column("request_id").to_numpy())

    def subset(self, idx: np.ndarray) -> Examples:
        return Examples(self.user_id[idx], self.request_timestamp[idx], self.video_id[idx],
                        self.labels[idx], self.view_lo[idx], self.view_hi[idx], self.views,
                        self.lookups, None if self.request_id is None else self.request_id[idx])

    def positive_rate(self, task: str = "effective_view") -> float:
        col = self.labels[:, TASKS.index(task)]
        seen = col >= 0
        return float(col[seen].mean()) if seen.any() else float("nan")

    def batch(self, idx: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        if idx is None:
            idx = np.arange(len(self))
        lk = self.lookups
        uid = self.user_id[idx]
        ts = self.request_timestamp[idx]
        length = lk.seq_len
        pos = self.view_hi[idx, None] - length + np.arange(length)[None, :]
        mask = pos >= self.view_lo[idx, None]
        hist_vid = np.where(mask, self.views.video_id[np.clip(pos, 0, max(len(self.views.video_id) - 1, 0))]
                            if len(self.views.video_id) else 0, 0)
        if lk.graph is not None and lk.expand:
            hist_vid, mask = expand_histories(hist_vid, mask, lk.graph, lk.expand)
        hist = self._item_rows(hist_vid)
        hist[~mask] = 0
        context = np.stack([(ts // MS_PER_HOUR) % 24, (ts // MS_PER_DAY + 3) % 7], axis=1)
        return {
            "user_id": torch.from_numpy(uid.copy()),
            "user_profile": torch.from_numpy(lk.user_table[np.minimum(uid, len(lk.user_table) - 1)]),
            "hist_items": torch.from_numpy(hist),
            "hist_mask": torch.from_numpy(mask),
            "item": torch.from_numpy(self._item_rows(self.video_id[idx])),
            "context": torch.from_numpy(context.astype(np.int64)),
            "labels": torch.from_numpy(self.labels[idx].astype(np.float32)),
        }

    def _item_rows(self, vid: np.ndarray) -> np.ndarray:
        table = self.lookups.item_table
        inside = vid < len(table)
        rows = table[np.where(inside, vid, 0)]
        if not inside.all():  # items missing from the items table: id only, other features unknown
            rows[~inside] = 0
            rows[~inside, 0] = vid[~inside]
        return rows

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     by_request: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in order, or shuffled (`row_order`)."""
        order = self.row_order(shuffle=shuffle, seed=seed, by_request=by_request)
        for s in range(0, len(order), batch_size):
            yield self.batch(order[s:s + batch_size])

    def row_order(self, *, shuffle: bool = False, seed: int = 0, by_request: bool = False) -> np.ndarray:
        """The rows' order in an epoch: as stored, or shuffled. ``by_request`` shuffles whole requests, keeping
        a request's rows together: they share one behaviour sequence, which the model then encodes once. Rows
        without request ids (leave-one-out: a positive and its sampled negatives) are grouped by (user, time),
        which is what their sequence depends on."""
        if not shuffle:
            return np.arange(len(self))
        rng = np.random.default_rng(seed)
        if not by_request or not len(self):
            return rng.permutation(len(self))
        groups = self._request_groups
        return np.argsort(rng.permutation(groups.max() + 1)[groups], kind="stable")

    @functools.cached_property
    def _request_groups(self) -> np.ndarray:
        """Each row's request as a code 0..R-1 in sorted order (by request id, else by (user, time)); found once,
        not every epoch (a sort of every row: seconds on millions of rows)."""
        if self.request_id is not None:
            return np.unique(self.request_id, return_inverse=True)[1].reshape(-1)
        order = np.lexsort((self.request_timestamp, self.user_id))
        u, t = self.user_id[order], self.request_timestamp[order]
        starts = np.r_[True, (u[1:] != u[:-1]) | (t[1:] != t[:-1])]
        groups = np.empty(len(order), np.int64)
        groups[order] = np.cumsum(starts) - 1
        return groups


def concat_examples(parts: list[Examples]) -> Examples:
    """Concatenate example sets that share one `Views` and `Lookups`."""
    if not parts:
        raise DatasetError("no examples to concatenate")
    first = parts[0]
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    rid = None if any(p.request_id is None for p in parts) else cat("request_id")
    return Examples(cat("user_id"), cat("request_timestamp"), cat("video_id"), cat("labels"),
                    cat("view_lo"), cat("view_hi"), first.views, first.lookups, rid)
