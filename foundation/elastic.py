"""ELASTIC's user encoder (Kuaishou, arXiv 2408.09380): a long behaviour sequence compressed into a fixed number
of interest experts in time linear in its length, with an interest memory bank whose size is decoupled from cost.

- **Linear dispatcher attention.** K dispatcher tokens (the interest experts) first read the whole history
  (cross-attention K x L), then the history reads the K updated experts back (L x K): O(L K) per layer
  instead of self-attention's O(L^2). Only the experts leave the encoder; the target attention downstream
  reads K states instead of L, so scoring 120 candidates no longer grows with the history either.
- **Interest memory retrieval.** The experts do not start from K fixed vectors: each expert's query (a
  projection of the history's masked mean) selects ``topk`` of ``memory_keys`` ^ 2 slots of a learnable
  memory bank by product keys (Lample et al. 2019: two half-key tables, top-k of each, top-k of their
  k x k sums), and the softmax-weighted sum of their values is added to the expert's own vector. The bank can
  grow (more interest prototypes) while each user reads ``topk`` slots per expert.

Returns what the BERT encoder returns, token states [B, 1 + K, d] with the [USER] state first and a mask of
ones, so the foundation's target attention, tower and adapters are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    """Multi-head attention of queries [B, Q, d] over keys [B, K, d] (scaled dot product, optional key mask)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, nq, d = x.shape
        h = self.heads
        q = self.q(x).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, nq, d))


class _Block(nn.Module):
    """Pre-norm residual attention then feed-forward."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.norm_x, self.norm_c, self.norm_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm_x(x), self.norm_c(context), key_mask))
        return x + self.drop(self.ff(self.norm_f(x)))


class InterestMemory(nn.Module):
    """A product-key memory of ``n_keys`` ^ 2 interest prototypes; each query reads ``topk`` of them."""

    def __init__(self, d: int, n_keys: int, topk: int):
        super().__init__()
        if d % 2:
            raise ValueError(f"the interest memory splits queries in two halves: d_model ({d}) must be even")
        self.n_keys, self.topk = n_keys, min(topk, n_keys)
        self.keys = nn.Parameter(torch.empty(2, n_keys, d // 2))
        self.values = nn.Embedding(n_keys * n_keys, d)
        nn.init.normal_(self.keys, std=1.0 / math.sqrt(d // 2))
        nn.init.normal_(self.values.weight, std=0.02)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """query [..., d] -> the softmax-weighted sum of the values of its top-k slots [..., d]."""
        shape = query.shape
        q = query.reshape(-1, 2, shape[-1] // 2)
        s1 = q[:, 0] @ self.keys[0].T                      # [N, n_keys]
        s2 = q[:, 1] @ self.keys[1].T
        v1, i1 = s1.topk(self.topk, dim=-1)                 # the best half-keys of each side
        v2, i2 = s2.topk(self.topk, dim=-1)
        pair = (v1[:, :, None] + v2[:, None, :]).flatten(1)  # [N, k*k] candidate slots
        best, at = pair.topk(self.topk, dim=-1)
        slot = i1.gather(1, at // self.topk) * self.n_keys + i2.gather(1, at % self.topk)
        w = best.softmax(-1)
        return (w[..., None] * self.values(slot)).sum(-2).reshape(shape)


class ElasticEncoder(nn.Module):
    """[USER] + K interest experts from a history of L items in O(L K) (module docstring)."""

    def __init__(self, d: int, *, layers: int, heads: int, ff: int, seq_len: int, interests: int, memory_keys: int,
                 topk: int, dropout: float = 0.0):
        super().__init__()
        self.interests = interests
        self.position = nn.Embedding(seq_len, d)
        self.experts = nn.Parameter(torch.empty(1 + interests, d))      # the [USER] token and the K experts
        self.expert_query = nn.Linear(d, (1 + interests) * d)
        self.memory = InterestMemory(d, memory_keys, topk) if memory_keys > 0 else None
        self.dispatch = nn.ModuleList([_Block(d, heads, ff, dropout) for _ in range(layers)])
        self.combine = nn.ModuleList([_Block(d, heads, ff, dropout) for _ in range(layers - 1)])
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.experts, std=0.02)

    def forward(self, hist_emb: torch.Tensor, hist_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, length, d = hist_emb.shape
        mask = hist_mask.bool()
        # every row keeps one key: an empty history attends to a zero vector instead of nothing (NaN)
        empty = ~mask.any(dim=1)
        mask = mask | (empty[:, None] & (torch.arange(length, device=mask.device) == 0))
        x = hist_emb + self.position(torch.arange(length, device=hist_emb.device))
        x = x * mask[..., None]
        pooled = x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        experts = self.experts.expand(b, -1, -1)
        if self.memory is not None:
            experts = experts + self.memory(self.expert_query(pooled).view(b, 1 + self.interests, d))
        for j, block in enumerate(self.dispatch):
            experts = block(experts, x, mask)                  # the experts read the history: K x L
            if j < len(self.combine):
                x = self.combine[j](x, experts)                 # the history reads the experts back: L x K
        states = self.norm(experts)
        return states, torch.ones(b, 1 + self.interests, dtype=torch.bool, device=hist_emb.device)
