"""Configuration of the foundation recommender.

Public API::

    FoundationConfig(transformers.PretrainedConfig)     # arch="transformer" (default) or "mlp"
    FoundationConfig.from_dataset_vocab(vocab: dict[str, int], user_fields: list[str], **overrides)
    ConfigError(FedpaError)                             # bad/missing configuration values

A config is a plain JSON-able dict (``config.json`` next to ``model.safetensors``),
so a model is rebuilt offline from a directory or from a dataset manifest's
``vocab`` alone: nothing is ever fetched from a hub.

Vocabulary sizes come from the dataset (``manifest.json["vocab"]``: max id + 1 per
column). Embedding tables are bounded: a field whose vocabulary fits its bucket
cap gets one row per id (ids outside the known range are hashed into the table,
so a model never fails on an id it has not seen); a field whose vocabulary is
larger than the cap (RecFlow's ~9M videos) is hashed entirely into ``cap`` rows.
The hash and the duration bucket boundaries are computed *inside* the model
(see ``foundation.model``), so an exported model takes raw ids.

Field order conventions are those of ``foundation.batch`` (ITEM_FIELDS, TASKS,
CONTEXT_FIELDS); ``user_fields`` fixes the column order of ``user_profile``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PretrainedConfig

from .batch import CATEGORICAL_ITEM_FIELDS, CONTEXT_FIELDS, ITEM_FIELDS, TASKS  # noqa: F401
from .errors import ConfigError, FedpaError  # noqa: F401  (ConfigError: imported from here too)

ARCHS = ("transformer", "mlp")
USER_ENCODERS = ("bert", "elastic")


class FoundationConfig(PretrainedConfig):
    """Hyper-parameters and vocabularies of a `FoundationModel`.

    Main fields (all JSON-serialisable):

    - ``arch``: ``"transformer"`` (sequence user encoder + item encoder + multi-task
      tower) or ``"mlp"`` (FedPA's released foundation: concatenated field
      embeddings -> MLP -> logit(s)).
    - ``user_fields`` / ``user_vocab``: profile columns (order of ``user_profile``) and
      their vocabulary sizes.
    - ``item_vocab``: vocabulary size per categorical item field (``video_id``,
      ``author_id``, ``category_level_one``, ``category_level_two``, ``upload_type``).
    - ``tasks``: predicted labels, a subset of ``batch.TASKS`` in that order; the first
      is the primary one (``effective_view``).
    - bucket caps: ``video_buckets`` (2^17), ``author_buckets`` (2^15), ``field_buckets``
      (2^12, every other categorical field).
    - ``duration_buckets``: number of log-spaced duration buckets (boundaries fixed
      between ``duration_min_ms`` and ``duration_max_ms``; 0 ms = unknown = bucket 0).
    - transformer arch: ``d_model``, ``n_layers``, ``n_heads``, ``ff_dim``, ``seq_len``,
      ``dropout`` (hidden dropout in the user encoder; default 0: pre-training is
      ~1 epoch over many open users, and CPU dropout halves throughput; attention
      dropout is always 0), ``id_dim`` (video id embedding width; author gets half),
      ``field_dim`` (every other field), ``tower_hidden``; ``user_encoder``: ``bert`` (self-attention over
      the last ``seq_len`` views, O(L^2)) or ``elastic`` (ELASTIC, foundation/elastic.py: ``interests``
      experts by linear dispatcher attention, O(L K), and a memory of ``memory_keys``^2 interest prototypes
      of which each expert reads ``memory_topk``; 0 keys: no memory). ``graph_expansion``: empty history
      slots filled from the interest graph pre-training built (recdata.interest_graph; 0 = none).
    - mlp arch: ``field_dim`` for every field and ``mlp_hidden``.
    """

    model_type = "fedpa_foundation"

    arch: str = "transformer"
    user_fields: list | None = None
    user_vocab: dict | None = None
    item_vocab: dict | None = None
    tasks: list | None = None
    video_buckets: int = 1 << 17
    author_buckets: int = 1 << 15
    field_buckets: int = 1 << 12
    duration_buckets: int = 24
    duration_min_ms: float = 1000.0
    duration_max_ms: float = 3_600_000.0
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    ff_dim: int = 64
    seq_len: int = 50
    user_encoder: str = "bert"
    interests: int = 8
    memory_keys: int = 16
    memory_topk: int = 4
    graph_expansion: int = 0
    dropout: float = 0.0
    id_dim: int = 32
    field_dim: int = 8
    tower_hidden: list | None = None
    mlp_hidden: list | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        # JSON turns tuples into lists; normalise so that a reloaded config compares equal.
        self.user_fields = [str(f) for f in (self.user_fields or [])]
        self.user_vocab = {str(k): int(v) for k, v in (self.user_vocab or {}).items()}
        self.item_vocab = {str(k): int(v) for k, v in (self.item_vocab or {}).items()}
        if self.tasks is None:
            self.tasks = list(TASKS) if self.arch == "transformer" else [TASKS[0]]
        self.tasks = [str(t) for t in self.tasks]
        self.tower_hidden = [int(h) for h in (self.tower_hidden or [128, 64])]
        self.mlp_hidden = [int(h) for h in (self.mlp_hidden or [32, 8])]
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------ helpers

    @classmethod
    def from_dataset_vocab(cls, vocab: Mapping[str, int], user_fields: Sequence[str],
                           **overrides: Any) -> FoundationConfig:
        """Build a config from a dataset manifest's ``vocab`` (column -> max id + 1).

        ``user_fields`` picks the profile columns (their order is the order of
        ``batch["user_profile"]``). Raises ConfigError naming any field missing
        from ``vocab``.
        """
        missing = [f for f in list(user_fields) + list(CATEGORICAL_ITEM_FIELDS) if f not in vocab]
        if missing:
            raise ConfigError(
                f"dataset vocab has no size for field(s) {', '.join(missing)} "
                f"(known: {', '.join(sorted(vocab)) or 'none'})"
            )
        return cls(
            user_fields=list(user_fields),
            user_vocab={f: max(1, int(vocab[f])) for f in user_fields},
            item_vocab={f: max(1, int(vocab[f])) for f in CATEGORICAL_ITEM_FIELDS},
            **overrides,
        )

    def validate(self) -> None:
        """Raise ConfigError if the config cannot build a model (called by the model)."""
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        missing_u = [f for f in self.user_fields if f not in self.user_vocab]
        if missing_u:
            raise ConfigError(f"user_vocab has no size for profile field(s) {', '.join(missing_u)}")
        missing_i = [f for f in CATEGORICAL_ITEM_FIELDS if f not in self.item_vocab]
        if missing_i:
            raise ConfigError(f"item_vocab has no size for item field(s) {', '.join(missing_i)}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if self.user_encoder not in USER_ENCODERS:
            raise ConfigError(f"user_encoder must be one of {USER_ENCODERS}, got {self.user_encoder!r}")
        if self.user_encoder == "elastic" and (self.interests < 1 or self.memory_keys < 0 or self.memory_topk < 1
                                               or self.d_model % 2):
            raise ConfigError("the elastic user encoder needs interests >= 1, memory_keys >= 0, memory_topk >= 1 "
                              f"and an even d_model (got {self.interests}, {self.memory_keys}, {self.memory_topk}, "
                              f"{self.d_model})")
        if self.graph_expansion < 0:
            raise ConfigError(f"graph_expansion must be >= 0, got {self.graph_expansion}")
        if self.arch == "transformer" and self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("video_buckets", "author_buckets", "field_buckets", "duration_buckets"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1")

    def table_size(self, field: str) -> int:
        """Rows of the embedding table for a categorical field (item, profile or context)."""
        if field in CONTEXT_FIELDS:
            from .batch import CONTEXT_VOCAB

            return CONTEXT_VOCAB[field]
        vocab = self.item_vocab.get(field, self.user_vocab.get(field))
        if vocab is None:
            raise ConfigError(f"no vocabulary size for field {field!r}")
        cap = {"video_id": self.video_buckets, "author_id": self.author_buckets}.get(field, self.field_buckets)
        return max(1, min(int(vocab), int(cap)))

    def hashes_all(self, field: str) -> bool:
        """True if the field's vocabulary exceeds its cap, so every id is hashed."""
        vocab = self.item_vocab.get(field, self.user_vocab.get(field, 0))
        return int(vocab) > self.table_size(field)

    @property
    def primary_task(self) -> str:
        return self.tasks[0]
