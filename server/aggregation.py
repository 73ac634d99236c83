"""Validating client updates and aggregating them as sums.

Every algorithm's update is expressed as *sums*: a client contributes
``weight * (local - global)`` for each shared tensor and ``weight`` to a count;
the server divides the summed contributions by the summed counts. Global
tensors have one count; a group tensor (FedPA's group adapters, stacked with
one row per attribute value) has one count per row, and a client contributes
only to the row of its own value (zeros elsewhere). Sums are exactly what
secure aggregation reveals, so the same code aggregates with and without it,
and the server learns per-group averages without learning who is in which group.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from foundation.errors import FedpaError

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
    group: str | None = None  # None: global tensor; else the attribute whose value indexes dim 0

    @property
    def count_key(self) -> str:
        return COUNT_PREFIX + (self.group or GLOBAL)


def count_shapes(spec: list[SharedTensor]) -> dict[str, tuple[int, ...]]:
    shapes = {COUNT_PREFIX + GLOBAL: (1,)}
    for t in spec:
        if t.group is not None:
            shapes[t.count_key] = (t.shape[0],)
    return shapes


def expected_shapes(spec: list[SharedTensor]) -> dict[str, tuple[int, ...]]:
    return {**{t.name: t.shape for t in spec}, **count_shapes(spec)}


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
    keys = expected_shapes(spec)
    return {k: np.sum([u[k] for u in updates], axis=0, dtype=np.float64) for k in keys}


def apply_sums(state: Mapping[str, np.ndarray], sums: Mapping[str, np.ndarray],
               spec: list[SharedTensor]) -> dict[str, np.ndarray]:
    """New shared state: old + summed deltas / summed counts; rows nobody contributed to stay."""
    new = {}
    for t in spec:
        count = sums[t.count_key]
        if t.group is None:
            c = float(count[0])
            new[t.name] = state[t.name] + (sums[t.name] / c if c > 0 else 0.0)
        else:
            c = count.reshape((-1,) + (1,) * (len(t.shape) - 1))
            step = np.divide(sums[t.name], c, out=np.zeros_like(sums[t.name]), where=c > 0)
            new[t.name] = state[t.name] + step
        new[t.name] = new[t.name].astype(np.float32)
    return new


def client_contribution(delta: Mapping[str, np.ndarray], spec: list[SharedTensor],
                        group_values: Mapping[str, int], weight: float = 1.0) -> dict[str, np.ndarray]:
    """What one client sends: weighted deltas (its own group rows only) and the matching counts."""
    out = {}
    counts = {k: np.zeros(s, np.float32) for k, s in count_shapes(spec).items()}
    counts[COUNT_PREFIX + GLOBAL][0] = weight
    for t in spec:
        d = np.asarray(delta[t.name], dtype=np.float32)
        if t.group is None:
            out[t.name] = d * weight
        else:
            v = int(group_values[t.group])
            slot = np.zeros(t.shape, np.float32)
            if 0 <= v < t.shape[0]:
                slot[v] = d[v] * weight
                counts[t.count_key][v] = weight
            out[t.name] = slot
    return {**out, **counts}
