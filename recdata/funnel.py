"""Requests with their candidate pools: what the funnel's stages train and are evaluated on.

RecFlow stores, per request, the items every stage let through or filtered out (stage samples) next
to the exposures with feedback. A request's *pool* here is

* its exposures (level ``LEVEL_CLICK`` for an effective view, else ``LEVEL_REALSHOW``; labels known),
* its stage samples (level `schema.STAGE_LEVEL` of the stage: the later a stage dropped an item,
  the higher; labels unknown, -1),
* ``n_random`` items drawn uniformly from the catalogue (level ``LEVEL_RANDOM``): the "rest of the
  corpus" that retrieval must not bring back. Drawn with a generator seeded by (seed, request id), so
  a pool never depends on which other requests were loaded.

An item may appear under several labels of one request (RecFlow keeps e.g. rank_pos and rerank_neg
rows of the same video); the pool keeps it once, at its highest level.

Everything is in arrays (CSR: ``offsets`` into the candidate arrays), and the user side of each
request is an `Examples` row, so batches for the foundation come from `Examples.batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .examples import Examples, Lookups, Views
from .schema import LABELS, LEVEL_CLICK, LEVEL_RANDOM, LEVEL_REALSHOW, STAGE_LEVEL, STAGES
from .store import Dataset, DatasetError

EFFECTIVE_VIEW = LABELS.index("effective_view")


@dataclass
class RequestPools:
    requests: Examples          # one row per request: user, time, video_id = 0 (the user side only)
    request_id: np.ndarray      # [R]
    offsets: np.ndarray         # [R + 1]
    video_id: np.ndarray        # [C] candidates, grouped by request
    level: np.ndarray           # [C] int8: LEVEL_RANDOM .. LEVEL_CLICK
    labels: np.ndarray          # [C, T] int8, -1 = not exposed / not observed
    playing_time: np.ndarray    # [C] ms, -1 = not exposed

    def __len__(self) -> int:
        return len(self.request_id)

    def pool(self, r: int) -> slice:
        return slice(int(self.offsets[r]), int(self.offsets[r + 1]))

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def padded(self, values: np.ndarray, fill) -> np.ndarray:
        """A per-candidate array ([C, ...]) as one row per request, [R, N, ...] with N the widest pool;
        ``fill`` past the end of each pool."""
        n = int(self.sizes().max()) if len(self) else 0
        pos = np.arange(n)[None, :]
        inside = pos < self.sizes()[:, None]
        flat = np.where(inside, self.offsets[:-1, None] + pos, 0)
        out = values[flat]
        out[~inside] = fill
        return out

    def subset(self, rows: np.ndarray) -> RequestPools:
        rows = np.asarray(rows, dtype=np.int64)
        parts = [np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return RequestPools(self.requests.subset(rows), self.request_id[rows], offsets, self.video_id[idx],
                            self.level[idx], self.labels[idx], self.playing_time[idx])


def sample_requests(ds: Dataset, days: list[str], n: int, seed: int) -> np.ndarray | None:
    """Ids of ``n`` requests drawn uniformly from those of ``days`` (None: take them all), so that only
    their pools are read."""
    ids = np.concatenate([ds.day("requests", d, ["request_id"]).column("request_id").to_numpy() for d in days])
    if len(ids) <= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))


def load_request_pools(ds: Dataset, days: list[str], *, views: Views, lookups: Lookups, n_random: int = 100,
                       seed: int = 0, users: np.ndarray | None = None, max_requests: int = 0,
                       request_ids: np.ndarray | None = None) -> RequestPools:
    """The requests of ``days`` (of ``users`` if given, among ``request_ids`` if given; at most
    ``max_requests``, the earliest kept) that have at least one exposure, with their pools."""
    n_items = len(lookups.item_table)
    if n_items < 2:
        raise DatasetError(f"{ds.path}: the catalogue has fewer than 2 items")
    req_parts, cand = [], []
    for day in days:
        exp = ds.day("exposures", day, ["request_id", "user_id", "request_timestamp", "video_id", "playing_time",
                                        *LABELS])
        st = ds.day("stage_samples", day, ["request_id", "video_id", "stage"])
        e_rid = exp.column("request_id").to_numpy()
        e_uid = exp.column("user_id").to_numpy()
        keep = np.ones(len(e_rid), bool) if users is None else np.isin(e_uid, users)
        if request_ids is not None:
            keep &= np.isin(e_rid, request_ids)
        e_rid, e_uid = e_rid[keep], e_uid[keep]
        e_ts = exp.column("request_timestamp").to_numpy()[keep]
        e_vid = exp.column("video_id").to_numpy()[keep]
        e_play = exp.column("playing_time").to_numpy()[keep]
        e_lab = np.stack([exp.column(lab).to_numpy()[keep] for lab in LABELS], axis=1).astype(np.int8)
        e_level = np.where(e_lab[:, EFFECTIVE_VIEW] == 1, LEVEL_CLICK, LEVEL_REALSHOW).astype(np.int8)
        s_rid = st.column("request_id").to_numpy()
        s_keep = np.isin(s_rid, e_rid)
        s_rid = s_rid[s_keep]
        s_vid = st.column("video_id").to_numpy()[s_keep]
        level_of_code = np.array([STAGE_LEVEL[s] for s in STAGES], dtype=np.int8)
        s_level = level_of_code[st.column("stage").to_numpy()[s_keep].astype(np.int64)]
        rids, first = np.unique(e_rid, return_index=True)
        req_parts.append((rids, e_uid[first], e_ts[first]))
        cand.append((np.concatenate([e_rid, s_rid]), np.concatenate([e_vid, s_vid]),
                     np.concatenate([e_level, s_level]),
                     np.concatenate([e_lab, np.full((len(s_rid), len(LABELS)), -1, np.int8)]),
                     np.concatenate([e_play, np.full(len(s_rid), -1, np.int64)])))
    if not req_parts:
        raise DatasetError("no days to load requests from")
    rid = np.concatenate([p[0] for p in req_parts])
    uid = np.concatenate([p[1] for p in req_parts])
    ts = np.concatenate([p[2] for p in req_parts])
    order = np.lexsort((rid, ts))
    if max_requests:
        order = order[:max_requests]
    rid, uid, ts = rid[order], uid[order], ts[order]
    c_rid, c_vid, c_level, c_lab, c_play = (np.concatenate([c[i] for c in cand]) for i in range(5))
    wanted = np.isin(c_rid, rid)
    c_rid, c_vid, c_level, c_lab, c_play = (a[wanted] for a in (c_rid, c_vid, c_level, c_lab, c_play))
    # one row per (request, item): the highest level wins (exposures outrank stage samples)
    order_c = np.lexsort((-c_level.astype(np.int64), c_vid, c_rid))
    c_rid, c_vid, c_level, c_lab, c_play = (a[order_c] for a in (c_rid, c_vid, c_level, c_lab, c_play))
    first_of = np.ones(len(c_rid), bool)
    first_of[1:] = (c_rid[1:] != c_rid[:-1]) | (c_vid[1:] != c_vid[:-1])
    c_rid, c_vid, c_level, c_lab, c_play = (a[first_of] for a in (c_rid, c_vid, c_level, c_lab, c_play))

    pos_of = {int(r): i for i, r in enumerate(rid)}
    req_index = np.array([pos_of[int(r)] for r in c_rid], dtype=np.int64)
    rand_vid, rand_req = [], []
    for i, r in enumerate(rid):
        g = np.random.default_rng([seed, int(r)])
        rand_vid.append(g.integers(1, n_items, size=n_random))
        rand_req.append(np.full(n_random, i, np.int64))
    all_req = np.concatenate([req_index, *rand_req]) if rand_req else req_index
    all_vid = np.concatenate([c_vid, *rand_vid]) if rand_vid else c_vid
    all_level = np.concatenate([c_level, np.full(n_random * len(rid), LEVEL_RANDOM, np.int8)])
    all_lab = np.concatenate([c_lab, np.full((n_random * len(rid), len(LABELS)), -1, np.int8)])
    all_play = np.concatenate([c_play, np.full(n_random * len(rid), -1, np.int64)])
    # random items that are already in the pool are dropped (the pool is a set)
    order_a = np.lexsort((-all_level.astype(np.int64), all_vid, all_req))
    all_req, all_vid, all_level, all_lab, all_play = (a[order_a] for a in (all_req, all_vid, all_level, all_lab,
                                                                           all_play))
    keep = np.ones(len(all_req), bool)
    keep[1:] = (all_req[1:] != all_req[:-1]) | (all_vid[1:] != all_vid[:-1])
    all_req, all_vid, all_level, all_lab, all_play = (a[keep] for a in (all_req, all_vid, all_level, all_lab, all_play))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(all_req, minlength=len(rid)))]).astype(np.int64)
    requests = Examples.from_rows(uid, ts, np.zeros(len(rid), np.int64),
                                  np.full((len(rid), len(LABELS)), -1, np.int8), views, lookups, rid)
    return RequestPools(requests, rid, offsets, all_vid, all_level, all_lab, all_play)
