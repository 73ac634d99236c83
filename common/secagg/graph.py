"""SecAgg+ parameters: the neighbour degree and Shamir threshold (Bell et al.'s bounds) and the random Harary
graph every participant derives from the round nonce."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .crypto import prg_u64
from .messages import SecAggError

# --------------------------------------------------------------------------- parameters


def _binom_tail(k: int, p: float, a: int) -> float:
    """P[Bin(k, p) >= a]."""
    if a <= 0:
        return 1.0
    return float(sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(a, k + 1)))


def default_threshold(degree: int) -> int:
    return degree // 2 + 1


@lru_cache(maxsize=256)
def choose_degree(n: int, dropout: float = 0.10, corrupt: float = 0.05, sigma: int = 40, eta: int = 20) -> int:
    """Smallest even k meeting the privacy, connectivity and correctness bounds of the module docstring
    (n - 1, the complete graph, when none below n - 1 does)."""
    if n < 2:
        raise SecAggError(f"secure aggregation needs at least 2 clients, got {n}")
    if not (0 <= dropout < 1 and 0 <= corrupt < 0.5):
        raise SecAggError(f"need 0 <= dropout < 1 and 0 <= corrupt < 0.5, got {dropout}, {corrupt}")
    for k in range(2, n - 1, 2):
        t = default_threshold(k)
        if (n * _binom_tail(k, corrupt, t) <= 2.0**-sigma
                and n * n * (corrupt + dropout) ** k <= 2.0**-sigma
                and n * _binom_tail(k, dropout, k - t + 1) <= 2.0**-eta):
            return k
    return n - 1


@dataclass(frozen=True)
class SecAggParams:
    """Graph and threshold settings. None: derived (choose_degree / strict majority)."""

    degree: int | None = None
    threshold: int | None = None
    dropout: float = 0.10        # expected per-client dropout during a round (sizing only)
    corrupt: float = 0.05        # fraction of clients assumed to collude with the server (sizing only)
    sigma: int = 40              # statistical security, bits
    eta: int = 20                # round-failure target under `dropout`, bits
    min_clients: int = 3         # fewest clients a sum may cover

    def degree_for(self, n: int) -> int:
        k = self.degree if self.degree is not None else choose_degree(n, self.dropout, self.corrupt, self.sigma,
                                                                      self.eta)
        if k < 1:
            raise SecAggError(f"degree must be >= 1, got {k}")
        return min(k, n - 1)


def effective_graph_params(params: SecAggParams, nominal_degree: int, n_advertised: int) -> tuple[int, int]:
    """(k, t) for the graph over the clients that advertised keys: k even unless complete."""
    k = min(nominal_degree, n_advertised - 1)
    if k < n_advertised - 1 and k % 2:
        k += 1
    k = min(k, n_advertised - 1)
    t = params.threshold if params.threshold is not None else default_threshold(k)
    if not 1 <= t <= k:
        raise SecAggError(f"threshold t={t} must be within 1..k={k} (k neighbours among {n_advertised} clients)")
    return k, t


# --------------------------------------------------------------------------- neighbour graph


def neighbour_graph(ids: Sequence[int], degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Random Harary graph: ids on a cycle in a seed-drawn order, each joined to the degree/2 nearest on
    each side (degree even), or the complete graph when degree >= len(ids) - 1."""
    ids = sorted(ids)
    n = len(ids)
    if degree >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    if degree % 2:
        raise ValueError("a sparse Harary graph needs an even degree")
    order = np.asarray(ids, dtype=object)[np.argsort(prg_u64(seed, n), kind="stable")]
    half = degree // 2
    offsets = np.concatenate([np.arange(1, half + 1), -np.arange(1, half + 1)])
    pos = (np.arange(n)[:, None] + offsets[None, :]) % n
    return {int(order[i]): tuple(sorted(int(order[j]) for j in pos[i])) for i in range(n)}
