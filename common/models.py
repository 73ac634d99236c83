"""The model a run trains, built from its configuration: the same on the server (to know the shared state),
on every client, in the centralized baseline and in export, so that all of them agree on its parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpa.recmodels.collaborative import CFOptions, CollaborativeModel
from fedpa.recmodels.personalization import PersonalModel, get_algorithm

from .config import FederationConfig


def build_personal_model(cfg: FederationConfig, algorithm: str | None = None, *, user_slots: int = 1,
                         foundation: Any = None) -> PersonalModel | CollaborativeModel:
    """The foundation's tower (or, with ``stage``, that stage's trained head over the same tower inputs) with
    the algorithm's adapters and options."""
    # the modelling stack (transformers, peft) is imported here, not with this module: a device running a
    # compiled model (`build_compiled_model`) never loads it
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.stages.pointwise import load_stage_host

    foundation = foundation if foundation is not None else load_foundation(cfg.foundation)
    alg = get_algorithm(algorithm or cfg.algorithm)
    if alg.collaborative:  # scores items by id: the foundation only tells the catalogue's size
        return CollaborativeModel(alg, foundation.config.item_vocab["video_id"], seed=cfg.seed,
                                  options=CFOptions(dim=cfg.embedding_dim, resample_negatives=cfg.split == "loo",
                                                    pfedrec_eta=cfg.pfedrec_eta, fedrap_lambda=cfg.fedrap_lambda,
                                                    fedrap_mu=cfg.fedrap_mu,
                                                    fedrap_item_lr=cfg.fedrap_item_lr,
                                                    fedrap_weight_decay=cfg.fedrap_weight_decay, lr=cfg.lr))
    if cfg.foundation_logit_scale != 1.0:
        foundation.scale_logits(cfg.foundation_logit_scale)
    host = load_stage_host(foundation, cfg.stage_models, cfg.stage) if cfg.stage else None
    return PersonalModel(foundation, alg, seed=cfg.seed,
                         user_slots=user_slots, host=host, **model_options(cfg))


def model_options(cfg: FederationConfig) -> dict[str, Any]:
    """`PersonalModel`'s keyword arguments for this run: adapter overrides and FedPA's options (the other
    algorithms ignore FedPA's options, so that one configuration serves a whole comparison)."""
    kw: dict[str, Any] = {"r": cfg.rank, "lora_alpha": cfg.rank}
    if cfg.head:
        kw["head"] = cfg.head
    if cfg.algorithm in ("fedpa", "centralized"):
        kw.update(use_user_adapter=cfg.use_user_adapter, use_group_adapters=cfg.use_group_adapters,
                  use_gate=cfg.use_gate, use_user_shift=cfg.use_user_shift and cfg.use_user_adapter)
        if cfg.use_user_bias and cfg.algorithm == "fedpa":
            kw["use_user_bias"] = True
        if cfg.item_bias_fields and cfg.algorithm == "fedpa":
            kw["item_bias_fields"] = cfg.item_bias_list
            kw["item_bias_newton"] = cfg.item_bias_update == "newton"
        if cfg.item_embedding_dim and cfg.algorithm == "fedpa":
            kw["item_embedding_dim"] = cfg.item_embedding_dim
        if cfg.item_popularity and cfg.algorithm == "fedpa":
            kw["item_popularity"] = "steps" if cfg.item_popularity_steps else True
        if cfg.item_rows and cfg.algorithm == "fedpa" and cfg.item_tables:
            kw["item_rows"] = cfg.item_rows
        if cfg.domain_adapters:
            from fedpa.recdata.store import Dataset

            kw["item_domains"] = Dataset(cfg.data_dir).item_domains()
        if cfg.group_attributes:
            kw["group_attributes"] = [a.strip() for a in cfg.group_attributes.split(",") if a.strip()]
    return kw


def compiled_options(cfg: FederationConfig) -> dict[str, Any]:
    """What a compiled device model (`recmodels.compiled`) is made for: everything `build_personal_model` reads
    that shapes or initialises the model. A device runs its compiled model only for a run whose options are
    these, so a run that changes any of them never trains a stale model."""
    return {"algorithm": cfg.algorithm, "seed": cfg.seed, "foundation-logit-scale": cfg.foundation_logit_scale,
            "stage": cfg.stage, "model": model_options(cfg)}


def build_compiled_model(cfg: FederationConfig, compiled_dir: str | Path, *,
                         foundation_digest: str | None = None) -> PersonalModel:
    """The run's personal model from a device's compiled copy (torch only; `recmodels.compiled`). Raises
    `CompiledModelError` when it is missing, corrupted, made for other options than ``cfg``'s, or (given
    ``foundation_digest``, the device's foundation's) compiled from another foundation."""
    from fedpa.recmodels.compiled import CompiledModelError, load_compiled, read_meta, same_options

    meta = read_meta(compiled_dir)
    if not same_options(meta, compiled_options(cfg)):
        raise CompiledModelError(f"{compiled_dir}: compiled for other options than this run's (algorithm "
                                 f"'{cfg.algorithm}'; provision the device again with the run's configuration)")
    if foundation_digest is not None and meta.get("foundation-digest") != foundation_digest:
        raise CompiledModelError(f"{compiled_dir}: compiled from another foundation than the device holds")
    compiled = load_compiled(compiled_dir)
    # the adapters' own options (rank, paths, groups) were fixed when the tower was compiled; the rest (item-side
    # tables, popularity) builds here as on any node
    return PersonalModel(compiled.foundation, get_algorithm(cfg.algorithm), seed=cfg.seed, compiled=compiled.adapters,
                         **model_options(cfg))
