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

Rows follow the foundation's own embedding tables (`foundation.functional.bounded_rows`: the id when it
fits, a hash otherwise), so a field means the same rows here as in the foundation. A user's merged
model carries its tables in `WithItemBias` (what `fedpa export` traces). Plain PyTorch.

*Item representations* (``embedding_dim`` > 0, FedPA option ``item-embedding-dim``): beside the offsets,
shared item embeddings E keyed by the video id (aggregated per row like the tables) and a private user
vector p (one per user slot, never leaving the client) add p·E[item] to the primary task's logit: the
collaborative signal of federated matrix factorisation (FedMF, PFedRec) inside FedPA. E starts small and
random, p at zero, so an untrained model scores exactly as the foundation does.

*Item popularity* (``popularity``, FedPA option ``item-popularity``): how many clients clicked each item, a
*tally* the server keeps from the round's sums (every client adds 1 to each item row of its training clicks;
`common.aggregation`), enters the primary logit as w·log(1 + clicks) with a shared learned weight w (zero at
init). A per-row average cannot learn popularity: it normalises away how many users read a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedpa.foundation.batch import CATEGORICAL_ITEM_FIELDS, ITEM_FIELDS
from fedpa.foundation.errors import ConfigError
from fedpa.foundation.functional import bounded_rows

if TYPE_CHECKING:   # transformers is imported where a foundation is built or a merged model scored, not here
    from fedpa.foundation.config import FoundationConfig
    from fedpa.foundation.model import FoundationModel, FoundationOutput

PREFIX = "item_bias."
"""Shared entry names: ``item_bias.<field>``; the item embeddings ``item_bias.embedding``."""
EMBEDDING = PREFIX + "embedding"
USER_VECTOR = PREFIX + "user"
"""The private entry of a user's vector (per user slot)."""
EMBEDDING_FIELD = "video_id"
POPULARITY_SCALE = 30.0
"""The popularity weight is stored divided by this, so that it steps this much faster than the adapters: one
scalar per task, shared by everyone, with a clear optimum and nothing to overfit (Adam's step is the learning
rate whatever the gradient's size)."""

# the click counts at which the tally's score may step (`popularity_term`): doubling, so each step covers as
# many orders of magnitude of popularity as the one before it
POPULARITY_STEPS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def popularity_term(clicks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The click tally's logit [..., n_out] for items with ``clicks`` [...]: w * log(1 + clicks) with ``weight``
    [n_out]; with ``weight`` [1 + len(POPULARITY_STEPS), n_out] (``popularity="steps"``) also w_k * [clicks >= c_k]
    for every step c_k, a learned shape of the count. (Noise under central DP can leave a tally slightly negative:
    clamped.)"""
    c = clicks.clamp(min=0)
    log_count = torch.log1p(c).unsqueeze(-1)
    if weight.dim() == 1:
        return log_count * (POPULARITY_SCALE * weight)
    # made on the host and moved: under `grad`, torch.tensor(..., device=) off the CPU is refused as mutating a
    # captured tensor
    steps = torch.tensor(POPULARITY_STEPS, dtype=c.dtype).to(c.device)
    basis = torch.cat([log_count, (c.unsqueeze(-1) >= steps).to(c.dtype)], dim=-1)
    return basis.to(weight.dtype) @ (POPULARITY_SCALE * weight)


def newton_step_shares(fields: Sequence[str]) -> dict[str, float]:
    """Each offset table's share of one joint Newton step (shares sum to 1). Every row's logit is a sum of one
    offset per table and the server steps all tables at once on the same residuals; with table j's curvature
    divided by its share a_j, the steps bound the joint Hessian ((Σ x_j)^2 <= Σ x_j^2 / a_j) and cannot
    overshoot. The video-id table takes half (it carries each item's own signal, read by few users); the other
    tables share the other half equally. (Equal shares lost 0.010 validation HR@10 under PFedRec's protocol:
    docs/results.md, "Choosing FedPA's default".)"""
    m = len(fields)
    if m > 1 and EMBEDDING_FIELD in fields:
        return {f: 0.5 if f == EMBEDDING_FIELD else 0.5 / (m - 1) for f in fields}
    return {f: 1.0 / m for f in fields}


@torch.no_grad()
def newton_row_statistics(item_bias: ItemBias, logits: torch.Tensor, labels: torch.Tensor, items: torch.Tensor,
                          rows: Sequence[torch.Tensor] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]]:
    """What one user sends for each offset table under item-bias-update newton: per row it read (sorted), minus
    the sum of p - y per task [k, T] (observed labels only) and the sum over its rows and tasks of p(1 - p) [k]
    (one curvature per row: summed over the tasks, so each task's step is a lower bound of its own), divided by
    the table's share of the joint step (`newton_step_shares`). ``rows``: `ItemBias.rows` of ``items`` when the
    caller has them."""
    rows = item_bias.rows(items) if rows is None else rows
    per_user = users_newton_row_statistics(item_bias, logits, labels, rows,
                                           torch.zeros(len(logits), dtype=torch.long, device=logits.device), 1)
    return {name: (u_rows[0], g[0], h[0]) for name, (u_rows, g, h) in per_user.items()}


@torch.no_grad()
def users_newton_row_statistics(item_bias: ItemBias, logits: torch.Tensor, labels: torch.Tensor,
                                rows: Sequence[torch.Tensor], owner: torch.Tensor,
                                n_users: int) -> dict[str, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]]:
    """`newton_row_statistics` of several users at once: ``logits`` [n, T], ``labels`` [n, T] and ``rows``
    (`ItemBias.rows` of the rows' items, [n] each) of every user's rows concatenated, ``owner`` [n] each row's
    user in [0, n_users). Per table, each user's (rows, -Σ(p - y), Σ p(1 - p)) in a list by user; sums run over a
    user's rows in their order, so each user's figures are those of a call with its rows alone."""
    y = labels.double()
    seen = (y >= 0).double()
    p = torch.sigmoid(logits.double())
    r = (p - y.clamp(min=0)) * seen
    w = (p * (1 - p) * seen).sum(-1)
    shares = newton_step_shares(item_bias.fields)
    out = {}
    for name, table_rows in zip(item_bias.table_names, rows):
        if name == EMBEDDING:
            continue
        scale = 1.0 / shares[name[len(PREFIX):]]
        flat = table_rows.reshape(-1).to(owner.device)
        span = int(flat.max()) + 1 if len(flat) else 1
        codes, inv = torch.unique(owner * span + flat, return_inverse=True)   # sorted: by user, then by row
        g = r.new_zeros(len(codes), r.shape[1]).index_add_(0, inv, r)
        h = w.new_zeros(len(codes)).index_add_(0, inv, w) * scale
        # each user's part as a view of one array: a tensor's numpy() per user and table cost more than the sums
        cuts = torch.bincount(codes // span, minlength=n_users).cumsum(0)[:-1].cpu().numpy()
        out[name] = tuple(np.split(x.cpu().numpy(), cuts) for x in (codes % span, (-g).float(), h.float()))
    return out


MISSING_ITEMS = ("this model has item-side offsets (item-bias-fields) and needs the rows' item features; the rows "
                 "were cached without them (rebuild the feature cache)")

PER_ROW = "per-row"
"""The aggregation group of these entries (`common.aggregation`): averaged per row over its readers."""

TALLY = "tally"
"""The aggregation group of the click tally: the round's sum over clients (scaled to the population)."""
CLICKS = PREFIX + "clicks"
POPULARITY = PREFIX + "popularity"


class ItemBias(nn.Module):
    """Σ over ``fields`` of table_f[row of the item's f value] (logit offsets [..., n_out], zero at init), plus
    with ``embedding_dim`` > 0 the user vector times the item's embedding on the first output."""

    def __init__(self, config: FoundationConfig, fields: Sequence[str], n_out: int, *, embedding_dim: int = 0,
                 user_slots: int = 1, seed: int = 0, max_rows: int = 0, popularity: bool | str = False):
        """``max_rows`` > 0 bounds the tables keyed by the video id (ids hashed into that many rows), so that
        what a client uploads, masked under secure aggregation, stays small. ``popularity``: score the click
        tally (True: w * log(1 + clicks); "steps": with learned steps too, `popularity_term`)."""
        super().__init__()
        fields = list(dict.fromkeys(fields))
        bad = [f for f in fields if f not in CATEGORICAL_ITEM_FIELDS]
        if bad or not (fields or embedding_dim > 0 or popularity):
            raise ConfigError(f"item-bias fields must be categorical item fields "
                              f"({', '.join(CATEGORICAL_ITEM_FIELDS)}), "
                              f"got {', '.join(bad) if bad else 'none'}")
        self.fields = fields
        self.columns = [ITEM_FIELDS.index(f) for f in fields]
        def size(f: str) -> int:
            n = config.table_size(f)
            return min(n, int(max_rows)) if max_rows and f == EMBEDDING_FIELD else n

        def hash_all(f: str) -> bool:
            return config.hashes_all(f) or size(f) < config.table_size(f)

        self.sizes = [size(f) for f in fields]
        self.hash_all = [hash_all(f) for f in fields]
        self.tables = nn.ParameterDict({f: nn.Parameter(torch.zeros(n, n_out)) for f, n in zip(fields, self.sizes)})
        self.n_out = int(n_out)
        self.embedding_dim = int(embedding_dim)
        self.popularity = bool(popularity)
        if self.embedding_dim > 0 or self.popularity:   # the video-id rows both read
            self.emb_column = ITEM_FIELDS.index(EMBEDDING_FIELD)
            self.emb_size = size(EMBEDDING_FIELD)
            self.emb_hash_all = hash_all(EMBEDDING_FIELD)
        if self.popularity:
            self.clicks = nn.Parameter(torch.zeros(self.emb_size), requires_grad=False)
            shape = (1 + len(POPULARITY_STEPS), self.n_out) if popularity == "steps" else (self.n_out,)
            self.popularity_weight = nn.Parameter(torch.zeros(shape))
        if self.embedding_dim > 0:
            g = torch.Generator().manual_seed(int(seed) + 7_777)
            scale = 0.1 / self.embedding_dim ** 0.5
            self.embedding = nn.Parameter(scale * torch.randn(self.emb_size, self.embedding_dim, generator=g))
            self.user = nn.Parameter(torch.zeros(int(user_slots), self.embedding_dim))

    @property
    def table_names(self) -> list[str]:
        """Every per-row entry: the offset tables, then the embeddings."""
        return [PREFIX + f for f in self.fields] + ([EMBEDDING] if self.embedding_dim else [])

    @property
    def reads_video_rows(self) -> bool:
        return bool(self.embedding_dim or self.popularity)

    def rows(self, items: torch.Tensor) -> list[torch.Tensor]:
        """Per field, the table row each item reads (``items``: [..., len(ITEM_FIELDS)] raw values); the
        video-id rows of the embeddings and the click tally last."""
        out = [bounded_rows(items[..., c], n, h) for c, n, h in zip(self.columns, self.sizes, self.hash_all)]
        if self.reads_video_rows:
            out.append(bounded_rows(items[..., self.emb_column], self.emb_size, self.emb_hash_all))
        return out

    def click_rows(self, items: torch.Tensor, labels: torch.Tensor,
                   video_rows: torch.Tensor | None = None) -> np.ndarray:
        """The video-id rows of a user's positive training rows (``labels``: [n, tasks], primary first): what
        it adds to the click tally. ``video_rows``: the items' video-id rows (``rows(items)[-1]``) when the
        caller has them."""
        pos = labels[:, 0] == 1
        if not bool(pos.any()):
            return np.zeros(0, np.int64)
        read = self.rows(items[pos])[-1] if video_rows is None else video_rows[pos]
        return np.unique(read.reshape(-1).numpy())

    def forward(self, items: torch.Tensor, slot: torch.Tensor | int = 0) -> torch.Tensor:
        rows = self.rows(items)
        out = None
        for f, r in zip(self.fields, rows):
            v = self.tables[f][r]
            out = v if out is None else out + v
        if self.popularity:
            pop = popularity_term(self.clicks[rows[-1]], self.popularity_weight)
            out = pop if out is None else out + pop
        if self.embedding_dim:
            u = self.user[slot] if isinstance(slot, torch.Tensor) else self.user[int(slot)]
            dot = (self.embedding[rows[-1]] * u).sum(-1)
            if out is None:
                out = dot.new_zeros(*dot.shape, self.n_out)
            out = torch.cat([out[..., :1] + dot.unsqueeze(-1), out[..., 1:]], dim=-1)
        return out

    def touched_rows(self, items: torch.Tensor) -> dict[str, np.ndarray]:
        """Shared entry name -> [rows] float32, 1 where these items read the row: one user's row counts."""
        out = {}
        sizes = self.sizes + ([self.emb_size] if self.embedding_dim else [])
        for name, n, r in zip(self.table_names, sizes, self.rows(items)):
            seen = np.zeros(n, np.float32)
            seen[r.reshape(-1).numpy()] = 1.0
            out[name] = seen
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
        from fedpa.foundation.model import FoundationOutput

        out = self.model(user_profile=user_profile, item=item, **{k: v for k, v in batch.items() if k != "labels"})
        return FoundationOutput(logits=out.logits + self.item_bias(item), features=out.features,
                                user_embedding=out.user_embedding, item_embedding=out.item_embedding)
