"""The tensor contract between data and models.

Every model in `foundation/` and `recmodels/` consumes a *batch*: a dict of
tensors with the keys below. The data layer (`recdata.examples`)
builds it from a canonical dataset; an edge device builds it from its own
logs. Raw ids go in; hashing and bucketing happen inside the model, so an
exported model is self-contained.

B = examples, L = sequence length (schema.SEQ_LEN = 50), P = profile fields,
F = len(ITEM_FIELDS), T = len(TASKS).
"""

from __future__ import annotations

ITEM_FIELDS = ("video_id", "author_id", "category_level_one", "category_level_two",
               "upload_type", "duration")
"""Item feature order in ``item`` and ``hist_items`` (duration in raw ms)."""
CATEGORICAL_ITEM_FIELDS = tuple(f for f in ITEM_FIELDS if f != "duration")
"""Item fields embedded by (bounded) id; ``duration`` is bucketized instead."""

TASKS = ("effective_view", "long_view", "like", "follow", "forward", "comment")
"""Label order in ``labels``; effective_view is the primary task."""

CONTEXT_FIELDS = ("hour", "weekday")
CONTEXT_VOCAB = {"hour": 24, "weekday": 7}

BATCH_KEYS = {
    "user_profile": "int64 [B, P]: profile values in the order of the model config's user_fields",
    "hist_items": "int64 [B, L, F]: the last L effective views before the request, left-padded with 0",
    "hist_mask": "bool [B, L]: True where hist_items holds a real view",
    "item": "int64 [B, F]: the target (candidate) item",
    "context": "int64 [B, 2]: hour of day (0-23), weekday (0-6) of the request",
    "labels": "float32 [B, T]: 1/0 per task, -1 where not observed (masked out of the loss)",
}

OPTIONAL_KEYS = {
    "user_id": "int64 [B]: who the example belongs to; used for GAUC and, in a model stacking several "
               "users' adapters, to route each example to its user's adapter slot (foundation.adapters). "
               "Models ignore it otherwise.",
}
"""Keys a batch may carry; consumers must not require them."""

FUNNEL_LEVELS = {"random": 0, "prerank_neg": 1, "coarse_neg": 2, "rank_neg": 3, "rerank_neg": 3,
                 "rank_pos": 4, "rerank_pos": 4, "realshow": 5, "click": 6}
"""How far an item of a request's pool got in the funnel (RecFlow's FS-LTR order: click > realshow >
rerank/rank_pos > rerank/rank_neg > coarse_neg > prerank_neg > random): what stages learn from."""
