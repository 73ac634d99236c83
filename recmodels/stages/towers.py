"""Two-tower heads of the first two funnel stages: retrieval and pre-ranking.

Both stages must score a large candidate set per request, so the user and the item side are encoded
separately and meet only in a dot product: item vectors can be computed once and indexed, and a
request costs one user-tower pass plus a nearest-neighbour lookup.

* `RetrievalTwoTower` is RecFlow's retrieval baseline (sampled-softmax two-tower), optionally with
  several user interests (ComiRec's self-attentive pooling over the behaviour sequence, scored as in
  DimeRec's guidance module: an item is as relevant as its best-matching interest).
* `PrerankDSSM` is RecFlow's pre-ranking baseline (a DSSM: cosine of two towers), trained with BCE on
  exposures and, optionally, with RecFlow's auxiliary stage-ranking loss that asks the model to keep
  the funnel's own order (an item that survived more stages should score higher).

Inputs follow the representation contract of `recmodels.stages` (``user``, ``history``,
``history_mask``, ``item``); levels follow `recdata.schema.STAGE_LEVEL`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RetrievalTwoTower(nn.Module):
    """User tower (+ optional K interests from the history) and item tower onto the unit sphere.

    Vectors are L2-normalised so that the temperature alone sets the sharpness of the softmax; with
    unit vectors a small temperature (0.05) is what lets the model separate thousands of candidates.
    """

    def __init__(self, user_dim: int, item_dim: int, history_dim: int, dim: int = 32, hidden: int = 64,
                 interests: int = 1, temperature: float = 0.05):
        super().__init__()
        if interests < 1:
            raise ValueError(f"interests must be >= 1, got {interests}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.interests = interests
        self.temperature = temperature
        self.user_fc1 = nn.Linear(user_dim, hidden)
        self.user_fc2 = nn.Linear(hidden, dim)
        self.item_fc1 = nn.Linear(item_dim, hidden)
        self.item_fc2 = nn.Linear(hidden, dim)
        if interests > 1:
            self.interest_fc1 = nn.Linear(history_dim, hidden)
            self.interest_fc2 = nn.Linear(hidden, interests)
            self.interest_proj = nn.Linear(history_dim, dim)

    @property
    def adapter_targets(self) -> list[str]:
        towers = ["user_fc1", "user_fc2", "item_fc1", "item_fc2"]
        return towers + (["interest_fc1", "interest_fc2", "interest_proj"] if self.interests > 1 else [])

    def user_vectors(self, user: torch.Tensor, history: torch.Tensor | None = None,
                     history_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K, dim] unit vectors. Each interest is the shared user-tower output shifted by its own
        attention summary of the history, so that every interest still carries the profile and
        context of the request (a history of the [USER] state alone yields K identical vectors)."""
        base = self.user_fc2(F.relu(self.user_fc1(user)))
        if self.interests == 1:
            return F.normalize(base, dim=-1).unsqueeze(1)
        if history is None or history_mask is None:
            raise ValueError("a multi-interest retrieval model needs history and history_mask")
        mask = history_mask.bool().unsqueeze(-1)                                  # [B, T, 1]
        logits = self.interest_fc2(torch.tanh(self.interest_fc1(history)))        # [B, T, K]
        # A finite fill (not -inf) keeps a request without any valid position NaN-free in both passes:
        # its weights become uniform, and the multiplication by the mask zeroes them.
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=1) * mask
        pooled = torch.einsum("btk,btd->bkd", weights, history)                  # [B, K, history_dim]
        return F.normalize(base.unsqueeze(1) + self.interest_proj(pooled), dim=-1)

    def item_vectors(self, item: torch.Tensor) -> torch.Tensor:
        """[N, dim] unit vectors; independent of the request, hence cacheable for a whole catalogue."""
        return F.normalize(self.item_fc2(F.relu(self.item_fc1(item))), dim=-1)

    def score(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """[B, N] logits: the best interest's cosine over the temperature."""
        return torch.einsum("bkd,nd->bkn", user_vecs, item_vecs).amax(dim=1) / self.temperature

    def loss(self, user: torch.Tensor, history: torch.Tensor | None, history_mask: torch.Tensor | None,
             positives: torch.Tensor, random_negatives: torch.Tensor | None = None,
             hard_negatives: torch.Tensor | None = None, hard_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sampled-softmax cross-entropy of each request's own positive against: the other requests'
        positives (in-batch negatives, cheap and popularity-weighted), the shared random negatives
        (uniform over the catalogue, which in-batch sampling under-represents) and its own hard
        negatives (RecFlow's ``prerank_neg`` samples: items the real funnel considered and dropped).

        Padded hard negatives (``hard_mask`` False) are zeroed before the item tower and their logits
        are -inf, so neither their values nor their gradients can leak into the loss.
        """
        return self.sampled_softmax(self.user_vectors(user, history, history_mask), positives,
                                    random_negatives, hard_negatives, hard_mask)

    def sampled_softmax(self, user_vecs: torch.Tensor, positives: torch.Tensor,
                        random_negatives: torch.Tensor | None = None, hard_negatives: torch.Tensor | None = None,
                        hard_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`loss` for given user vectors [B, K, dim] (a subclass that makes its query another way, as
        DimeRec does, scores it against the same negatives)."""
        batch = user_vecs.shape[0]
        parts = [self.score(user_vecs, self.item_vectors(positives))]            # [B, B]; target on the diagonal
        if random_negatives is not None and random_negatives.shape[0] > 0:
            parts.append(self.score(user_vecs, self.item_vectors(random_negatives)))
        if hard_negatives is not None and hard_negatives.shape[1] > 0:
            if hard_mask is None:
                hard_mask = torch.ones(hard_negatives.shape[:2], dtype=torch.bool, device=hard_negatives.device)
            hard_mask = hard_mask.bool()
            clean = torch.where(hard_mask.unsqueeze(-1), hard_negatives, torch.zeros_like(hard_negatives))
            hard_vecs = self.item_vectors(clean)                                  # [B, H, dim]
            hard_logits = torch.einsum("bkd,bhd->bkh", user_vecs, hard_vecs).amax(dim=1) / self.temperature
            parts.append(hard_logits.masked_fill(~hard_mask, float("-inf")))
        logits = torch.cat(parts, dim=1)
        return F.cross_entropy(logits, torch.arange(batch, device=logits.device))


def recall_ndcg_at_k(scores: torch.Tensor, relevant: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Recall@K = |top-K ∩ relevant| / |relevant| and NDCG@K (binary gains, ideal DCG over
    min(|relevant|, K) hits), averaged over requests with at least one relevant item.

    Keys: ``recall@K``, ``ndcg@K`` for every K, and ``requests`` (how many counted) so that callers
    can pool means of several shards by weight. Means are nan when no request counted. K larger than
    the candidate set is clipped to it. Ties in ``scores`` are broken by `torch.topk`'s order.
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {ks}")
    relevant = relevant.bool()
    n_relevant = relevant.sum(dim=1)
    counted = n_relevant > 0
    requests = int(counted.sum())
    out: dict[str, float] = {"requests": requests}
    if requests == 0:
        return out | {f"{metric}@{k}": math.nan for k in ks for metric in ("recall", "ndcg")}
    scores, relevant, n_relevant = scores[counted], relevant[counted], n_relevant[counted]
    depth = min(max(ks, default=1), scores.shape[1])
    hits = relevant.gather(1, scores.topk(depth, dim=1).indices).double()      # [R, depth] in rank order
    discounts = 1.0 / torch.log2(torch.arange(depth, dtype=torch.float64, device=scores.device) + 2.0)
    best_dcg = torch.cumsum(discounts, dim=0)                   # best_dcg[h - 1]: DCG of h hits on top
    for k in ks:
        kk = min(k, depth)
        found = hits[:, :kk]
        ideal = best_dcg[n_relevant.clamp(max=kk) - 1]
        out[f"recall@{k}"] = float((found.sum(dim=1) / n_relevant).mean())
        out[f"ndcg@{k}"] = float(((found * discounts[:kk]).sum(dim=1) / ideal).mean())
    return out


class PrerankDSSM(nn.Module):
    """DSSM: cosine of a user and an item tower, turned into a logit by a learnable scale and bias.

    A raw cosine lives in [-1, 1], far too narrow for BCE on click-through rates of a few percent;
    the scale (initialised to 5, as a fixed temperature of 0.2 would be) and bias let the model reach
    calibrated probabilities without giving up the dot-product structure that keeps serving cheap.
    """

    def __init__(self, user_dim: int, item_dim: int, hidden: tuple[int, int] = (64, 32)):
        super().__init__()
        first, out = hidden
        self.user_fc1 = nn.Linear(user_dim, first)
        self.user_fc2 = nn.Linear(first, out)
        self.item_fc1 = nn.Linear(item_dim, first)
        self.item_fc2 = nn.Linear(first, out)
        self.logit_scale = nn.Parameter(torch.tensor(5.0))
        self.logit_bias = nn.Parameter(torch.tensor(0.0))

    @property
    def adapter_targets(self) -> list[str]:
        return ["user_fc1", "user_fc2", "item_fc1", "item_fc2"]

    def user_vectors(self, user: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.user_fc2(F.relu(self.user_fc1(user))), dim=-1)

    def item_vectors(self, item: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.item_fc2(F.relu(self.item_fc1(item))), dim=-1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[B] logits of row-aligned (request, candidate) pairs."""
        cosine = (self.user_vectors(user) * self.item_vectors(item)).sum(dim=-1)
        return self.logit_scale * cosine + self.logit_bias

    def score_matrix(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[B, N] logits of every request against a shared candidate set."""
        return self.logit_scale * self.user_vectors(user) @ self.item_vectors(item).T + self.logit_bias

    def loss(self, user: torch.Tensor, item: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean BCE over observed labels; -1 (unobserved, as in the contract) is skipped, and a batch
        without any observed label gives 0 with a gradient so that a training step never fails."""
        observed = labels >= 0
        logits = self(user, item)
        per_row = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(logits.dtype), reduction="none")
        return (per_row * observed).sum() / observed.sum().clamp(min=1)

    def stage_ranking_loss(self, user: torch.Tensor, items: torch.Tensor, levels: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """RecFlow's auxiliary stage-ranking loss: BPR over every pair of a request's stage samples
        whose funnel levels differ, -log σ(s_hi - s_lo), averaged over pairs.

        Only pairs within one request are compared, because the funnel's order is a statement about
        one request's candidates, not across users. Padded samples are zeroed before the tower, so
        their values cannot matter. Returns 0 with a gradient when no request has two levels.
        """
        mask = mask.bool()
        clean = torch.where(mask.unsqueeze(-1), items, torch.zeros_like(items))
        cosine = torch.einsum("bd,bsd->bs", self.user_vectors(user), self.item_vectors(clean))
        scores = self.logit_scale * cosine                     # the bias cancels in every difference
        valid = mask.unsqueeze(2) & mask.unsqueeze(1)
        ordered = (levels.unsqueeze(2) > levels.unsqueeze(1)) & valid            # [B, S_hi, S_lo]
        if not bool(ordered.any()):
            return scores.sum() * 0.0
        diff = scores.unsqueeze(2) - scores.unsqueeze(1)
        return F.softplus(-diff[ordered]).mean()
