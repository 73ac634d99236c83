"""A user's rows for personalizing one funnel stage: its exposures plus the stage's own negatives.

A stage head fine-tuned on exposures alone learns to tell a watched item from an unwatched one among
what the platform *showed*, which is not the stage's job: retrieval and pre-ranking must push down the
items the funnel dropped (RecFlow's point). So each request of the user contributes, next to its
exposures (labels as logged), up to ``per_request`` negatives the stage would have seen and that the
later stages or the user rejected, labelled "no effective view" (other tasks unobserved, -1):

* retrieval: random catalogue items and ``prerank_neg`` samples (what retrieval should not bring back);
* pre-ranking: ``prerank_neg`` and the distribution-shift samples ``rank_neg``;
* ranking: ``rank_neg`` (items that reached ranking and were not kept).

Deterministic for (seed, request): a request's negatives never depend on which other users or splits were
loaded. Rows stay sorted by user, then request time, as `split_users` returns them.
"""

from __future__ import annotations

import numpy as np

from .examples import Examples, Lookups
from .funnel import load_request_pools
from .partition import UserSplits, day_number
from .schema import LABELS
from .store import Dataset, DatasetError

NEGATIVE_LEVELS: dict[str, tuple[int, ...]] = {"retrieval": (0, 1), "prerank": (1, 3), "rank": (3,)}
_LEVEL_NAMES = {0: "random", 1: "prerank_neg", 3: "rank_neg"}
EFFECTIVE_VIEW = LABELS.index("effective_view")


def stage_negative_sources(stage: str) -> list[str]:
    return [_LEVEL_NAMES[v] for v in NEGATIVE_LEVELS[stage]]


def with_stage_negatives(ds: Dataset, splits: UserSplits, users: np.ndarray, stage: str, per_request: int,
                         seed: int, lookups: Lookups) -> UserSplits:
    """``splits`` (exposures of ``users``) with up to ``per_request`` of the stage's negatives per request."""
    if stage not in NEGATIVE_LEVELS:
        raise DatasetError(f"no stage negatives for stage '{stage}' ({', '.join(NEGATIVE_LEVELS)})")
    if per_request < 0:
        raise DatasetError(f"stage negatives per request must be >= 0, got {per_request}")
    if per_request == 0:
        return splits
    return UserSplits(*(_augment(ds, ex, users, stage, per_request, seed, lookups)
                        for ex in (splits.train, splits.val, splits.test)), group_size=splits.group_size)


def _augment(ds: Dataset, ex: Examples, users: np.ndarray, stage: str, k: int, seed: int,
             lookups: Lookups) -> Examples:
    if len(ex) == 0:
        return ex
    if ex.request_id is None:
        raise DatasetError("stage negatives need the request of every exposure (a RecFlow-shaped dataset)")
    day_of = {day_number(name): name for name in ds.days}
    days = [day_of[int(d)] for d in np.unique(ex.request_timestamp // 86_400_000) if int(d) in day_of]
    levels = NEGATIVE_LEVELS[stage]
    pools = load_request_pools(ds, days, views=ex.views, lookups=lookups, n_random=k if 0 in levels else 0,
                               seed=seed, users=users, request_ids=np.unique(ex.request_id))
    cand_req = np.repeat(np.arange(len(pools)), pools.sizes())
    eligible = np.isin(pools.level, levels)
    cand_req, cand_vid = cand_req[eligible], pools.video_id[eligible]
    # up to k per request, uniformly: a key per candidate from a generator seeded by (seed, request)
    keys = np.empty(len(cand_req))
    starts = np.r_[0, np.cumsum(np.bincount(cand_req, minlength=len(pools)))]
    for r in np.nonzero(np.diff(starts))[0]:
        keys[starts[r]:starts[r + 1]] = np.random.default_rng([seed, 7, int(pools.request_id[r])]).random(
            starts[r + 1] - starts[r])
    order = np.lexsort((keys, cand_req))
    cand_req, cand_vid = cand_req[order], cand_vid[order]
    rank_in_request = np.arange(len(cand_req)) - starts[cand_req]
    take = rank_in_request < k
    cand_req, cand_vid = cand_req[take], cand_vid[take]
    labels = np.full((len(cand_req), len(LABELS)), -1, np.int8)
    labels[:, EFFECTIVE_VIEW] = 0
    req = pools.requests
    neg = Examples.from_rows(req.user_id[cand_req], req.request_timestamp[cand_req], cand_vid, labels, ex.views,
                             lookups, pools.request_id[cand_req])
    merged = _concat(ex, neg)
    # exposures first within a request, then its negatives; users and requests in time order
    is_neg = np.r_[np.zeros(len(ex), np.int8), np.ones(len(neg), np.int8)]
    order = np.lexsort((np.arange(len(merged)), is_neg, merged.request_id, merged.request_timestamp,
                        merged.user_id))
    return merged.subset(order)


def _concat(a: Examples, b: Examples) -> Examples:
    return Examples(np.r_[a.user_id, b.user_id], np.r_[a.request_timestamp, b.request_timestamp],
                    np.r_[a.video_id, b.video_id], np.concatenate([a.labels, b.labels]),
                    np.r_[a.view_lo, b.view_lo], np.r_[a.view_hi, b.view_hi], a.views, a.lookups,
                    np.r_[a.request_id, b.request_id])

