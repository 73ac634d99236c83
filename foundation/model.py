"""The foundation recommender: a `transformers` model (user encoder over the behaviour sequence, item
encoder, prediction tower) built locally from a `FoundationConfig`, never downloaded.

Design notes: docs/design/foundation-model.md
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .batch import CONTEXT_FIELDS, ITEM_FIELDS, TASKS
from .checkpoint import CheckpointError, seal_safetensors, verify_safetensors
from .config import CATEGORICAL_ITEM_FIELDS, ConfigError, FoundationConfig
from .elastic import ElasticEncoder, InterestMemory
from .errors import FedpaError
from .functional import bounded_rows, hash_ids, masked_bce  # noqa: F401  (their home; re-exported)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

class BoundedEmbedding(nn.Module):
    """An embedding table of ``n`` rows addressed by raw ids (see module docstring)."""

    def __init__(self, n: int, dim: int, hash_all: bool):
        super().__init__()
        self.n, self.hash_all = int(n), bool(hash_all)
        self.table = nn.Embedding(self.n, dim)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return bounded_rows(ids, self.n, self.hash_all)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(self.rows(ids))


class ItemEncoder(nn.Module):
    """Embeds ``[..., F]`` item rows (batch.ITEM_FIELDS order) into ``[..., out_dim]``."""

    def __init__(self, config: FoundationConfig, dims: dict[str, int], project_to: int | None):
        super().__init__()
        self.fields = nn.ModuleDict({
            f: BoundedEmbedding(config.table_size(f), dims[f], config.hashes_all(f)) for f in CATEGORICAL_ITEM_FIELDS
        })
        self.field_index = {f: ITEM_FIELDS.index(f) for f in CATEGORICAL_ITEM_FIELDS}
        self.duration_index = ITEM_FIELDS.index("duration")
        nb = int(config.duration_buckets)
        # Boundaries are a buffer (saved in the checkpoint) so that an exported model is self-contained.
        bounds = torch.logspace(math.log10(config.duration_min_ms), math.log10(config.duration_max_ms), max(nb - 2, 1))
        self.register_buffer("duration_boundaries", bounds, persistent=True)
        self.duration = nn.Embedding(nb, dims["duration"])
        width = sum(dims[f] for f in ITEM_FIELDS)
        self.proj = nn.Linear(width, project_to) if project_to else None
        self.norm = nn.LayerNorm(project_to) if project_to else None
        self.out_dim = project_to or width

    def duration_bucket(self, ms: torch.Tensor) -> torch.Tensor:
        # == torch.bucketize(ms, boundaries) + 1, written as a comparison count so that it exports to ONNX
        b = (ms.to(self.duration_boundaries.dtype).unsqueeze(-1) > self.duration_boundaries).sum(-1) + 1
        b = b.clamp(max=self.duration.num_embeddings - 1)
        return torch.where(ms > 0, b, torch.zeros_like(b))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        parts = [self.fields[f](items[..., i]) for f, i in self.field_index.items()]
        parts.append(self.duration(self.duration_bucket(items[..., self.duration_index])))
        x = torch.cat(parts, dim=-1)
        if self.proj is not None:
            x = self.norm(self.proj(x))
        return x


class Tower(nn.Module):
    """fc1 -> act -> fc2 -> act ... -> head. Hidden layers are the default adapter targets."""

    def __init__(self, in_dim: int, hidden: list[int], n_out: int):
        super().__init__()
        self.n_hidden = len(hidden)
        dims = [in_dim, *hidden]
        for i in range(len(hidden)):
            self.add_module(f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.act = nn.ReLU()
        self.head = nn.Linear(dims[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_hidden):
            x = self.act(getattr(self, f"fc{i + 1}")(x))
        return self.head(x)


class UserSequenceEncoder(nn.Module):
    """[USER] token + history items through a small BertModel; returns token states [B, 1+L, d]."""

    def __init__(self, config: FoundationConfig):
        super().__init__()
        d = config.d_model
        bert_cfg = BertConfig(
            vocab_size=1,  # inputs_embeds only; the one-row word table is never read
            hidden_size=d,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            intermediate_size=config.ff_dim,
            hidden_act="gelu",
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=0.0,  # dropout on [B, heads, L, L] costs more than the layer itself on CPU
            max_position_embeddings=config.seq_len + 1,
            type_vocab_size=1,
            initializer_range=config.initializer_range,
            pad_token_id=0,
            use_cache=False,
        )
        bert_cfg._attn_implementation = "sdpa"
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        self.user_token = nn.Parameter(torch.zeros(d))

    def forward(self, hist_emb: torch.Tensor, hist_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = hist_emb.shape[0]
        tokens = torch.cat([self.user_token.expand(b, 1, -1), hist_emb], dim=1)
        # The [USER] token is always attended to, so an empty history never yields an all-masked row.
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=hist_mask.device), hist_mask.bool()], dim=1)
        out = self.bert(inputs_embeds=tokens, attention_mask=mask.long()).last_hidden_state
        return out, mask


@dataclass
class FoundationOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    user_embedding: torch.Tensor | None = None
    item_embedding: torch.Tensor | None = None


class FoundationModel(PreTrainedModel):
    """The frozen-able foundation recommender (see module docstring)."""

    config_class = FoundationConfig
    base_model_prefix = "foundation"
    main_input_name = "item"
    _supports_sdpa = True

    def __init__(self, config: FoundationConfig):
        config.validate()
        super().__init__(config)
        fd = config.field_dim
        self.label_columns = [TASKS.index(t) for t in config.tasks]
        self.profile = nn.ModuleDict({
            f: BoundedEmbedding(config.table_size(f), fd, config.hashes_all(f)) for f in config.user_fields
        })
        if config.arch == "transformer":
            d = config.d_model
            dims = {f: fd for f in ITEM_FIELDS}
            dims.update(video_id=config.id_dim, author_id=max(fd, config.id_dim // 2))
            self.item_encoder = ItemEncoder(config, dims, project_to=d)
            self.user_encoder = (UserSequenceEncoder(config) if config.user_encoder == "bert" else ElasticEncoder(
                d, layers=config.n_layers, heads=config.n_heads, ff=config.ff_dim, seq_len=config.seq_len,
                interests=config.interests, memory_keys=config.memory_keys, topk=config.memory_topk,
                dropout=config.dropout))
            self.attn_query = nn.Linear(d, d, bias=False)
            self.context = nn.ModuleDict({f: nn.Embedding(config.table_size(f), fd) for f in CONTEXT_FIELDS})
            in_dim = 4 * d + fd * (len(config.user_fields) + len(CONTEXT_FIELDS))
            hidden = config.tower_hidden
        else:
            self.item_encoder = ItemEncoder(config, {f: fd for f in ITEM_FIELDS}, project_to=None)
            in_dim = fd * (len(config.user_fields) + len(ITEM_FIELDS))
            hidden = config.mlp_hidden
        self.tower = Tower(in_dim, hidden, len(config.tasks))
        # Runtime switch, not config: same function either way. Exporters (ONNX / tracing) turn it off
        # because torch.unique and the data-dependent branch do not trace.
        self.dedupe_histories = True
        self.post_init()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization functions skip tensors already loaded from a checkpoint.
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=0.05)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, UserSequenceEncoder):
            init.normal_(module.user_token, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ElasticEncoder):
            init.normal_(module.experts, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, InterestMemory):
            init.normal_(module.keys, mean=0.0, std=1.0 / math.sqrt(module.keys.shape[-1]))
        elif isinstance(module, ItemEncoder):
            c = self.config
            bounds = torch.logspace(math.log10(c.duration_min_ms), math.log10(c.duration_max_ms),
                                    max(int(c.duration_buckets) - 2, 1))
            init.copy_(module.duration_boundaries, bounds)

    # ------------------------------------------------------------------ forward

    def embed_profile(self, user_profile: torch.Tensor) -> torch.Tensor:
        if not self.config.user_fields:
            return user_profile.new_zeros((user_profile.shape[0], 0), dtype=torch.float32)
        return torch.cat([self.profile[f](user_profile[:, i]) for i, f in enumerate(self.config.user_fields)], dim=-1)

    def _encode_histories(self, hist_items: torch.Tensor, hist_mask: torch.Tensor):
        """Run the sequence encoder once per distinct (history, mask) row; gather back to [B, ...]."""
        b, length, nf = hist_items.shape
        if not self.dedupe_histories:
            states, full_mask = self.user_encoder(self.item_encoder(hist_items), hist_mask.bool())
            return states, full_mask, torch.arange(b, device=hist_items.device)
        key = torch.cat([hist_items.reshape(b, -1), hist_mask.reshape(b, -1).long()], dim=1)
        if b > 1 and bool((key == key[:1]).all()):
            uniq, inverse = key[:1], torch.zeros(b, dtype=torch.long, device=key.device)
        elif b > 1:
            uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        else:
            uniq, inverse = key, torch.zeros(1, dtype=torch.long, device=key.device)
        items = uniq[:, : length * nf].reshape(-1, length, nf)
        mask = uniq[:, length * nf:].bool()
        states, full_mask = self.user_encoder(self.item_encoder(items), mask)
        return states, full_mask, inverse

    def encode(
        self,
        user_profile: torch.Tensor,
        item: torch.Tensor,
        hist_items: torch.Tensor | None = None,
        hist_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        **ignored: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The tower's input (and the user / item embeddings): everything before the prediction tower.

        Adapters sit on the tower, so a client computes this once per example and trains on it."""
        if user_profile.shape[-1] != len(self.config.user_fields):
            raise ValueError(
                f"user_profile has {user_profile.shape[-1]} columns but the model expects "
                f"{len(self.config.user_fields)} ({', '.join(self.config.user_fields)})"
            )
        profile = self.embed_profile(user_profile)
        item_emb = self.item_encoder(item)
        user_emb = None
        if self.config.arch == "transformer":
            if hist_items is None or hist_mask is None or context is None:
                raise ValueError("the transformer foundation needs hist_items, hist_mask and context")
            states, mask, inverse = self._encode_histories(hist_items, hist_mask)
            d = states.shape[-1]
            # Target attention: per candidate, over the (distinct) history states it belongs to.
            q = self.attn_query(item_emb)                                    # [B, d]
            keys = states.index_select(0, inverse)                            # [B, 1+L, d]
            scores = torch.einsum("bd,bld->bl", q, keys) / math.sqrt(d)
            scores = scores.masked_fill(~mask.index_select(0, inverse), torch.finfo(scores.dtype).min)
            interest = torch.einsum("bl,bld->bd", scores.softmax(-1), keys)
            user_emb = keys[:, 0]
            ctx = torch.cat([self.context[f](context[:, i]) for i, f in enumerate(CONTEXT_FIELDS)], dim=-1)
            features = torch.cat([user_emb, interest, item_emb, interest * item_emb, profile, ctx], dim=-1)
        else:
            features = torch.cat([profile, item_emb], dim=-1)
        return features, user_emb, item_emb

    def forward(
        self,
        user_profile: torch.Tensor,
        item: torch.Tensor,
        hist_items: torch.Tensor | None = None,
        hist_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **ignored: Any,  # other batch keys (user_id, ...) are for other consumers
    ) -> FoundationOutput:
        features, user_emb, item_emb = self.encode(user_profile, item, hist_items, hist_mask, context)
        logits = self.tower(features)
        loss = None
        if labels is not None:
            if labels.shape[-1] != len(TASKS):
                raise ValueError(f"labels has {labels.shape[-1]} columns; the batch contract has {len(TASKS)} "
                                 f"({', '.join(TASKS)})")
            loss = masked_bce(logits, labels[:, self.label_columns])
        return FoundationOutput(loss=loss, logits=logits, features=features,
                                user_embedding=user_emb, item_embedding=item_emb)

    @torch.no_grad()
    def scale_logits(self, factor: float) -> FoundationModel:
        """Multiply every logit by ``factor`` (the head's weight and bias, in place): temperature
        scaling of the frozen model. Personalization adds its own offsets to these logits; where they
        carry a user's and an item's base rates, the foundation's logit at full weight counts part of
        the same evidence twice (KuaiSAR-R; chosen on validation, see the README)."""
        if not factor > 0:
            raise ConfigError(f"the foundation's logit scale must be > 0, got {factor}")
        self.tower.head.weight.mul_(factor)
        self.tower.head.bias.mul_(factor)
        return self

    # ------------------------------------------------------------------ checkpoint I/O

    def save_pretrained(self, save_directory, *args, **kwargs):  # noqa: D401 - transformers signature
        """transformers' save_pretrained, then a SHA-256 of the weights sealed into their header (checked on load)."""
        with quiet_transformers():
            out = super().save_pretrained(save_directory, *args, **kwargs)
        weights = Path(save_directory) / WEIGHTS_NAME
        if weights.exists():
            seal_safetensors(weights)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load from a local directory; raise CheckpointError naming the file on any problem.

        Strict: missing, unexpected or shape-mismatched weights are errors (transformers
        would otherwise re-initialise them silently), and so is a weights file whose
        data no longer matches the SHA-256 sealed into its header.
        """
        path = Path(pretrained_model_name_or_path)
        _check_checkpoint_dir(path)
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["local_files_only"] = True
        kwargs["output_loading_info"] = True
        config = kwargs.get("config")
        if config is None:
            try:
                kwargs["config"] = FoundationConfig.from_pretrained(str(path), local_files_only=True)
                kwargs["config"].validate()
            except Exception as e:  # malformed JSON, wrong field types, ...
                raise CheckpointError(f"{path / CONFIG_NAME}: not a valid foundation config: {e}") from e
        else:
            try:
                config.validate()
            except ConfigError as e:
                raise CheckpointError(f"{path}: config passed to from_pretrained is invalid: {e}") from e
        _check_weights_match(cls, kwargs["config"], path / WEIGHTS_NAME, path / CONFIG_NAME)
        try:
            with quiet_transformers():
                model, info = super().from_pretrained(str(path), *args, **kwargs)
        except FedpaError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{path / WEIGHTS_NAME}: cannot load the foundation weights ({type(e).__name__}: {_first_line(e)})"
            ) from e
        problems = [f"{k.replace('_', ' ')}: {', '.join(sorted(map(str, v)))[:400]}"
                    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if (v := info.get(k))]
        if problems:
            raise CheckpointError(
                f"{path / WEIGHTS_NAME}: weights do not match the config ({path / CONFIG_NAME}); " + "; ".join(problems)
            )
        return (model, info) if want_info else model


# ---------------------------------------------------------------------------- helpers


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every parameter (requires_grad False) and switch to eval mode (no dropout)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


_PINNED: dict[Path, tuple[tuple, FoundationModel]] = {}


def _file_version(path: Path) -> tuple:
    """What identifies one version of a checkpoint's files: their sizes, modification times and inodes (an
    atomic replacement of the directory changes the inodes)."""
    return tuple((f, st.st_size, st.st_mtime_ns, st.st_ino)
                 for f in (CONFIG_NAME, WEIGHTS_NAME) for st in [(path / f).stat()])


def pin_foundation(path: str | Path) -> None:
    """Keep this checkpoint loaded in this process: later `load_foundation(path)` calls here, and in processes
    forked from here, copy it instead of reading, checking and converting the files again, for as long as the
    files are the version pinned. For a long-lived process that serves many short tasks on one foundation
    (`client/warm_executor.py`: loading through transformers costs ~0.4 s a task)."""
    p = Path(path).resolve()
    _PINNED[p] = (_file_version(p), FoundationModel.from_pretrained(p))


def load_foundation(path: str | Path, *, config: FoundationConfig | None = None,
                    frozen: bool = True) -> FoundationModel:
    """Load a foundation checkpoint directory (strict, local); frozen and in eval mode by default."""
    pinned = _PINNED.get(resolved := Path(path).resolve()) if config is None and _PINNED else None
    if pinned is not None and pinned[0] == _file_version(resolved):
        model = copy.deepcopy(pinned[1])
    else:
        kw = {"config": config} if config is not None else {}
        model = FoundationModel.from_pretrained(path, **kw)
    return freeze(model) if frozen else model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and load reports (we report problems ourselves)."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _check_weights_match(cls, config: FoundationConfig, weights: Path, config_file: Path) -> None:
    """Compare the safetensors header (names, shapes) with what ``config`` builds; CheckpointError if not equal.

    Done before transformers loads anything, so the message names every difference
    instead of transformers' generic size-mismatch error, and nothing is re-initialised.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{weights}: corrupted or truncated safetensors file ({_first_line(e)})") from e
    with torch.device("meta"), quiet_transformers():
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = [f"{k} {list(stored[k])} in the file vs {list(expected[k])} from the config"
              for k in sorted(set(stored) & set(expected)) if stored[k] != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:5])
                         + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""))
        if missing:
            parts.append("missing: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError(f"{weights}: weights do not match the config ({config_file}): " + "; ".join(parts))


def _check_checkpoint_dir(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a foundation checkpoint directory (expected {CONFIG_NAME} + "
                              f"{WEIGHTS_NAME})")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing from the foundation checkpoint")
    verify_safetensors(path / WEIGHTS_NAME)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else ""
