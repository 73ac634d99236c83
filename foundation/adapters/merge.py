"""Folding a user's adapters into a dense model (plain torch, no peft): what `fedpa export` traces to ONNX."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..errors import FedpaError
from ..model import FoundationModel
from .config import FedPAConfig
from .exchange import normalise_groups
from .layer import FedPALinear, GateMLP
from .routing import remove_routing_hooks, routing_state


class GatedPathsLinear(nn.Module):
    """A FedPA layer folded for one user: y = Σ_k g_k(x) (W_k x + b) with W_k = W + ΔW_k.

    The K path weights live in ONE dense nn.Linear (in -> K*out) so that the merged
    model is plain linear layers (quantizable); the gate is the trained GateMLP.
    """

    def __init__(self, paths: nn.Linear, gate: nn.Module, k: int, out_features: int, keep: torch.Tensor | None):
        super().__init__()
        self.paths, self.gate, self.k, self.out_features = paths, gate, k, out_features
        self.register_buffer("keep", keep if keep is not None else torch.ones(k, dtype=torch.bool), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.paths(x).unflatten(-1, (self.k, self.out_features))
        logits = self.gate(x)
        if not bool(self.keep.all()):
            logits = logits.masked_fill(~self.keep, float("-inf"))
        g = logits.softmax(-1)
        return (g.unsqueeze(-1) * y).sum(-2)


@torch.no_grad()
def merge_for_user(model: PeftModel, user_slot: int = 0,
                   group_values: Mapping[str, int] | Sequence[int] | torch.Tensor | None = None,
                   domain: int | None = None) -> FoundationModel:
    """A dense FoundationModel computing exactly what the adapted model computes for one user.

    Per FedPA layer: without a gate everything folds into one nn.Linear
    (W + mean_k ΔW_k over the active paths); with a gate the layer becomes a
    `GatedPathsLinear` holding the K dense path weights (W, W+ΔW_user,
    W+ΔW_{j,v_j}, ...) in one nn.Linear plus the gate (an input-dependent softmax
    cannot be folded into a single matrix). The trained head (shared copy or this
    user's private slot) replaces the foundation's. No peft, no routing: call it
    with ``model(**batch)`` for batches of this user. An adapter with a domain-specific path folds for one
    ``domain`` (its code): the merged model scores that domain's rows.
    """
    state = routing_state(model)
    cfg = state.config
    groups = normalise_groups(cfg, group_values)
    if cfg.domain_values and domain is None:
        raise FedpaError("this adapter has a domain-specific path: a dense model is folded for one domain "
                         f"(pass domain=0..{cfg.domain_values - 1})")
    if cfg.domain_values and not 0 <= int(domain) < cfg.domain_values:
        raise FedpaError(f"domain {domain} is outside the {cfg.domain_values} codes of this adapter's domain path")

    merged = copy.deepcopy(model.get_base_model())
    merged.__dict__.pop("_fedpa_routing", None)
    remove_routing_hooks(merged)
    adapter = "default" if "default" in model.peft_config else next(iter(model.peft_config))
    for name, mod in list(merged.named_modules()):
        if isinstance(mod, FedPALinear):
            _set_module(merged, name, _fold_layer(mod, adapter, user_slot, groups, cfg, state.paths,
                                                          domain))
        elif isinstance(mod, ModulesToSaveWrapper):
            _set_module(merged, name, copy.deepcopy(mod.modules_to_save[adapter]))
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


def _fold_layer(layer: FedPALinear, adapter: str, slot: int, groups: dict[str, int], cfg: FedPAConfig,
                paths_filter: set[str] | None, domain: int | None = None) -> nn.Module:
    spec = layer.fedpa_spec[adapter]
    base = layer.get_base_layer()
    w, b = base.weight.detach(), (base.bias.detach() if base.bias is not None else None)
    if spec.head:
        dw, db = layer.head_deltas(adapter)
        k = 0 if spec.head == "shared" else slot
        dw, db = dw[k], db[k]
        lin = nn.Linear(layer.in_features, layer.out_features)
        lin.weight.copy_(w + dw)
        lin.bias.copy_((b if b is not None else 0) + db)
        if adapter in layer.lora_user_bias and (paths_filter is None or "user" in paths_filter):
            lin.bias.add_(layer.lora_user_bias[adapter][slot])
        return lin
    s = layer.scaling[adapter]
    # a user offset of the input folds into the biases of everything that reads it (all affine in x)
    shift = None
    if adapter in layer.lora_user_shift and (paths_filter is None or "user" in paths_filter):
        shift = layer.lora_user_shift[adapter][slot].detach()
    deltas, active = [], []
    for p in spec.paths:
        on = paths_filter is None or p in paths_filter or (p.startswith("group:") and "group" in paths_filter)
        if p == "user":
            a_, b_ = layer.lora_user_A[adapter][slot], layer.lora_user_B[adapter][slot]
        elif p.startswith("group:"):
            attr = p[len("group:"):]
            a_, b_ = layer.lora_group_A[adapter][attr][groups[attr]], layer.lora_group_B[adapter][attr][groups[attr]]
        elif p == "domain":
            a_, b_ = layer.lora_domain_A[adapter][int(domain)], layer.lora_domain_B[adapter][int(domain)]
        else:
            a_, b_ = layer.lora_A[adapter].weight.t(), layer.lora_B[adapter].weight.t()
        deltas.append((a_ @ b_).t() * s)  # [out, in]
        active.append(on)
    if not spec.use_gate:
        live = [d for d, on in zip(deltas, active) if on]
        lin = nn.Linear(layer.in_features, layer.out_features, bias=b is not None or shift is not None)
        lin.weight.copy_(w + (sum(live) / len(live) if live else 0))
        if lin.bias is not None:
            lin.bias.copy_((b if b is not None else 0) + (lin.weight @ shift if shift is not None else 0))
        return lin
    k = 1 + len(deltas)
    big = nn.Linear(layer.in_features, k * layer.out_features, bias=b is not None or shift is not None)
    big.weight.copy_(torch.cat([w] + [w + d for d in deltas], dim=0))
    if big.bias is not None:
        big.bias.copy_((b.repeat(k) if b is not None else 0) + (big.weight @ shift if shift is not None else 0))
    keep = torch.tensor([True, *active])
    gate = GateMLP(layer.in_features, layer.lora_gate_fc1[adapter].out_features, k)
    gate.fc1.load_state_dict(layer.lora_gate_fc1[adapter].state_dict())
    gate.fc2.load_state_dict(layer.lora_gate_fc2[adapter].state_dict())
    if shift is not None:
        gate.fc1.bias.add_(gate.fc1.weight @ shift)
    return GatedPathsLinear(big, gate, k, layer.out_features, None if all(active) else keep)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
