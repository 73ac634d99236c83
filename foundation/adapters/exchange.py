"""What may leave a client: every adapter parameter (group tensors per row) classified frozen, private or
shared, and the copies a client exchanges (its shared entries, its private slot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper

from ..errors import FedpaError
from .config import FedPAConfig
from .layer import FedPALinear
from .routing import routing_state

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Kind:
    """Where a parameter (or a row of one) may go.

    kind: "frozen" (foundation), "private" (never leaves the client) or "shared".
    group: for shared entries, None = shared by everyone (gate, head, global path);
           (attribute, value) = shared within that group (one row of a stacked group tensor).
    param: the model's parameter name holding the value. row: index into its first
    dimension (group value), or None for the whole tensor. per_slot: the first
    dimension is the user slot (stacked private user adapters / private head).
    """

    kind: str
    group: tuple[str, int] | None = None
    param: str = ""
    row: int | None = None
    per_slot: bool = False


def _short(name: str) -> str:
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def parameter_kinds(model: PeftModel) -> dict[str, Kind]:
    """Every parameter of the adapted model (group tensors split per row) -> its `Kind`."""
    cfg = routing_state(model).config
    adapter = "default" if "default" in model.peft_config else next(iter(model.peft_config))
    kinds: dict[str, Kind] = {}
    covered: set[str] = set()
    for mname, m in model.named_modules():
        if isinstance(m, FedPALinear) and adapter in m.fedpa_spec:
            short = _short(mname)
            pre = f"{mname}."
            for attr, kind in (("lora_user_A", "private"), ("lora_user_B", "private"),
                               ("lora_head_delta_w", "private"), ("lora_head_delta_b", "private"),
                               ("lora_user_shift", "private"), ("lora_user_bias", "private"),
                               ("lora_head_shared_w", "shared"), ("lora_head_shared_b", "shared"),
                               ("lora_domain_A", "shared"), ("lora_domain_B", "shared")):
                if adapter in getattr(m, attr):
                    pname = f"{pre}{attr}.{adapter}"
                    kinds[f"{short}.{attr}"] = Kind(kind, param=pname, per_slot=kind == "private")
                    covered.add(pname)
            for attr in ("lora_group_A", "lora_group_B"):
                if adapter in getattr(m, attr):
                    for a, p in getattr(m, attr)[adapter].items():
                        pname = f"{pre}{attr}.{adapter}.{a}"
                        covered.add(pname)
                        for v in range(p.shape[0]):
                            kinds[f"{short}.{attr}.{a}={v}"] = Kind("shared", group=(a, v), param=pname, row=v)
            for attr in ("lora_gate_fc1", "lora_gate_fc2"):
                if adapter in getattr(m, attr):
                    for n, _ in getattr(m, attr)[adapter].named_parameters():
                        pname = f"{pre}{attr}.{adapter}.{n}"
                        kinds[f"{short}.{attr}.{n}"] = Kind("shared", param=pname)
                        covered.add(pname)
            for attr in ("lora_A", "lora_B"):
                if adapter in getattr(m, attr):
                    pname = f"{pre}{attr}.{adapter}.weight"
                    kinds[f"{short}.{attr}.weight"] = Kind("shared", param=pname)
                    covered.add(pname)
        elif isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save:
            short = _short(mname)
            for n, _ in m.modules_to_save[adapter].named_parameters():
                pname = f"{mname}.modules_to_save.{adapter}.{n}"
                kinds[f"{short}.modules_to_save.{n}"] = Kind("shared" if cfg.head == "shared" else "private",
                                                             param=pname)
                covered.add(pname)
    for pname, _ in model.named_parameters():
        if pname not in covered:  # the foundation, under its own parameter name
            kinds[_short(pname).replace(".base_layer.", ".").replace(".original_module.", ".")] = Kind(
                "frozen", param=pname)
    return kinds


def normalise_groups(cfg: FedPAConfig, group_values: Mapping[str, int] | Sequence[int] | torch.Tensor | None
                      ) -> dict[str, int]:
    if group_values is None:
        if cfg.group_attributes:
            raise FedpaError(f"group values needed for {', '.join(cfg.group_attributes)}")
        return {}
    if isinstance(group_values, Mapping):
        vals = {str(k): int(v) for k, v in group_values.items()}
    else:
        seq = group_values.tolist() if isinstance(group_values, torch.Tensor) else list(group_values)
        if len(seq) == len(cfg.user_fields) and len(seq) != len(cfg.group_attributes):
            seq = [seq[cfg.user_fields.index(a)] for a in cfg.group_attributes]  # a whole profile row
        if len(seq) != len(cfg.group_attributes):
            raise FedpaError(f"expected {len(cfg.group_attributes)} group values "
                             f"({', '.join(cfg.group_attributes)}), got {len(seq)}")
        vals = dict(zip(cfg.group_attributes, (int(v) for v in seq)))
    for a in cfg.group_attributes:
        if a not in vals:
            raise FedpaError(f"missing group value for '{a}'")
        if not 0 <= vals[a] < cfg.group_vocab[a]:
            raise FedpaError(f"group value {vals[a]} for '{a}' is outside 0..{cfg.group_vocab[a] - 1}")
    return {a: vals[a] for a in cfg.group_attributes}


def extract_shared(model: PeftModel, group_values: Mapping[str, int] | Sequence[int] | torch.Tensor | None
                   ) -> dict[str, torch.Tensor]:
    """The shared tensors one client exchanges: global ones, plus only its own groups' rows (copies)."""
    cfg = routing_state(model).config
    groups = normalise_groups(cfg, group_values)
    params = dict(model.named_parameters())
    out = {}
    for name, k in parameter_kinds(model).items():
        if k.kind != "shared":
            continue
        if k.group is not None and groups.get(k.group[0]) != k.group[1]:
            continue
        t = params[k.param]
        out[name] = (t[k.row] if k.row is not None else t).detach().clone()
    return out


def load_shared(model: PeftModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write shared tensors (any subset, e.g. the server's aggregate for this client's groups) into the model."""
    _load_entries(model, tensors, "shared", slot=None)


def extract_private(model: PeftModel, slot: int = 0) -> dict[str, torch.Tensor]:
    """One user's private tensors (its slot of the stacked user adapters / private head), as copies."""
    params = dict(model.named_parameters())
    out = {}
    for name, k in parameter_kinds(model).items():
        if k.kind == "private":
            t = params[k.param]
            out[name] = (t[slot] if k.per_slot else t).detach().clone()
    return out


def load_private(model: PeftModel, tensors: Mapping[str, torch.Tensor], slot: int = 0) -> None:
    """Write one user's private tensors into ``slot``."""
    _load_entries(model, tensors, "private", slot=slot)


@torch.no_grad()
def _load_entries(model: PeftModel, tensors: Mapping[str, torch.Tensor], kind: str, slot: int | None) -> None:
    kinds = parameter_kinds(model)
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in kinds or kinds[n].kind != kind]
    if unknown:
        raise FedpaError(f"not {kind} adapter tensors of this model: {', '.join(sorted(unknown)[:8])}")
    for name, value in tensors.items():
        k = kinds[name]
        dst = params[k.param]
        if k.row is not None:
            dst = dst[k.row]
        elif k.per_slot:
            dst = dst[slot]
        if tuple(dst.shape) != tuple(value.shape):
            raise FedpaError(f"{name}: shape {list(value.shape)} does not match the model's {list(dst.shape)}")
        dst.copy_(value.to(dst.dtype))
