"""The funnel: a request's candidate pool through retrieval → pre-ranking → ranking → re-ranking.

Each stage scores only what the previous one kept, as a production funnel does, so an early stage's
miss is final. Requests are processed in batches: pools padded to one width with a validity mask.
Stage sizes are per request; the defaults scale RecFlow's 8,000 → 3,000 → 500 → 120 → 10 → 6 (kept
by retrieval, pre-ranking, coarse ranking, ranking, re-ranking, the device) down to pools of a few
hundred items: retrieval keeps half the pool, pre-ranking half of that, ranking a third, re-ranking
exposes 6.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .features import StageEncoder
from .ranking import HoMERanker
from .rerank import CDMReranker, mmr_select_batch
from .towers import PrerankDSSM, RetrievalTwoTower

NEG_INF = float("-inf")


@dataclass(frozen=True)
class FunnelSizes:
    retrieval: int = 72
    prerank: int = 36
    rank: int = 12
    exposed: int = 6

    def __post_init__(self):
        sizes = [self.retrieval, self.prerank, self.rank, self.exposed]
        if min(sizes) < 1 or sizes != sorted(sizes, reverse=True):
            raise ValueError(f"funnel sizes must be positive and shrink stage by stage, got {sizes}")


@dataclass
class StageModels:
    retrieval: RetrievalTwoTower
    prerank: PrerankDSSM
    rank: HoMERanker
    rerank: CDMReranker | None = None   # None: greedy MMR over the ranking scores (the baseline)
    rerank_weight: float = 1.0          # CDM: final = rank score + weight * student
    mmr_lambda: float = 0.7

    def eval(self) -> StageModels:
        for m in (self.retrieval, self.prerank, self.rank, self.rerank):
            if m is not None:
                m.eval()
        return self


@dataclass
class FunnelOutput:
    """Pool positions kept by each stage, best first ([B, size], -1 where a pool had fewer valid items),
    and the ranking stage's per-task logits of the items it kept."""

    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    rank_logits: torch.Tensor | None = None


def _top(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    scores = scores.masked_fill(~mask, NEG_INF)
    k = min(k, scores.shape[1])
    val, idx = scores.topk(k, dim=1)
    return idx.masked_fill(val == NEG_INF, -1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] at positions idx [B, K] (-1 -> position 0; callers mask those)."""
    safe = idx.clamp(min=0)
    return x.gather(1, safe.reshape(*safe.shape, *([1] * (x.dim() - 2))).expand(*safe.shape, *x.shape[2:]))


def pair_batch(requests: dict[str, torch.Tensor], items: torch.Tensor) -> dict[str, torch.Tensor]:
    """Foundation batch rows for every (request, candidate) of items [B, K, F]: the request's user side
    repeated per candidate (the foundation encodes each distinct history once)."""
    b, k = items.shape[:2]
    rep = {key: requests[key].repeat_interleave(k, dim=0)
           for key in ("user_profile", "hist_items", "hist_mask", "context")}
    rep["item"] = items.reshape(b * k, -1)
    return rep


@torch.no_grad()
def run_funnel(models: StageModels, encoder: StageEncoder, requests: dict[str, torch.Tensor],
               pool_items: torch.Tensor, pool_mask: torch.Tensor, sizes: FunnelSizes = FunnelSizes(),
               timings: dict[str, float] | None = None) -> FunnelOutput:
    """Pass each request's pool (item feature rows [B, N, F], valid [B, N]) through the four stages.
    ``timings``: if given, each stage's wall seconds are added to it (benchmarks)."""
    models.eval()
    out = FunnelOutput()
    b, n = pool_mask.shape
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        if timings is not None:
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - clock[0]
            clock[0] = now

    user, history, history_mask = encoder.users(requests)
    item_emb = encoder.items(pool_items.reshape(b * n, -1)).reshape(b, n, -1)

    # retrieval: the whole pool
    uvec = models.retrieval.user_vectors(user, history, history_mask)                    # [B, K, dim]
    ivec = models.retrieval.item_vectors(item_emb.reshape(b * n, -1)).reshape(b, n, -1)  # [B, N, dim]
    scores = torch.einsum("bkd,bnd->bkn", uvec, ivec).amax(dim=1)
    kept = _top(scores, pool_mask, sizes.retrieval)
    out.kept["retrieval"] = kept
    lap("retrieval")

    # pre-ranking: what retrieval kept
    valid = kept >= 0
    emb = _gather(item_emb, kept)
    k1 = kept.shape[1]
    scores = models.prerank(user.repeat_interleave(k1, dim=0), emb.reshape(b * k1, -1)).reshape(b, k1)
    sel = _top(scores, valid, sizes.prerank)
    kept = torch.where(sel >= 0, _gather(kept, sel), sel)
    out.kept["prerank"] = kept
    lap("prerank")

    # ranking: target attention + HoME over the pre-ranked items
    valid = kept >= 0
    k2 = kept.shape[1]
    pairs = encoder.pairs(pair_batch(requests, _gather(pool_items, kept)))
    logits = models.rank(pairs).reshape(b, k2, -1)
    sel = _top(logits[..., 0], valid, sizes.rank)
    out.rank_logits = _gather(logits, sel.clamp(min=0))
    kept = torch.where(sel >= 0, _gather(kept, sel), sel)
    out.kept["rank"] = kept
    lap("rank")

    # re-ranking: diversity over the ranked list
    valid = kept >= 0
    emb = _gather(item_emb, kept)
    rank_scores = torch.sigmoid(out.rank_logits[..., 0]).masked_fill(~valid, 0.0)
    if models.rerank is not None:
        final = models.rerank.final_scores(emb, rank_scores, valid, models.rerank_weight)
        sel = _top(final, valid, sizes.exposed)
    else:
        chosen = mmr_select_batch(rank_scores, emb, sizes.exposed, models.mmr_lambda, valid) > 0
        # MMR's picks in ranking order (the teacher marks a set; the device shows it by score)
        sel = _top(rank_scores.masked_fill(~chosen, -1.0), chosen, sizes.exposed)
    out.kept["exposed"] = torch.where(sel >= 0, _gather(kept, sel), sel)
    lap("rerank")
    return out
