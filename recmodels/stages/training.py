"""Training the stage heads on requests with their pools (frozen foundation, heads only).

Each stage can use RecFlow's stage samples (``use_stage_samples``) the way the paper's variants do:

* retrieval: swap random negatives for hard ones, the ``prerank_neg`` items of the same request;
* pre-ranking: add ``rank_neg`` items as negatives (the distribution-shift samples: items a later
  stage saw and dropped) and an auxiliary pairwise loss over the stage order of the pool;
* ranking: an auxiliary pairwise loss on the primary task's logit over the stage order of the
  items that reached ranking (``rank_pos`` above ``rank_neg``, exposures above both);
* re-ranking: the student learns from the MMR teacher on the lists that reached re-ranking, with
  ``rerank_pos`` / ``rerank_neg`` in them when stage samples are used (else exposures and random
  items only).

Without stage samples every stage sees exposures (and random items) only: what a system that logs
only what it showed would have.

Inputs are `RequestTensors`: one entry per request, built by the data layer; nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fedpa.foundation.batch import FUNNEL_LEVELS
from fedpa.foundation.model import masked_bce

from .features import StageEncoder
from .funnel import pair_batch
from .ranking import HoMERanker
from .rerank import CDMReranker
from .towers import PrerankDSSM, RetrievalTwoTower

LEVEL_RANDOM, LEVEL_PRERANK_NEG, LEVEL_RANK_NEG, LEVEL_RANK_POS, LEVEL_REALSHOW, LEVEL_CLICK = (
    FUNNEL_LEVELS[k] for k in ("random", "prerank_neg", "rank_neg", "rank_pos", "realshow", "click"))


@dataclass
class RequestTensors:
    """Requests and their pools as padded tensors (N = the widest pool)."""

    requests: dict[str, torch.Tensor]   # foundation batch, one row per request
    items: torch.Tensor                  # [R, N, F] item feature rows of the pool
    mask: torch.Tensor                   # [R, N] valid
    level: torch.Tensor                  # [R, N] long, LEVEL_RANDOM .. LEVEL_CLICK (-1 padding)
    labels: torch.Tensor                 # [R, N, T] float, -1 unobserved
    category: torch.Tensor               # [R, N] long, item category (level one), for diversity metrics

    def __len__(self) -> int:
        return self.mask.shape[0]

    def rows(self, idx: torch.Tensor) -> RequestTensors:
        return RequestTensors({k: v[idx] for k, v in self.requests.items()}, self.items[idx], self.mask[idx],
                              self.level[idx], self.labels[idx], self.category[idx])


@dataclass(frozen=True)
class StageTraining:
    epochs: int = 2
    lr: float = 3e-3
    requests_per_batch: int = 64
    random_negatives: int = 64
    seed: int = 0


def _batches(n: int, cfg: StageTraining, epoch: int):
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(n, generator=g)
    for s in range(0, n, cfg.requests_per_batch):
        yield order[s:s + cfg.requests_per_batch]


def _encode(encoder: StageEncoder, data: RequestTensors):
    user, history, history_mask = encoder.users(data.requests)
    r, n = data.mask.shape
    item = encoder.items(data.items.reshape(r * n, -1)).reshape(r, n, -1)
    return user, history, history_mask, item


def _pick(level: torch.Tensor, mask: torch.Tensor, wanted: tuple[int, ...], k: int, seed: int):
    """Up to k pool positions per request whose level is in ``wanted`` ([R, k] and validity)."""
    hit = mask & torch.isin(level, torch.tensor(wanted))
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(level.shape, generator=g)
    score = torch.where(hit, noise, torch.full_like(noise, -1.0))
    val, idx = score.topk(min(k, level.shape[1]), dim=1)
    return idx, val >= 0


def _optimize(model: torch.nn.Module, cfg: StageTraining, epoch_batches: Callable[[int], Iterable[torch.Tensor]],
              batch_loss: Callable[[torch.Tensor, int], torch.Tensor]) -> list[float]:
    """Adam over ``model``'s parameters; per epoch, the batches (index tensors) ``epoch_batches(epoch)``
    yields, each step on ``batch_loss(batch, epoch)``. Returns the size-weighted mean loss per epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    model.train()
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for b in epoch_batches(epoch):
            loss = batch_loss(b, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(b), count + len(b)
        losses.append(total / max(count, 1))
    return losses


def train_retrieval(model: RetrievalTwoTower, encoder: StageEncoder, data: RequestTensors, cfg: StageTraining,
                    use_stage_samples: bool, hard_negatives: int = 10) -> list[float]:
    """Sampled softmax: each click of a request against in-batch positives, random catalogue items and,
    with stage samples, the request's own prerank_neg items."""
    user, history, history_mask, item = _encode(encoder, data)
    pos_idx, pos_ok = _pick(data.level, data.mask, (LEVEL_CLICK,), 1, cfg.seed)
    has_pos = pos_ok[:, 0]
    user, history, history_mask, item = user[has_pos], history[has_pos], history_mask[has_pos], item[has_pos]
    level, mask = data.level[has_pos], data.mask[has_pos]
    positives = item[torch.arange(len(item)), pos_idx[has_pos, 0]]
    hard_idx, hard_ok = _pick(level, mask, (LEVEL_PRERANK_NEG,), hard_negatives, cfg.seed + 1)
    hard = item.gather(1, hard_idx[..., None].expand(-1, -1, item.shape[-1]))
    rand_pool = item[mask & (level == LEVEL_RANDOM)]
    negative_draws: dict[int, torch.Generator] = {}  # one stream of random negatives per epoch

    def batch_loss(b: torch.Tensor, epoch: int) -> torch.Tensor:
        g = negative_draws.setdefault(epoch, torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        negs = rand_pool[torch.randint(len(rand_pool), (cfg.random_negatives,), generator=g)] \
            if len(rand_pool) else None
        return model.loss(user[b], history[b], history_mask[b], positives[b], negs,
                          hard[b] if use_stage_samples else None, hard_ok[b] if use_stage_samples else None)

    return _optimize(model, cfg, lambda epoch: _batches(len(user), cfg, epoch), batch_loss)


def train_prerank(model: PrerankDSSM, encoder: StageEncoder, data: RequestTensors, cfg: StageTraining,
                  use_stage_samples: bool, aux_weight: float = 0.5) -> list[float]:
    """BCE on exposures (effective view) against random items; with stage samples, rank_neg items as
    extra negatives and a pairwise loss over the stage order of each pool."""
    user, _, _, item = _encode(encoder, data)
    exposed = data.mask & (data.level >= LEVEL_REALSHOW)
    negatives = (LEVEL_RANDOM, LEVEL_RANK_NEG) if use_stage_samples else (LEVEL_RANDOM,)
    neg_idx, neg_ok = _pick(data.level, data.mask, negatives, 8, cfg.seed + 2)

    def batch_loss(b: torch.Tensor, epoch: int) -> torch.Tensor:
        rows_r, rows_n = torch.nonzero(exposed[b], as_tuple=True)
        lab = data.labels[b][rows_r, rows_n, 0]
        nr, nn_ = torch.nonzero(neg_ok[b], as_tuple=True)
        users = torch.cat([user[b][rows_r], user[b][nr]])
        items = torch.cat([item[b][rows_r, rows_n], item[b][nr, neg_idx[b][nr, nn_]]])
        labels = torch.cat([lab.clamp(min=0), torch.zeros(len(nr))])
        seen = torch.cat([lab >= 0, torch.ones(len(nr), dtype=torch.bool)])
        loss = model.loss(users[seen], items[seen], labels[seen])
        if use_stage_samples:
            loss = loss + aux_weight * model.stage_ranking_loss(user[b], item[b], data.level[b], data.mask[b])
        return loss

    return _optimize(model, cfg, lambda epoch: _batches(len(user), cfg, epoch), batch_loss)


def ranking_rows(encoder: StageEncoder, data: RequestTensors, use_stage_samples: bool, seed: int):
    """Pair features, labels [M, T], level [M] and request index [M] of what ranking trains on:
    exposures, plus (stage samples) the items that reached ranking (rank_pos, rank_neg, rerank_*)."""
    wanted = (LEVEL_REALSHOW, LEVEL_CLICK) + ((LEVEL_RANK_NEG, LEVEL_RANK_POS) if use_stage_samples else ())
    idx, ok = _pick(data.level, data.mask, wanted, 24, seed + 3)
    r, k = idx.shape
    items = data.items.gather(1, idx[..., None].expand(-1, -1, data.items.shape[-1]))
    pairs = encoder.pairs(pair_batch(data.requests, items))
    labels = data.labels.gather(1, idx[..., None].expand(-1, -1, data.labels.shape[-1])).reshape(r * k, -1)
    level = data.level.gather(1, idx).reshape(-1)
    req = torch.arange(r).repeat_interleave(k)
    keep = ok.reshape(-1)
    return pairs[keep], labels[keep], level[keep], req[keep]


def train_ranking(model: HoMERanker, encoder: StageEncoder, data: RequestTensors, cfg: StageTraining,
                  use_stage_samples: bool, aux_weight: float = 0.5, rows_per_batch: int = 512) -> list[float]:
    """Multi-task BCE on exposures; with stage samples, a pairwise loss on the effective-view logit over
    the stage order of the items of a request that reached ranking."""
    pairs, labels, level, req = ranking_rows(encoder, data, use_stage_samples, cfg.seed)

    def epoch_batches(epoch: int):
        # whole requests stay together in a batch: the pairwise loss compares items of one request
        g = torch.Generator().manual_seed(cfg.seed * 31 + epoch)
        order = torch.randperm(int(req.max()) + 1 if len(req) else 0, generator=g)[req].argsort(stable=True)
        return (order[s:s + rows_per_batch] for s in range(0, len(order), rows_per_batch))

    def batch_loss(b: torch.Tensor, epoch: int) -> torch.Tensor:
        logits = model(pairs[b])
        loss = masked_bce(logits, labels[b])
        if use_stage_samples:
            pair = (req[b][:, None] == req[b][None, :]) & (level[b][:, None] > level[b][None, :])
            if bool(pair.any()):
                diff = logits[:, 0][:, None] - logits[:, 0][None, :]
                loss = loss + aux_weight * torch.nn.functional.softplus(-diff[pair]).mean()
        return loss

    return _optimize(model, cfg, epoch_batches, batch_loss)


def train_rerank(model: CDMReranker, ranker: HoMERanker, encoder: StageEncoder, data: RequestTensors,
                 cfg: StageTraining, use_stage_samples: bool, list_size: int = 12, k: int = 6,
                 mmr_lambda: float = 0.7) -> list[float]:
    """The CDM student on lists like those ranking hands over: per request, the ``list_size`` items of
    the highest funnel levels (stage samples included or not), scored by the trained ranker."""
    wanted = (LEVEL_REALSHOW, LEVEL_CLICK, LEVEL_RANDOM) + \
        ((LEVEL_RANK_POS, LEVEL_RANK_NEG) if use_stage_samples else ())
    idx, ok = _pick(data.level, data.mask, wanted, list_size, cfg.seed + 4)
    r = idx.shape[0]
    items = data.items.gather(1, idx[..., None].expand(-1, -1, data.items.shape[-1]))
    with torch.no_grad():
        emb = encoder.items(items.reshape(r * idx.shape[1], -1)).reshape(r, idx.shape[1], -1)
        ranker.eval()
        scores = torch.sigmoid(ranker(encoder.pairs(pair_batch(data.requests, items)))[:, 0]).reshape(r, -1)
    scores = scores.masked_fill(~ok, 0.0)
    return _optimize(model, cfg, lambda epoch: _batches(r, cfg, epoch),
                     lambda b, epoch: model.loss(emb[b], scores[b], ok[b], k, mmr_lambda))
