"""Byzantine-robust aggregation of one-user updates (norm bound, trimmed mean, median), server side only:
it needs every update on its own, which secure aggregation hides by design."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpa.common.aggregation import InvalidUpdate, SharedTensor, count_keys, expected_shapes
from fedpa.common.config import ROBUST_METHODS


def robust_sums(updates: list[Mapping[str, np.ndarray]], spec: list[SharedTensor], *, method: str = "none",
                trim_fraction: float = 0.1, norm_bound: float = 0.0) -> dict[str, np.ndarray]:
    """Byzantine-robust aggregation of one-user updates, expressed as sums so `apply_sums` applies it.

    Each update first has its contributed entries (those whose group count is non-zero) scaled to L2
    norm <= ``norm_bound`` (0: no bound). Then, per entry, over the updates that contribute to it:
    the mean (``none``), the coordinate-wise mean after dropping the ``trim_fraction`` largest and
    smallest values (``trimmed-mean``), or the coordinate-wise median. The result is returned as
    aggregate * k with count k, k = the number of contributors. Needs every update on its own,
    which is why it cannot run under secure aggregation (the server sees only the sum there)."""
    if method not in ROBUST_METHODS:
        raise ValueError(f"unknown robust aggregation '{method}' ({', '.join(ROBUST_METHODS)})")
    per_row = [t.name for t in spec if t.per_row]
    if per_row:
        raise ValueError(f"robust aggregation does not support per-row entries ({per_row[0]}: item-bias-fields)")
    bounded = []
    for u in updates:
        counts = {k: float(np.asarray(u[k]).reshape(-1)[0]) for k in count_keys(spec)}
        for k, c in counts.items():
            if c not in (0.0, 1.0):
                raise InvalidUpdate(f"robust aggregation needs one user per update, got {k} = {c:g}")
        mine = [t.name for t in spec if counts[t.count_key] > 0]
        scale = 1.0
        if norm_bound > 0:
            norm = float(np.sqrt(sum(np.sum(np.square(u[n], dtype=np.float64)) for n in mine)))
            scale = min(1.0, norm_bound / norm) if norm > 0 else 1.0
        bounded.append(({n: np.asarray(u[n], np.float64) * scale for n in mine}, counts))
    sums: dict[str, np.ndarray] = {k: np.zeros(s, np.float64) for k, s in expected_shapes(spec).items()}
    for t in spec:
        values = [b[t.name] for b, c in bounded if c[t.count_key] > 0]
        k = len(values)
        sums[t.count_key] = np.array([float(k)])
        if k == 0:
            continue
        stack = np.stack(values)
        if method == "median":
            agg = np.median(stack, axis=0)
        elif method == "trimmed-mean":
            cut = int(np.floor(trim_fraction * k))
            agg = np.sort(stack, axis=0)[cut:k - cut].mean(axis=0) if k - 2 * cut > 0 else np.median(stack, axis=0)
        else:
            agg = stack.mean(axis=0)
        sums[t.name] = agg * k
    return sums
