"""Client-level differential privacy mechanisms both halves use: per-user clipping, the sensitivity of the
released sums, and Gaussian noise added centrally, distributed over a quorum, or locally. Central and
distributed noise is the discrete Gaussian on the fixed point SecAgg+ sums (exact sampling, OpenDP); local noise
is a float Gaussian from a ChaCha20 stream.

Design notes: docs/design/differential-privacy.md
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .aggregation import COUNT_PREFIX, GLOBAL, SharedTensor, count_keys
from .discrete_noise import FRAC_BITS, discrete_gaussian, discrete_noise_sigma

log = logging.getLogger("fedpa.server")


def clip_delta(delta: dict[str, np.ndarray], spec: list[SharedTensor], groups: set[str],
               clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the entries a user contributes so that their joint L2 norm is at most ``clip`` (the click tally
    is a count, weighted like the per-row counts instead)."""
    mine = [t.name for t in spec if t.contributed_by(groups) and not t.tally]
    norm = math.sqrt(sum(float(np.sum(np.square(delta[n], dtype=np.float64))) for n in mine))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (v * np.float32(scale) if k in mine else v) for k, v in delta.items()}, norm


def sensitivity(clip: float, n_count_terms: int) -> float:
    """L2 sensitivity of one user's released sums: clipped delta, global count, ``n_count_terms``
    unit-norm counts (one per group attribute and per item-side table)."""
    return math.sqrt(clip ** 2 + 1 + n_count_terms)


def row_weights(rows: np.ndarray) -> np.ndarray:
    """Per user (rows [users, table rows] 0/1): 1/sqrt(rows read), so that its per-row counts have norm 1
    (0 for a user who read none)."""
    read = np.asarray(rows, np.float64).sum(axis=-1)
    return np.where(read > 0, 1.0 / np.sqrt(np.where(read > 0, read, 1.0)), 0.0)


def noise_rng() -> np.random.Generator:
    """The generator every DP noise draw uses: ChaCha20 (20 rounds, randomgen), a cryptographically secure
    stream keyed from fresh OS entropy, never from the run's seed (a seeded or a state-recoverable generator
    such as PCG64 would let whoever sees some outputs subtract the rest). Gaussians come from numpy's ziggurat
    in float64; the noised value is rounded to float32 only after the addition (post-processing)."""
    from randomgen import ChaCha

    return np.random.Generator(ChaCha(np.random.SeedSequence(), rounds=20))


def add_discrete_noise(sums: dict[str, np.ndarray], spec: list[SharedTensor], noise_multiplier: float, sens: float,
                       frac_bits: int = FRAC_BITS) -> dict[str, np.ndarray]:
    """Central DP, exactly: every released coordinate (deltas and counts) rounded to the fixed point 2^-frac_bits,
    plus discrete Gaussian noise of scale z * integer_sensitivity, back to the sums' dtypes (post-processing);
    counts then clamped to >= 1."""
    keys = [t.name for t in spec] + list(count_keys(spec))
    dim = int(sum(np.asarray(sums[k]).size for k in keys))
    noise = discrete_gaussian(discrete_noise_sigma(noise_multiplier, sens, frac_bits, dim), dim)
    out, at, unit = {}, 0, 2.0 ** frac_bits
    for key in keys:
        v = np.asarray(sums[key])
        q = np.rint(v.astype(np.float64) * unit) + noise[at:at + v.size].reshape(v.shape)
        at += v.size
        out[key] = (q / unit).astype(v.dtype)
    return clamp_counts(out, spec)


def add_noise(sums: dict[str, np.ndarray], spec: list[SharedTensor], std: float,
              rng: np.random.Generator | None = None, clamp: bool = True) -> dict[str, np.ndarray]:
    """N(0, std^2) on every coordinate (deltas and counts), dtypes kept; on the server the counts
    are then clamped to >= 1, a client's share (``clamp=False``) is left as it is."""
    rng = rng or noise_rng()
    out = {}
    for key in [t.name for t in spec] + list(count_keys(spec)):
        v = np.asarray(sums[key])
        out[key] = (v + rng.normal(0.0, std, size=v.shape)).astype(v.dtype) if std > 0 else v
    return clamp_counts(out, spec) if clamp else out


def clamp_counts(sums: dict[str, np.ndarray], spec: list[SharedTensor]) -> dict[str, np.ndarray]:
    out = dict(sums)
    for key in count_keys(spec):
        out[key] = np.maximum(np.asarray(out[key], dtype=np.float64), 1.0)  # never divide by a tiny count
    return out


def quorum(min_reply_fraction: float, cohort: int) -> int:
    """Users whose contributions must reach the sum for a round to complete (the server's check)."""
    return max(1, math.ceil(min_reply_fraction * cohort))


def distributed_share_std(noise_multiplier: float, clip: float, n_count_terms: int,
                          min_reply_fraction: float, cohort: int) -> float:
    """Std of the noise one user adds in distributed mode: the quorum's shares sum to (zS)^2."""
    s = noise_multiplier * sensitivity(clip, n_count_terms)
    return s / math.sqrt(quorum(min_reply_fraction, cohort))


def distributed_share(users: int, min_reply_fraction: float, cohort: int) -> float:
    """The share of the noise variance a node adds in distributed mode for ``users`` users: users / quorum.
    The node adds it, as one discrete Gaussian, to the fixed-point vector it masks (client.secagg)."""
    return users / quorum(min_reply_fraction, cohort)


def add_local_noise(delta: dict[str, np.ndarray], spec: list[SharedTensor], groups: set[str], std: float,
                    rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Local DP: N(0, std^2) on the entries this user contributes (std = z * C)."""
    rng = rng or noise_rng()
    mine = {t.name for t in spec if t.contributed_by(groups)}
    return {k: ((v + rng.normal(0.0, std, size=v.shape)).astype(np.float32) if k in mine else v)
            for k, v in delta.items()}


def private_contribution(delta: dict[str, np.ndarray], spec: list[SharedTensor], groups: set[str], *,
                         noise_multiplier: float, clip: float, mode: str, n_count_terms: int,
                         min_reply_fraction: float, cohort: int,
                         rows: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """What one user sends under client-level DP: its delta clipped to ``clip`` (local mode: plus its
    own noise), as a contribution (`client_contribution`). Distributed mode adds nothing here: the node adds its
    users' share of the noise to the fixed-point vector it masks (`client.secagg`, `distributed_share`).
    ``rows``: the rows the user read of each per-row entry (runs with item-side tables, never under DP)."""
    from .aggregation import client_contribution

    if noise_multiplier <= 0:
        return client_contribution(delta, spec, groups, rows=rows)
    delta, _ = clip_delta(delta, spec, groups, clip)
    if rows:  # unit-norm per-row counts (see the module docstring), the same weight on the delta rows
        w = {k: float(row_weights(r)) for k, r in rows.items()}
        delta = {k: (v * np.float32(w[k]) if k in w else v) for k, v in delta.items()}
        rows = {k: np.asarray(r, np.float32) * np.float32(w[k]) for k, r in rows.items()}
    if mode == "local":
        delta = add_local_noise(delta, spec, groups, noise_multiplier * clip)
    contrib = client_contribution(delta, spec, groups, rows=rows)
    return contrib   # distributed mode: the node's SecAgg+ client adds the noise, in fixed point


def cohort_contribution(deltas: Mapping[str, Any], n_users: int, spec: list[SharedTensor],
                        *, keep: np.ndarray | None = None, noise_multiplier: float, clip: float, mode: str,
                        n_count_terms: int, min_reply_fraction: float, cohort: int,
                        rng: np.random.Generator | None = None,
                        rows: Mapping[str, Sequence[np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """The sum over ``n_users`` users of `private_contribution`, computed on stacked deltas.

    ``deltas``: shared entry -> (positions of the users contributing to it, their deltas [k, *shape]);
    an entry a user is absent from is zero for that user, and the groups a user contributes to are the
    groups of the entries it appears in (as `client_contribution`'s ``groups``). A per-row entry comes sparse
    instead (`recmodels.cohort.RowDeltas`: per user, its rows and their deltas). ``keep``: the users to
    include (default all). Each user is clipped to ``clip`` on its own (joint norm of its entries) and,
    in local mode, noised on its own (distributed mode: see `private_contribution`). ``rows``: per-row
    entry -> per user, the rows it read (its per-row counts)."""
    keep = np.ones(n_users, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    scale = np.ones(n_users, dtype=np.float64)
    if noise_multiplier > 0:
        sq = np.zeros(n_users, dtype=np.float64)
        tallies = {t.name for t in spec if t.tally}
        for name, d in deltas.items():
            if name in tallies:
                continue
            if _sparse(d):
                for u, v in zip(d.users, d.values):
                    sq[u] += float(np.square(v, dtype=np.float64).sum())
            else:
                pos, vals = d
                np.add.at(sq, pos, np.square(vals.reshape(len(pos), -1), dtype=np.float64).sum(axis=1))
        norm = np.sqrt(sq)
        scale = np.where(norm > 0, np.minimum(1.0, clip / np.where(norm > 0, norm, 1.0)), 1.0)
    rng = rng or (noise_rng() if noise_multiplier > 0 and mode == "local" else None)
    out = {k: np.zeros(s, np.float32) for k, s in count_keys(spec).items()}
    out[COUNT_PREFIX + GLOBAL][0] = float(keep.sum())
    for t in spec:
        if t.tally:   # each user's clicks, weighted to unit norm under DP (one more count term)
            clicked = rows[t.name] if rows is not None and t.name in rows else None
            if clicked is None:
                raise ValueError(f"tally entry '{t.name}' needs the rows each user clicked")
            total = np.zeros(t.shape, np.float32)
            users = [u for u in np.nonzero(keep)[0] if len(clicked[u])]
            _add_at(total, [clicked[u] for u in users],
                    [np.full(len(clicked[u]), 1.0 / math.sqrt(len(clicked[u])) if noise_multiplier > 0 else 1.0,
                             np.float32) for u in users])
            out[t.name] = total
            continue
        if t.per_row:
            if rows is None or t.name not in rows:
                raise ValueError(f"per-row entry '{t.name}' needs the rows each user read")
            read = rows[t.name]
            lengths = np.array([len(r) for r in read], np.float64)
            weight = (np.where(lengths > 0, 1.0 / np.sqrt(np.maximum(lengths, 1.0)), 0.0) if noise_multiplier > 0
                      else np.ones(n_users))
            counts = out[t.count_key]
            total = np.zeros(t.shape, np.float32)
            d = deltas.get(t.name)
            newton = d.weights if d is not None and getattr(d, "weights", None) is not None else None
            kept = np.nonzero(keep)[0]
            if newton is not None:   # item-bias-update newton: the user's curvature sums, on the rows it read
                _add_at(counts, [d.rows[u] for u in kept],
                        [newton[u].astype(np.float32) * np.float32(weight[u]) for u in kept])
            else:
                _add_at(counts, [read[u] for u in kept], [np.full(len(read[u]), weight[u], np.float32) for u in kept])
            if d is not None:
                moved = [(r, v, u) for u, r, v in zip(d.users, d.rows, d.values) if keep[u]]
                _add_at(total, [r for r, _, _ in moved],
                        [v.astype(np.float32) * np.float32(scale[u] * weight[u]) for _, v, u in moved])
            out[t.name] = total
            continue
        pos, vals = deltas.get(t.name, (np.zeros(0, np.int64), np.zeros((0, *t.shape), np.float32)))
        sel = keep[pos]
        v = vals[sel].astype(np.float32) * scale[pos[sel]].astype(np.float32).reshape((-1,) + (1,) * len(t.shape))
        if noise_multiplier > 0 and mode == "local" and len(v):
            v = (v + rng.normal(0.0, noise_multiplier * clip, size=v.shape)).astype(np.float32)
        out[t.name] = v.sum(axis=0, dtype=np.float32) if len(v) else np.zeros(t.shape, np.float32)
        if t.group is not None:
            out[t.count_key][0] = float(sel.sum())
    return out   # distributed mode: the node's SecAgg+ client adds its users' noise, in fixed point


def _add_at(target: np.ndarray, rows: list[np.ndarray], values: list[np.ndarray]) -> None:
    """``np.add.at(target, rows[k], values[k])`` for every k, as one call: the same additions in the same order
    (so the same float32 sums), without a call per user and table."""
    live = [k for k, r in enumerate(rows) if len(r)]
    if live:
        np.add.at(target, np.concatenate([rows[k] for k in live]), np.concatenate([values[k] for k in live]))


def _sparse(d: Any) -> bool:
    """A per-row entry's sparse deltas (`recmodels.cohort.RowDeltas`) rather than (positions, stacked deltas)."""
    return hasattr(d, "values") and hasattr(d, "rows")
