"""Random batches that follow `foundation.batch`, for tests and benchmarks.

Public API::

    small_config(arch="transformer", **overrides) -> FoundationConfig   # small vocabularies, fast to build
    random_batch(config, B, seed, *, n_users=16, seq_len=None, hist_fill=0.7,
                 unobserved=0.1, user_ids=None) -> dict[str, Tensor]
    batch_iter(config, n_batches, B, seed, **kw) -> list[dict]

Labels are not noise: they follow a fixed hidden rule (the same for every
seed), so a model can learn them and a test can check that pre-training
beats an untrained model. The rule mixes an item effect (category), a user
effect (first profile field), a user x item interaction, and how much of the
user's history shares the candidate's category (so the sequence matters).
Each user id has a fixed profile, so GAUC and per-user routing are meaningful.
"""

from __future__ import annotations

import torch

from .batch import CONTEXT_VOCAB, ITEM_FIELDS, TASKS
from .config import FoundationConfig

_RULE_SEED = 1234

SMALL_VOCAB = {"video_id": 2000, "author_id": 200, "category_level_one": 8, "category_level_two": 30,
               "upload_type": 4, "age": 6, "gender": 3, "province": 10}


def small_config(arch: str = "transformer", **overrides) -> FoundationConfig:
    """A config with small vocabularies and seq_len 20 (tests); profile fields age, gender, province."""
    kw = dict(arch=arch, seq_len=20)
    kw.update(overrides)
    return FoundationConfig.from_dataset_vocab(SMALL_VOCAB, ["age", "gender", "province"], **kw)


def _rule_tables(n_cat: int, n_prof: int):
    g = torch.Generator().manual_seed(_RULE_SEED)
    return (torch.randn(n_cat, generator=g) * 1.2, torch.randn(n_prof, generator=g) * 0.8,
            torch.randn(n_prof, n_cat, generator=g) * 1.2)


def _items(config: FoundationConfig, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    cols = []
    for f in ITEM_FIELDS:
        if f == "duration":
            cols.append(torch.randint(1_000, 600_000, shape, generator=g))
        else:
            cols.append(torch.randint(0, max(1, config.item_vocab[f]), shape, generator=g))
    return torch.stack(cols, dim=-1).long()


def random_batch(config: FoundationConfig, B: int, seed: int, *, n_users: int = 16, seq_len: int | None = None,
                 hist_fill: float = 0.7, unobserved: float = 0.1, user_ids: torch.Tensor | None = None) -> dict:
    """One batch of B examples from ``n_users`` users (see module docstring)."""
    g = torch.Generator().manual_seed(int(seed))
    L = int(seq_len or config.seq_len)
    if user_ids is None:
        user_ids = torch.randint(0, n_users, (B,), generator=g)
    user_ids = user_ids.long()
    # A user's profile is a fixed function of the user id.
    prof_cols = []
    for j, f in enumerate(config.user_fields):
        v = max(1, config.user_vocab[f])
        prof_cols.append((user_ids * (7 + 2 * j) + 3 * j + (user_ids // max(v, 1))) % v)
    user_profile = torch.stack(prof_cols, dim=1) if prof_cols else torch.zeros(B, 0, dtype=torch.long)

    item = _items(config, (B,), g)
    hist = _items(config, (B, L), g)
    n_cat = max(1, config.item_vocab["category_level_one"])
    cat_i = ITEM_FIELDS.index("category_level_one")
    # Each user prefers one category: a share of the history comes from it.
    pref = (user_ids * 5 + 1) % n_cat
    take_pref = torch.rand(B, L, generator=g) < 0.5
    hist[..., cat_i] = torch.where(take_pref, pref[:, None].expand(B, L), hist[..., cat_i])
    n_real = (torch.rand(B, generator=g) * hist_fill * L * 2).long().clamp(0, L)
    hist_mask = torch.arange(L)[None, :] >= (L - n_real)[:, None]  # left-padded
    hist = torch.where(hist_mask[..., None], hist, torch.zeros_like(hist))
    context = torch.stack([torch.randint(0, CONTEXT_VOCAB["hour"], (B,), generator=g),
                           torch.randint(0, CONTEXT_VOCAB["weekday"], (B,), generator=g)], dim=1)

    n_prof = max(1, config.user_vocab[config.user_fields[0]]) if config.user_fields else 1
    a, b, c = _rule_tables(n_cat, n_prof)
    cat = item[:, cat_i] % n_cat
    p0 = user_profile[:, 0] % n_prof if config.user_fields else torch.zeros(B, dtype=torch.long)
    share = ((hist[..., cat_i] == cat[:, None]) & hist_mask).float().sum(1) / hist_mask.float().sum(1).clamp(min=1)
    logit = a[cat] + b[p0] + c[p0, cat] + 3.0 * share - 0.5
    ev = (torch.rand(B, generator=g) < torch.sigmoid(logit)).float()
    labels = torch.empty(B, len(TASKS))
    labels[:, 0] = ev
    for t in range(1, len(TASKS)):
        labels[:, t] = ev * (torch.rand(B, generator=g) < 0.5 / t).float()
    labels = torch.where(torch.rand(B, len(TASKS), generator=g) < unobserved, torch.full_like(labels, -1.0), labels)
    labels[:, 0] = ev  # the primary label is always observed in these batches
    return {
        "user_profile": user_profile.long(),
        "hist_items": hist.long(),
        "hist_mask": hist_mask,
        "item": item,
        "context": context.long(),
        "labels": labels.float(),
        "user_id": user_ids,
    }


def batch_iter(config: FoundationConfig, n_batches: int, B: int, seed: int, **kw) -> list[dict]:
    """``n_batches`` batches with seeds ``seed, seed+1, ...``."""
    return [random_batch(config, B, seed * 100_003 + i, **kw) for i in range(n_batches)]
