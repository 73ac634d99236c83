"""The foundation's plain tensor functions: how raw ids find their table rows, the loss every model here trains
with, and the checks of a batch's routing (group rows, domain codes). Torch only (no transformers), so that a
device's compiled model (`recmodels.compiled`) and the item-side tables read rows exactly as the foundation does
without importing its modelling stack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import RoutingError

_HASH_MULT = 0x5BD1E995  # < 2^31, so (x mod 2^32) * _HASH_MULT < 2^63 never overflows int64


def hash_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Map int64 ids (any value, negatives included) to [0, n) with a multiplicative hash.

    h = ((id mod 2^32) * M  div 2^16) mod n: the product's middle bits mix all input
    bits. Only mod / mul / floor-div on non-negative int64, so it exports to ONNX.
    """
    x = torch.remainder(ids, 1 << 32) * _HASH_MULT
    return torch.remainder(torch.div(x, 1 << 16, rounding_mode="floor"), n)


def bounded_rows(ids: torch.Tensor, n: int, hash_all: bool) -> torch.Tensor:
    """The row of a table of ``n`` rows that each raw id reads: the id itself when it fits (unless the
    field hashes all ids), else its hash."""
    hashed = hash_ids(ids, n)
    if hash_all:
        return hashed
    return torch.where((ids >= 0) & (ids < n), ids, hashed)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over observed labels (>= 0); 0 (with grad) if none observed."""
    observed = labels >= 0
    per = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(logits.dtype), reduction="none")
    return (per * observed).sum() / observed.sum().clamp(min=1)


def masked_softmax_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sampled softmax over rows: per task column, each observed positive (label 1) against every observed
    negative (label 0) of the same rows, -log(e^s_p / (e^s_p + sum_n e^s_n)), averaged over the positives; 0 (with
    grad) if none. Beside binary cross-entropy it trains the order of a user's items, not only each row's odds (the
    sampled softmax of the item-recommendation literature: a hard negative weighs more than an easy one)."""
    positive = labels >= 0.5
    negative = (labels >= 0) & ~positive
    # a finite fill, not -inf: a column without negatives must give 0 and a finite gradient (logsumexp of all -inf
    # back-propagates NaN)
    fill = torch.finfo(logits.dtype).min / 4
    lse_negative = torch.logsumexp(torch.where(negative, logits, torch.full_like(logits, fill)), dim=0)
    per = torch.logaddexp(logits, lse_negative) - logits
    return (per * positive).sum() / positive.sum().clamp(min=1)


def check_group_rows(group_index: torch.Tensor, attributes: Sequence[str], vocab: Mapping[str, int]) -> None:
    """Refuse a group row [B, G] outside the values the group adapters were built for (column j: attributes[j])."""
    for j, a in enumerate(attributes):
        col, v = group_index[:, j], vocab[a]
        bad = (col < 0) | (col >= v)
        if bool(bad.any()):
            raise RoutingError(f"profile field '{a}' has value {int(col[bad][0])} outside the "
                               f"{v} values the group adapters were built for (0..{v - 1})")


def check_domains(domain: torch.Tensor, values: int) -> torch.Tensor:
    """Domain codes as long, refusing one outside the 0..values-1 the domain path was built for."""
    domain = domain.long()
    bad = (domain < 0) | (domain >= values)
    if bool(bad.any()):
        raise RoutingError(f"domain code {int(domain[bad][0])} is outside the {values} codes the domain-specific "
                           f"path was built for (0..{values - 1})")
    return domain
