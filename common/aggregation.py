"""Validating client updates and aggregating them as sums.

Every algorithm's update is expressed as *sums*: a client contributes
``weight * (local - global)`` for each shared tensor and ``weight`` to the
count of that tensor's group; the server divides the summed contributions by
the summed counts. Globally shared tensors (gate, head, global LoRA) count in
group "global"; FedPA's group adapters have one entry per (attribute, value),
counted in group "attribute=value", and a client contributes only to its own
groups' entries (zeros elsewhere). Item-side tables (`recmodels.item_bias`, group "per-row") are
averaged per *row*: their count is a vector with one entry per row, and a client counts only in the
rows its training items read. The click tally (group "tally", `recmodels.item_bias.CLICKS`) is not an
average but a count: each client adds 1 in the rows of its training clicks, and the new state is the
round's sum scaled to the population (every client: the sum itself). Sums are exactly what
secure aggregation reveals, so the same code aggregates with and without it;
under secure aggregation the server learns per-group averages without learning
who is in which group.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedpa.foundation.errors import FedpaError
from fedpa.recmodels.item_bias import EMBEDDING, PER_ROW, TALLY
from fedpa.recmodels.item_bias import PREFIX as NEWTON_PREFIX

NOT_NEWTON = frozenset({EMBEDDING})

log = logging.getLogger("fedpa.server")

COUNT_PREFIX = "count/"
GLOBAL = "global"


class RoundFailed(FedpaError):
    """Too few valid replies to aggregate a round."""


class InvalidUpdate(ValueError):
    """A reply that cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class SharedTensor:
    name: str
    shape: tuple[int, ...]
    group: str | None = None  # None: shared by everyone; PER_ROW: counted per row; else the group key, e.g. "age=3"

    @property
    def per_row(self) -> bool:
        return self.group == PER_ROW

    @property
    def tally(self) -> bool:
        return self.group == TALLY

    @property
    def count_key(self) -> str:
        return COUNT_PREFIX + (f"rows:{self.name}" if self.per_row else GLOBAL if self.tally
                               else self.group or GLOBAL)

    @property
    def count_shape(self) -> tuple[int, ...]:
        return (self.shape[0],) if self.per_row else (1,)

    def contributed_by(self, groups: set[str]) -> bool:
        """Does a client in ``groups`` contribute to this entry (per-row entries: every client, in its rows)?"""
        return self.group is None or self.per_row or self.tally or self.group in groups


def spec_from(entries: list[tuple[str, tuple[int, ...], str | None]]) -> list[SharedTensor]:
    return [SharedTensor(n, tuple(s), g) for n, s, g in entries]


def count_keys(spec: list[SharedTensor]) -> dict[str, tuple[int, ...]]:
    """One scalar count per aggregation group (global + each attribute=value); one count per row of
    each per-row entry."""
    keys = {COUNT_PREFIX + GLOBAL: (1,)}
    for t in spec:
        keys[t.count_key] = t.count_shape
    return keys


def expected_shapes(spec: list[SharedTensor]) -> dict[str, tuple[int, ...]]:
    return {**{t.name: t.shape for t in spec}, **count_keys(spec)}


def validate_update(update: Mapping[str, np.ndarray], spec: list[SharedTensor]) -> None:
    """Raise InvalidUpdate naming the first problem: missing/unexpected key, shape, dtype, NaN/inf,
    negative count."""
    want = expected_shapes(spec)
    missing = sorted(set(want) - set(update))
    if missing:
        raise InvalidUpdate(f"missing key(s) {', '.join(missing[:5])}")
    extra = sorted(set(update) - set(want))
    if extra:
        raise InvalidUpdate(f"unexpected key(s) {', '.join(extra[:5])}")
    for key, shape in want.items():
        arr = update[key]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            raise InvalidUpdate(f"'{key}' has dtype {getattr(arr, 'dtype', type(arr).__name__)}, expected float32")
        if tuple(arr.shape) != tuple(shape):
            raise InvalidUpdate(f"'{key}' has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise InvalidUpdate(f"'{key}' contains NaN or inf")
        if key.startswith(COUNT_PREFIX) and np.any(arr < 0):
            raise InvalidUpdate(f"'{key}' has a negative count")


def sum_updates(updates: list[Mapping[str, np.ndarray]], spec: list[SharedTensor]) -> dict[str, np.ndarray]:
    return {k: np.sum([u[k] for u in updates], axis=0, dtype=np.float64) for k in expected_shapes(spec)}


def apply_sums(state: Mapping[str, np.ndarray], sums: Mapping[str, np.ndarray],
               spec: list[SharedTensor], row_prior: float = 0.0, population: int = 0,
               newton: bool = False) -> dict[str, np.ndarray]:
    """New shared state: old + summed deltas / summed counts; entries nobody contributed to stay.

    ``row_prior`` adds that many phantom readers to every read row of a per-row entry, each leaving
    the row as it was: a row read by few users moves by a fraction of their mean (a row read by one
    user with prior k moves 1/(1+k) of its delta), a row read by many moves by nearly their mean.
    That is the shrinkage a smoothed click rate applies to a rarely seen item.

    A tally entry becomes the round's sum scaled by ``population`` / contributors (0: the sum itself),
    the whole population's count estimated from the sampled clients."""
    new = {}
    for t in spec:
        if t.tally:
            c = float(sums[t.count_key][0])
            if c > 0:
                new[t.name] = (np.asarray(sums[t.name], np.float64) * (population / c if population else 1.0)
                               ).astype(np.float32)
            else:
                new[t.name] = np.asarray(state[t.name], np.float32)
            continue
        if t.per_row:
            c = np.asarray(sums[t.count_key], dtype=np.float64)
            c = c.reshape(c.shape + (1,) * (len(t.shape) - 1))
            if newton and t.name.startswith(NEWTON_PREFIX) and t.name not in NOT_NEWTON:
                # the offset tables under item-bias-update newton: sums of -(p - y) and of p(1 - p) (the count):
                # one MAP Newton step, row_prior the prior's precision pulling the row towards 0
                b = np.asarray(state[t.name], np.float64)
                step = np.where(c > 0, (sums[t.name] - row_prior * b) / np.where(c > 0, c + row_prior, 1.0), 0.0)
            else:
                step = np.where(c > 0, sums[t.name] / np.where(c > 0, c + row_prior, 1.0), 0.0)
        else:
            c = float(sums[t.count_key][0])
            step = sums[t.name] / c if c > 0 else 0.0
        new[t.name] = (state[t.name] + step).astype(np.float32)
    return new


def client_contribution(delta: Mapping[str, np.ndarray], spec: list[SharedTensor],
                        groups: set[str], weight: float = 1.0,
                        rows: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """What one client sends: weighted deltas for the global entries and its own groups' entries
    (zeros for every other group) and the counts; for per-row entries, the rows it read (``rows``:
    entry -> 0/1 per row) count. Every client sends every entry, so that under secure
    aggregation the server learns only per-group sums and counts; without it, the non-zero counts
    of a one-user node do reveal that user's groups (and the rows it read)."""
    out = {k: np.zeros(s, np.float32) for k, s in count_keys(spec).items()}
    out[COUNT_PREFIX + GLOBAL][0] = weight
    for t in spec:
        if t.per_row:
            if rows is None or t.name not in rows:
                raise ValueError(f"per-row entry '{t.name}' needs the rows the client read")
            out[t.name] = np.asarray(delta[t.name], dtype=np.float32) * np.float32(weight)
            out[t.count_key] = np.asarray(rows[t.name], dtype=np.float32) * np.float32(weight)
        elif t.tally:   # the client's clicks (its rows of the tally), not a parameter delta
            if rows is None or t.name not in rows:
                raise ValueError(f"tally entry '{t.name}' needs the rows the client clicked")
            out[t.name] = np.asarray(rows[t.name], dtype=np.float32) * np.float32(weight)
        elif t.contributed_by(groups):
            out[t.name] = np.asarray(delta[t.name], dtype=np.float32) * np.float32(weight)
            out[t.count_key][0] = weight
        else:
            out[t.name] = np.zeros(t.shape, np.float32)
    return out
