"""The re-ranking stage: greedy MMR as a teacher, and a CDM student that learns it (arXiv 2406.09021).

The ranking stage scores every candidate on its own, so its top of the list tends to be many
near-duplicates of the user's favourite kind of item. Re-ranking looks at the candidates of one
request *together*:

* `mmr_select` / `mmr_select_batch`: greedy maximal marginal relevance, the classic list-aware
  rule (relevance minus redundancy with what is already picked). It is exact but sequential in the
  list length, so it serves as the *teacher* that labels which candidates a diverse list keeps.
* `CDMReranker`: a contrastive context-aware student. Each candidate attends over the other
  candidates of its request; an InfoNCE loss teaches that attention to separate similar from
  dissimilar neighbours, and a small MLP on [item, context, score] predicts the teacher's choice in
  one parallel pass, so serving needs no greedy loop.
* `intra_list_distance` / `category_coverage`: the diversity of a final list, for evaluation.

Padded lists are supported everywhere through a validity mask; padded candidates are never picked
and never influence a valid candidate's output.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _greedy_mmr(scores: torch.Tensor, items: torch.Tensor, k: int, lam: float, mask: torch.Tensor) -> torch.Tensor:
    """Picks [B, k] in selection order, -1 once a row runs out of valid candidates.

    The first pick is the best-scored candidate whatever ``lam`` is: with an empty selection there
    is no redundancy to trade off, and ``lam = 0`` would otherwise pick an arbitrary candidate.
    """
    batch, n = scores.shape
    unit = F.normalize(items.to(torch.float32), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)                            # [B, N, N]
    available = mask.clone()
    redundancy = torch.zeros(batch, n, dtype=similarity.dtype, device=scores.device)
    rows = torch.arange(batch, device=scores.device)
    picks = torch.full((batch, max(k, 0)), -1, dtype=torch.long, device=scores.device)
    for step in range(max(k, 0)):
        objective = scores if step == 0 else lam * scores - (1.0 - lam) * redundancy
        objective = objective.masked_fill(~available, float("-inf"))
        pick = objective.argmax(dim=-1)
        has_pick = available.any(dim=-1)
        picks[:, step] = torch.where(has_pick, pick, -1)
        available[rows[has_pick], pick[has_pick]] = False
        picked_similarity = similarity[rows, pick]                        # [B, N]
        if step == 0:
            redundancy = picked_similarity
        else:
            redundancy = torch.where(has_pick[:, None], torch.maximum(redundancy, picked_similarity), redundancy)
    return picks


def mmr_select(scores: torch.Tensor, items: torch.Tensor, k: int, lam: float = 0.7,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy MMR over one request: indices of the picked candidates, in pick order (LongTensor [k']).

    Each step takes ``argmax lam * score(i) - (1 - lam) * max_{j picked} cos(item_i, item_j)``;
    ``lam = 1`` is plain top-k by score, ``lam = 0`` pure diversity after the first pick.
    ``k' = min(k, number of valid candidates)``.
    """
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    picks = _greedy_mmr(scores[None], items[None], k, lam, valid[None])[0]
    return picks[picks >= 0]


def mmr_select_batch(scores: torch.Tensor, items: torch.Tensor, k: int, lam: float = 0.7,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy MMR per request of a padded batch; float [B, N] with 1.0 where the candidate is picked."""
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    picks = _greedy_mmr(scores, items, k, lam, valid)
    selected = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.float32, device=scores.device)
    # Row-wise "no pick" (-1) lands in the extra last column, which is dropped.
    selected.scatter_(1, torch.where(picks >= 0, picks, scores.shape[1]), 1.0)
    return selected[:, :-1]


def intra_list_distance(items: torch.Tensor) -> float:
    """Mean pairwise cosine distance (1 - cos) over a list [k, d]; 0.0 for fewer than two items."""
    k = items.shape[0]
    if k < 2:
        return 0.0
    unit = F.normalize(items.to(torch.float64), dim=-1)
    distance = 1.0 - unit @ unit.T
    pairs = torch.triu_indices(k, k, offset=1)
    return float(distance[pairs[0], pairs[1]].mean())


def category_coverage(categories: torch.Tensor, n_categories: int) -> float:
    """Distinct categories in a list over the most it could hold (min(k, n_categories)); 0.0 if empty."""
    k = categories.numel()
    if k == 0 or n_categories <= 0:
        return 0.0
    return torch.unique(categories).numel() / min(k, n_categories)


def _masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed entries of the last axis; all-zero weights where none is allowed.

    Rows without any allowed entry are softmaxed over zeros and then zeroed, rather than over -inf
    (which gives NaN and poisons the backward pass even if the NaNs are replaced afterwards).
    """
    any_allowed = allowed.any(dim=-1, keepdim=True)
    filled = logits.masked_fill(~allowed, float("-inf")).where(any_allowed, torch.zeros_like(logits))
    return torch.softmax(filled, dim=-1) * allowed


class _RequestContext(NamedTuple):
    """What the context encoder computes once per forward, shared by the student and InfoNCE."""

    items: torch.Tensor       # [B, N, d], zero at padding
    centred: torch.Tensor     # [B, N], rank score minus the request's valid mean, zero at padding
    attention: torch.Tensor   # [B, N, N], scaled query-key scores
    others: torch.Tensor      # [B, N, N] bool, True where column is another valid candidate of the row's request
    value: torch.Tensor       # [B, N, h]
    weights: torch.Tensor     # [B, N, N], the attention's softmax over ``others``
    positive: torch.Tensor    # [B, N, h], the context each candidate sees: ``weights @ value``


class CDMReranker(nn.Module):
    """Contrastive context-aware re-ranker whose student imitates the greedy MMR teacher.

    Inputs per request: candidate embeddings ``items`` [B, N, d], the ranking stage's scores
    ``rank_scores`` [B, N] and a validity ``mask`` [B, N]. Scores enter centred on the request's
    valid mean, because MMR's choice is invariant to a per-request shift of the scores; the context
    encoder reads them alongside the items so it can tell a redundant candidate (a similar candidate
    scores higher) from a harmless one (the similar candidates score lower).
    """

    def __init__(self, item_dim: int, context_dim: int = 32, student_dim: int = 64, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature
        self.query = nn.Linear(item_dim + 1, context_dim)
        self.key = nn.Linear(item_dim + 1, context_dim)
        self.value = nn.Linear(item_dim + 1, context_dim)
        self.student_hidden = nn.Linear(item_dim + context_dim + 1, student_dim)
        self.student_out = nn.Linear(student_dim, 1)

    def _encode(self, items: torch.Tensor, rank_scores: torch.Tensor, mask: torch.Tensor) -> _RequestContext:
        mask = mask.to(torch.bool)
        # Zero the padding up front so that garbage (even inf/nan) there cannot leak through 0 * x.
        items = torch.where(mask[..., None], items, 0.0)
        n_valid = mask.sum(dim=-1, keepdim=True).clamp(min=1)
        request_mean = torch.where(mask, rank_scores, 0.0).sum(dim=-1, keepdim=True) / n_valid
        centred = torch.where(mask, rank_scores - request_mean, 0.0)
        features = torch.cat([items, centred[..., None]], dim=-1)
        query, key, value = self.query(features), self.key(features), self.value(features)
        attention = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
        not_self = ~torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
        others = mask[:, :, None] & mask[:, None, :] & not_self
        weights = _masked_softmax(attention, others)
        return _RequestContext(items, centred, attention, others, value, weights, weights @ value)

    def _student(self, ctx: _RequestContext) -> torch.Tensor:
        features = torch.cat([ctx.items, ctx.positive, ctx.centred[..., None]], dim=-1)
        return self.student_out(F.silu(self.student_hidden(features))).squeeze(-1)

    def _info_nce(self, ctx: _RequestContext) -> torch.Tensor:
        anchor = F.normalize(ctx.value, dim=-1)
        positive = F.normalize(ctx.positive, dim=-1)
        negative = F.normalize(_masked_softmax(-ctx.attention, ctx.others) @ ctx.value, dim=-1)
        cross = (anchor @ positive.transpose(-1, -2)).masked_fill(~ctx.others, float("-inf"))
        logits = torch.cat([(anchor * positive).sum(-1, keepdim=True),
                            (anchor * negative).sum(-1, keepdim=True), cross], dim=-1) / self.temperature
        per_candidate = -torch.log_softmax(logits, dim=-1)[..., 0]
        has_context = ctx.others.any(dim=-1)
        return (per_candidate * has_context).sum() / has_context.sum().clamp(min=1)

    def forward(self, items: torch.Tensor, rank_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Student logits [B, N]: how likely the MMR teacher keeps each candidate (0 at padding)."""
        return self._student(self._encode(items, rank_scores, mask)).masked_fill(~mask.to(torch.bool), 0.0)

    def final_scores(self, items: torch.Tensor, rank_scores: torch.Tensor, mask: torch.Tensor,
                     weight: float = 1.0) -> torch.Tensor:
        """Serving scores: the ranking score plus ``weight`` times the student's keep-probability; -inf at padding."""
        keep = torch.sigmoid(self(items, rank_scores, mask))
        return (rank_scores + weight * keep).masked_fill(~mask.to(torch.bool), float("-inf"))

    def context_weights(self, items: torch.Tensor, rank_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, N]: how much each candidate's context draws on each other candidate.

        Rows sum to 1 (0 for a candidate alone in its request). For inspecting what the encoder
        has learnt to treat as similar, e.g. when a served list looks redundant.
        """
        return self._encode(items, rank_scores, mask).weights

    def contrastive_loss(self, items: torch.Tensor, rank_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """InfoNCE of each candidate's value against its positive context (the attention's own weights).

        Negatives: the context under the negated attention (the candidates the attention finds least
        similar) and the positive contexts of the other candidates of the request. Minimising it
        makes the attention put its weight on candidates that resemble the anchor, which is the
        redundancy signal the student needs. Candidates without any valid neighbour are left out.
        """
        return self._info_nce(self._encode(items, rank_scores, mask))

    def loss(self, items: torch.Tensor, rank_scores: torch.Tensor, mask: torch.Tensor, k: int,
             lam: float = 0.7, contrastive_weight: float = 0.1) -> torch.Tensor:
        """BCE of the student against the MMR teacher's picks (valid candidates only) plus weighted InfoNCE."""
        mask = mask.to(torch.bool)
        with torch.no_grad():
            teacher = mmr_select_batch(rank_scores, items, k, lam, mask)
        ctx = self._encode(items, rank_scores, mask)
        per_candidate = F.binary_cross_entropy_with_logits(self._student(ctx), teacher, reduction="none")
        imitation = (per_candidate * mask).sum() / mask.sum().clamp(min=1)
        return imitation + contrastive_weight * self._info_nce(ctx)

    @property
    def adapter_targets(self) -> list[str]:
        return [name for name, module in self.named_modules() if isinstance(module, nn.Linear)]
