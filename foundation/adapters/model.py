"""The adapted model: inject FedPA's layers into a frozen foundation with peft, save and load them in peft's
on-disk format (sealed), and the Ditto penalty over its paths."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from ..checkpoint import CheckpointError, replace_dir, seal_safetensors, verify_safetensors
from ..config import ConfigError
from ..model import FoundationModel
from .config import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, FedPAConfig, adapter_config
from .layer import FedPALinear
from .routing import RoutingState, remove_routing_hooks


def bind_routing(peft_model: PeftModel, config: FedPAConfig) -> RoutingState:
    base = peft_model.get_base_model()
    remove_routing_hooks(base)
    state = RoutingState(config)
    base.register_forward_pre_hook(state.pre_hook, with_kwargs=True)
    base.register_forward_hook(state.post_hook, with_kwargs=True)
    base._fedpa_routing = state
    for m in base.modules():
        if isinstance(m, FedPALinear):
            m.routing = state
    return state


def attach_adapters(foundation: FoundationModel, config: FedPAConfig | str = "fedpa", **overrides: Any) -> PeftModel:
    """Freeze ``foundation`` and inject FedPA adapters with peft; returns the PeftModel.

    ``foundation`` is the foundation model, or any module whose ``config.user_fields`` names the
    profile columns (a stage head's host, `recmodels.stages.pointwise.StageHost`).

    ``config`` is a FedPAConfig or a preset name (then ``overrides`` go to
    `adapter_config`). Initialisation uses the global torch RNG (seed it for
    determinism). The foundation is modified in place (as peft does).
    """
    if isinstance(config, str):
        config = adapter_config(foundation.config, config, **overrides)
    elif overrides:
        raise ConfigError("overrides are only accepted together with a preset name")
    config.fedpa_validate()
    if list(config.user_fields) != list(foundation.config.user_fields):
        raise ConfigError(f"adapter was built for profile fields {config.user_fields}, the foundation has "
                          f"{foundation.config.user_fields}")
    for p in foundation.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation noise triggered inside peft
        model = get_peft_model(foundation, config)
    bind_routing(model, config)
    return model


def save_adapters(model: PeftModel, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically (temp dir, then rename)."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        seal_safetensors(tmp / ADAPTER_WEIGHTS_NAME)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_adapters(foundation: FoundationModel, adapter_dir: str | Path, *, trainable: bool = True) -> PeftModel:
    """Attach the adapters saved in ``adapter_dir`` to ``foundation`` (strict: CheckpointError on any mismatch)."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = FedPAConfig.from_json_file(d / ADAPTER_CONFIG_NAME)
    weights = d / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing from the adapter directory")
    verify_safetensors(weights)
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise CheckpointError(f"{weights}: corrupted or truncated safetensors file ({_first_line(e)})") from e
    cfg.inference_mode = not trainable
    try:
        model = attach_adapters(foundation, cfg)
    except ConfigError as e:
        raise CheckpointError(f"{d / ADAPTER_CONFIG_NAME}: does not fit this foundation ({e})") from e
    expected = {k: tuple(v.shape) for k, v in _saved_state(model).items()}
    stored = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    shapes = [f"{k} {list(stored[k])} in the file vs {list(expected[k])} from the config"
              for k in sorted(set(expected) & set(stored)) if expected[k] != stored[k]]
    if missing or unexpected or shapes:
        parts = ([f"shape mismatch: {'; '.join(shapes[:5])}"] if shapes else []) + \
                ([f"missing: {', '.join(missing[:8])}"] if missing else []) + \
                ([f"unexpected: {', '.join(unexpected[:8])}"] if unexpected else [])
        raise CheckpointError(f"{weights}: adapter weights do not match {d / ADAPTER_CONFIG_NAME}: " + "; ".join(parts))
    try:
        set_peft_model_state_dict(model, state)
    except Exception as e:
        raise CheckpointError(f"{weights}: cannot load adapter weights ({type(e).__name__}: {_first_line(e)})") from e
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _saved_state(model: PeftModel) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else ""


def ditto_penalty(model: PeftModel) -> torch.Tensor:
    """Σ over layers and user slots of ||A_u - A_g||² + ||B_u - B_g||² (Ditto's proximal term, without λ/2)."""
    total = None
    for m in model.modules():
        if isinstance(m, FedPALinear):
            for a, spec in m.fedpa_spec.items():
                if "user" in spec.paths and "global" in spec.paths:
                    ga = m.lora_A[a].weight.t()  # [in, r]
                    gb = m.lora_B[a].weight.t()  # [r, out]
                    term = ((m.lora_user_A[a] - ga) ** 2).sum() + ((m.lora_user_B[a] - gb) ** 2).sum()
                    total = term if total is None else total + term
    if total is None:
        raise ConfigError("ditto_penalty needs an adapter with both a user and a global path (preset 'ditto')")
    return total
