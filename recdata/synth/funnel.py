"""RecFlow's funnel for a block of requests: retrieval → pre-ranking → coarse ranking → ranking → re-ranking →
exposure, each stage a noisier model of the true utility, and the stage samples each one filters out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedpa.foundation.errors import FedpaError

from .world import _MAX_REDRAW_ROUNDS, _Surface, _World, _zipf_rank


@dataclass
class _FunnelResult:
    """One block of requests after the funnel; items are internal indices."""

    sample_items: np.ndarray  # (R, stored)
    sample_rank_index: np.ndarray  # (R, stored)
    sample_rerank_index: np.ndarray  # (R, stored)
    exposed_items: np.ndarray  # (E,) request by request, in edge-ranking order
    exposed_rank_index: np.ndarray
    exposed_rerank_index: np.ndarray
    exposed_utility: np.ndarray


def _logistic_scale(std: float) -> float:
    """Scale of the logistic distribution with standard deviation ``std``."""
    return std * math.sqrt(3) / math.pi


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _solve_threshold(affinity: np.ndarray, weight: np.ndarray, scale: float, target: float) -> np.ndarray:
    """Per row, the t with sum_c weight[c] * sigmoid((affinity[c] - t) / scale) == target.

    That is the score threshold a stage needs to keep the fraction ``target`` of the
    candidates (weight = their distribution over categories, already multiplied by the
    chance of surviving earlier stages). Newton on the log of the kept fraction (nearly
    linear in t when the stage keeps few), safeguarded by a bracket that always holds the
    root, since the kept fraction falls monotonically in t.
    """
    lo = affinity.min(axis=1) - 40 * scale
    hi = affinity.max(axis=1) + 40 * scale
    t = np.clip((weight * affinity).sum(axis=1) / weight.sum(axis=1), lo, hi)
    rows = np.arange(len(t))  # rows not solved yet
    for _ in range(100):
        a, w, x = affinity[rows], weight[rows], t[rows]
        passing = _sigmoid((a - x[:, None]) / scale)
        kept = (w * passing).sum(axis=1)
        excess = np.log(kept / target)
        open_ = np.abs(excess) > 1e-9
        rows, a, w, x, passing, kept, excess = (v[open_] for v in (rows, a, w, x, passing, kept, excess))
        if not len(rows):
            break
        lo[rows] = np.where(excess > 0, x, lo[rows])
        hi[rows] = np.where(excess > 0, hi[rows], x)
        log_slope = (w * passing * (1 - passing)).sum(axis=1) / (scale * kept)
        newton = x + excess / np.maximum(log_slope, 1e-300)
        inside = (newton > lo[rows]) & (newton < hi[rows])
        t[rows] = np.where(inside, newton, 0.5 * (lo[rows] + hi[rows]))
    return t


class _CategorySampler:
    """Draws level-two categories for requests from per-user distributions (inverse CDF).

    The CDFs of a block's users are laid end to end, user ``j``'s shifted by ``j``, so
    one ``searchsorted`` serves every request of the block.
    """

    def __init__(self, weight: np.ndarray):
        cdf = np.cumsum(weight, axis=1)
        cdf /= cdf[:, -1:]
        cdf[:, -1] = 1.0
        self.n_users, self.n_categories = weight.shape
        self.flat = (cdf + np.arange(self.n_users)[:, None]).ravel()

    def draw(self, user: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """Categories for local users ``user`` (broadcast against ``uniform`` in [0, 1))."""
        index = np.searchsorted(self.flat, user + uniform, side="right")
        return np.minimum(index - user * self.n_categories, self.n_categories - 1)

    def draw_stratified(self, user: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """(len(user), n) categories; draw k takes its quantile from [k/n, (k+1)/n).

        Stratified sampling: each draw still follows the distribution, but a request's
        mix of categories varies less than with independent draws (like retrieval
        channels with quotas). It is also cheap: the categories at the stratum edges
        are searched once per user, and a stratum that lies inside one category (most
        do) needs no search at all.
        """
        edges = self.draw(np.arange(self.n_users)[:, None], np.arange(n + 1) / n)[user]
        uniform = (np.arange(n) + rng.random((len(user), n))) / n
        category = edges[:, :-1].copy()
        crossing = np.nonzero(edges[:, 1:] != category)
        category[crossing] = self.draw(user[crossing[0]], uniform[crossing])
        return category


def _run_funnel(world: _World, latents: np.ndarray, request_user: np.ndarray, n_exposed: np.ndarray,
                rng: np.random.Generator, surface: _Surface | None = None) -> _FunnelResult:
    """One block of requests (sorted by user) through the six stages; retrieval draws from ``surface``'s items
    (None: the whole catalogue)."""
    c = world.config
    _, _, coarse, rank, rerank = c.funnel_sizes
    n_prerank_neg, n_coarse_neg, n_rank_neg, n_rank_pos, n_rerank_neg, n_rerank_pos = c.stored_samples
    _, _, noise_rank, noise_rerank, noise_edge = c.stage_noise
    users, local_user = np.unique(request_user, return_inverse=True)
    n_requests = len(request_user)
    n_dropped_early = n_prerank_neg + n_coarse_neg

    surface = surface or world.surface()
    samplers = _early_stage_samplers(world, latents[users], surface)
    items = _draw_candidates(world, samplers, (n_prerank_neg, n_coarse_neg, coarse), local_user, rng, surface)
    candidates = items[:, n_dropped_early:]  # ranking's input

    # Ranking, re-ranking and edge ranking: the full utility plus shrinking Gaussian noise.
    utility = _utility(world, latents[request_user], candidates)
    rank_order = _descending_order(utility + noise_rank * rng.standard_normal(utility.shape, dtype=np.float32))
    kept_utility = np.take_along_axis(utility, rank_order[:, :rank], axis=1)  # kept item j = rank position j
    rerank_order = _descending_order(kept_utility + noise_rerank
                                     * rng.standard_normal(kept_utility.shape, dtype=np.float32))
    rerank_position = np.empty_like(rerank_order)
    np.put_along_axis(rerank_position, rerank_order, np.arange(rank, dtype=rerank_order.dtype)[None, :], axis=1)

    # The ranked samples, by their position in the ranking's output.
    ranked_position = np.concatenate([
        _random_positions(rng, n_requests, rank, coarse, n_rank_neg),  # rank_neg: dropped at ranking
        np.broadcast_to(np.arange(n_rank_pos, dtype=np.int32), (n_requests, n_rank_pos)),  # rank_pos: its top
        np.take_along_axis(rerank_order, _random_positions(rng, n_requests, rerank, rank, n_rerank_neg),
                           axis=1),  # rerank_neg: dropped at re-ranking
        rerank_order[:, :n_rerank_pos],  # rerank_pos: the re-ranking's top
    ], axis=1)
    ranked_items = np.take_along_axis(candidates, np.take_along_axis(rank_order, ranked_position, axis=1), axis=1)
    ranked_rerank_index = np.where(
        ranked_position < rank,
        np.take_along_axis(rerank_position, np.minimum(ranked_position, rank - 1), axis=1), -1)
    not_ranked = np.full((n_requests, n_dropped_early), -1, dtype=np.int32)

    # Edge ranking picks the exposed items out of the re-ranking's output.
    top_kept = rerank_order[:, :rerank]
    top_utility = np.take_along_axis(kept_utility, top_kept, axis=1)
    edge_order = _descending_order(top_utility + noise_edge * rng.standard_normal(top_utility.shape, dtype=np.float32))
    shown = np.arange(rerank)[None, :] < n_exposed[:, None]
    exposed_position = np.take_along_axis(top_kept, edge_order, axis=1)[shown]
    exposed_request = np.nonzero(shown)[0]
    exposed_column = rank_order[exposed_request, exposed_position]

    return _FunnelResult(
        sample_items=np.concatenate([items[:, :n_dropped_early], ranked_items], axis=1),
        sample_rank_index=np.concatenate([not_ranked, ranked_position], axis=1),
        sample_rerank_index=np.concatenate([not_ranked, ranked_rerank_index], axis=1),
        exposed_items=candidates[exposed_request, exposed_column],
        exposed_rank_index=exposed_position,
        exposed_rerank_index=edge_order[shown],
        exposed_utility=utility[exposed_request, exposed_column],
    )


def _early_stage_samplers(world: _World, user_latent: np.ndarray, surface: _Surface) -> list[_CategorySampler]:
    """Category distributions of the candidates dropped at pre-ranking, dropped at coarse
    ranking, and kept by both (ranking's input), for each user.

    Retrieval draws categories with weight ``size · exp(affinity / temperature)``;
    pre-ranking and coarse ranking score a candidate by its category affinity plus
    logistic noise and keep it above a threshold, chosen per user so that each stage
    keeps its nominal fraction. A candidate's fate then depends on its category only.
    """
    c = world.config
    retrieval, prerank, coarse, _, _ = c.funnel_sizes
    affinity = (user_latent @ world.category_latent.T).astype(np.float64)
    with np.errstate(divide="ignore"):  # a category without items on this surface is never retrieved
        log_weight = np.log(surface.mass) + affinity / c.retrieval_temperature
    retrieved = np.exp(log_weight - log_weight.max(axis=1, keepdims=True))
    retrieved /= retrieved.sum(axis=1, keepdims=True)
    scale_prerank, scale_coarse = (_logistic_scale(noise) for noise in c.stage_noise[:2])
    threshold = _solve_threshold(affinity, retrieved, scale_prerank, prerank / retrieval)
    pass_prerank = _sigmoid((affinity - threshold[:, None]) / scale_prerank)
    threshold = _solve_threshold(affinity, retrieved * pass_prerank, scale_coarse, coarse / retrieval)
    pass_coarse = _sigmoid((affinity - threshold[:, None]) / scale_coarse)
    return [_CategorySampler(retrieved * (1 - pass_prerank)),
            _CategorySampler(retrieved * pass_prerank * (1 - pass_coarse)),
            _CategorySampler(retrieved * pass_prerank * pass_coarse)]


def _draw_candidates(world: _World, samplers: list[_CategorySampler], group_sizes: tuple[int, ...],
                     local_user: np.ndarray, rng: np.random.Generator, surface: _Surface) -> np.ndarray:
    """(R, sum(group_sizes)) items per request: ``group_sizes[g]`` slots drawn from ``samplers[g]``.

    A retrieved candidate is dropped at one stage only, so the items of a request are
    distinct: repeated draws (popular items) are drawn again until none is left.
    """
    categories = np.concatenate([sampler.draw_stratified(local_user, size, rng)
                                 for sampler, size in zip(samplers, group_sizes)], axis=1)
    items = _item_in_category(world, categories, rng, surface)
    slot_group = np.repeat(np.arange(len(group_sizes)), group_sizes)
    rows = np.arange(len(local_user))  # requests that may still hold a repeated item
    for _ in range(_MAX_REDRAW_ROUNDS):
        request, slot = _repeated_slots(items[rows])
        if not len(request):
            return items
        request = rows[request]
        rows = np.unique(request)
        for group, sampler in enumerate(samplers):
            chosen = slot_group[slot] == group
            redrawn = sampler.draw(local_user[request[chosen]], rng.random(int(chosen.sum())))
            items[request[chosen], slot[chosen]] = _item_in_category(world, redrawn, rng, surface)
    raise FedpaError("synthetic funnel: could not draw distinct candidates for every request; the catalogue "
                     "is too small for the funnel (raise n_items or lower funnel_sizes)")


def _item_in_category(world: _World, category: np.ndarray, rng: np.random.Generator,
                      surface: _Surface) -> np.ndarray:
    size = surface.size[category]
    rank = _zipf_rank(rng.random(category.shape, dtype=np.float32), size, world.config.popularity_exponent)
    return surface.start[category] + rank


def _repeated_slots(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(request, slot) of every repeated item after its first slot in the request."""
    n_slots = items.shape[1]
    shift = max(int(n_slots - 1).bit_length(), 1)
    keys = items << shift
    keys |= np.arange(n_slots)
    keys.sort(axis=1)
    item = keys >> shift
    repeated = item[:, 1:] == item[:, :-1]
    request, position = np.nonzero(repeated)
    return request, keys[request, position + 1] & ((1 << shift) - 1)


def _utility(world: _World, request_latent: np.ndarray, items: np.ndarray) -> np.ndarray:
    """True utility (float32) of ``items`` (R, n) for the requests' users."""
    dim = world.config.latent_dim
    utility = np.empty(items.shape, dtype=np.float32)
    # Chunks of 256K rows (16 MiB at 16 dims) stay below glibc's mmap threshold, so their
    # memory is reused from block to block instead of page-faulted in afresh.
    rows_per_chunk = max(1, (1 << 18) // items.shape[1])
    for lo in range(0, len(items), rows_per_chunk):
        hi = min(lo + rows_per_chunk, len(items))
        vectors = np.take(world.item_rows, items[lo:hi]).view(np.float32).reshape(hi - lo, -1, dim)
        utility[lo:hi] = np.matmul(vectors, request_latent[lo:hi, :, None])[:, :, 0]
    utility += world.item_bias[items]
    return utility


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """Column indices of each row by decreasing score (ties by column).

    One int64 sort of (order-preserving score bits << 32 | column): numpy's SIMD sort of
    integers is several times faster than argsort.
    """
    bits = (-scores).astype(np.float32).view(np.int32)
    keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) << 32
    keys |= np.arange(scores.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    return (keys & 0xFFFFFFFF).astype(np.int32)


def _random_positions(rng: np.random.Generator, n_rows: int, lo: int, hi: int, k: int) -> np.ndarray:
    """(n_rows, k) distinct positions in [lo, hi) per row, uniformly at random."""
    if k == hi - lo:
        return np.broadcast_to(np.arange(lo, hi, dtype=np.int32), (n_rows, k)).copy()
    keys = rng.random((n_rows, hi - lo), dtype=np.float32)
    return (np.argpartition(keys, k - 1, axis=1)[:, :k] + lo).astype(np.int32)
