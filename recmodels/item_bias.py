"""Shared item-side logit offsets keyed by item attributes (FedPA option ``item-bias-fields``).

What a frozen foundation misses on real logs is largely *item-side base rates*: how often the
private population clicks a category or an upload type, which differs from how the open users, on
whom the foundation was pre-trained, did (KuaiSAR-R, 3 seeds: FedPA with per-user offsets goes from
0.700 to 0.710 test AUC on MRFF's protocol with these tables, and from 0.586 to 0.607 GAUC on
FedPA's chronological one). Per-user adapters cannot learn them (a user sees a handful of rows per
category), so they are shared: one table per item field, ``[rows of the field, tasks]``, added to
the logits.

Each table is aggregated *per row*, over the users whose training rows read that row (as
item-embedding updates are in federated recommenders such as PFedRec and FedNCF): a category a
user never saw gets no gradient and no count from that user, so a rare category is the average of
the few users who saw it instead of being diluted by everyone else. The rows a user reads are
what the user contributes to the row counts (`touched_rows`), so without secure aggregation the
server learns which categories a one-user node saw; with it, only per-row sums.

Rows follow the foundation's own embedding tables (`foundation.model.bounded_rows`: the id when it
fits, a hash otherwise), so a field means the same rows here as in the foundation. A user's merged
model carries its tables in `WithItemBias` (what `fedpa export` traces). Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedpa.foundation.batch import ITEM_FIELDS
from fedpa.foundation.config import CATEGORICAL_ITEM_FIELDS, ConfigError, FoundationConfig
from fedpa.foundation.model import FoundationModel, FoundationOutput, bounded_rows

PREFIX = "item_bias."
"""Shared entry names: ``item_bias.<field>``."""

MISSING_ITEMS = ("this model has item-side offsets (item-bias-fields) and needs the rows' item features; the rows "
                 "were cached without them (rebuild the feature cache)")

PER_ROW = "per-row"
"""The aggregation group of these entries (`common.aggregation`): averaged per row over its readers."""


class ItemBias(nn.Module):
    """Σ over ``fields`` of table_f[row of the item's f value]: logit offsets [..., n_out], zero at init."""

    def __init__(self, config: FoundationConfig, fields: Sequence[str], n_out: int):
        super().__init__()
        fields = list(dict.fromkeys(fields))
        bad = [f for f in fields if f not in CATEGORICAL_ITEM_FIELDS]
        if bad or not fields:
            raise ConfigError(f"item-bias fields must be categorical item fields "
                              f"({', '.join(CATEGORICAL_ITEM_FIELDS)}), "
                              f"got {', '.join(bad) if bad else 'none'}")
        self.fields = fields
        self.columns = [ITEM_FIELDS.index(f) for f in fields]
        self.sizes = [config.table_size(f) for f in fields]
        self.hash_all = [config.hashes_all(f) for f in fields]
        self.tables = nn.ParameterDict({f: nn.Parameter(torch.zeros(n, n_out)) for f, n in zip(fields, self.sizes)})

    def rows(self, items: torch.Tensor) -> list[torch.Tensor]:
        """Per field, the table row each item reads (``items``: [..., len(ITEM_FIELDS)] raw values)."""
        return [bounded_rows(items[..., c], n, h) for c, n, h in zip(self.columns, self.sizes, self.hash_all)]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        out = None
        for f, r in zip(self.fields, self.rows(items)):
            v = self.tables[f][r]
            out = v if out is None else out + v
        return out

    def touched_rows(self, items: torch.Tensor) -> dict[str, np.ndarray]:
        """Shared entry name -> [rows] float32, 1 where these items read the row: one user's row counts."""
        out = {}
        for f, n, r in zip(self.fields, self.sizes, self.rows(items)):
            seen = np.zeros(n, np.float32)
            seen[r.reshape(-1).numpy()] = 1.0
            out[PREFIX + f] = seen
        return out


class WithItemBias(nn.Module):
    """A dense (merged) foundation model plus item-side offsets, called like the foundation:
    ``model(**batch)`` -> FoundationOutput whose logits include the offsets of ``batch['item']`` (for
    scoring: labels are ignored, no loss)."""

    def __init__(self, model: FoundationModel, item_bias: ItemBias):
        super().__init__()
        self.model = model
        self.item_bias = item_bias

    def forward(self, user_profile: torch.Tensor, item: torch.Tensor, **batch) -> FoundationOutput:
        out = self.model(user_profile=user_profile, item=item, **{k: v for k, v in batch.items() if k != "labels"})
        return FoundationOutput(logits=out.logits + self.item_bias(item), features=out.features,
                                user_embedding=out.user_embedding, item_embedding=out.item_embedding)
