"""The FedPA layer: a peft LoRA layer for nn.Linear with gated user, group and global low-rank paths (or a
head with per-user deltas and logit offsets)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ..config import ConfigError
from ..errors import FedpaError
from .config import FedPAConfig
from .routing import Routing, RoutingError, RoutingState


class GateMLP(nn.Module):
    """The gate of a merged layer: logits fc2(ReLU(fc1(x))) over the K paths (softmax by the caller)."""

    def __init__(self, in_features: int, hidden: int, k: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


@dataclass
class _LayerSpec:
    paths: list[str]          # adapter paths in gate order (after base)
    use_gate: bool
    head: str = ""            # "" = an adapted hidden layer; the head as deltas on the frozen head:
                              # "private" = per-slot deltas, "shared" = one shared delta + per-slot logit offsets


class FedPALinear(nn.Module, LoraLayer):
    """A peft LoRA layer for nn.Linear with FedPA's gated user / group / global paths.

    Registered through ``LoraConfig._register_custom_module``; see the module
    docstring for the exact formula. Parameter containers (all keyed by adapter
    name, so peft saves/loads them): ``lora_user_A`` [U, in, r], ``lora_user_B``
    [U, r, out], ``lora_group_A[attr]`` [V, in, r], ``lora_group_B[attr]`` [V, r,
    out], ``lora_gate_fc1`` / ``lora_gate_fc2`` (the gate MLP), peft's ``lora_A``/``lora_B`` (global path),
    and for a private head ``lora_head_delta_w`` [U, out, in] / ``lora_head_delta_b`` [U, out]
    (per-slot deltas added to the frozen head).
    """

    adapter_layer_names = LoraLayer.adapter_layer_names + (
        "lora_user_A", "lora_user_B", "lora_group_A", "lora_group_B", "lora_gate_fc1", "lora_gate_fc2",
        "lora_head_delta_w", "lora_head_delta_b", "lora_user_shift", "lora_user_bias",
        "lora_head_shared_w", "lora_head_shared_b", "lora_domain_A", "lora_domain_B",
    )
    other_param_names = LoraLayer.other_param_names + ("fedpa_spec",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: FedPAConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.lora_user_A = nn.ParameterDict({})
        self.lora_user_B = nn.ParameterDict({})
        self.lora_group_A = nn.ModuleDict({})
        self.lora_group_B = nn.ModuleDict({})
        # The gate's two linears sit in their own containers so that the adapter name is the
        # second-to-last key segment, which is what peft strips when saving (lora_gate_fc1.weight).
        self.lora_gate_fc1 = nn.ModuleDict({})
        self.lora_gate_fc2 = nn.ModuleDict({})
        self.lora_head_delta_w = nn.ParameterDict({})
        self.lora_head_delta_b = nn.ParameterDict({})
        self.lora_user_shift = nn.ParameterDict({})
        self.lora_user_bias = nn.ParameterDict({})
        self.lora_head_shared_w = nn.ParameterDict({})
        self.lora_head_shared_b = nn.ParameterDict({})
        self.lora_domain_A = nn.ParameterDict({})
        self.lora_domain_B = nn.ParameterDict({})
        self.fedpa_spec: dict[str, _LayerSpec] = {}
        self.routing: RoutingState | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        if not isinstance(config, FedPAConfig):
            raise ConfigError("FedPALinear needs a FedPAConfig")
        if r <= 0:
            raise ConfigError(f"rank r must be positive, got {r}")
        target = kwargs.get("target_name", "") or ""
        is_head = target == config.head_module or target.endswith("." + config.head_module)
        private_head = config.head == "private" and is_head
        shared_head = config.head == "shared" and bool(config.use_user_bias) and is_head
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.use_rslora[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout.update(nn.ModuleDict({
            adapter_name: nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()}))
        n_in, n_out, slots = self.in_features, self.out_features, int(config.user_slots)
        if private_head:
            # Stored as deltas from the foundation's head (zero init): exact equality at init and a
            # natural prior (weight decay pulls a user's head towards the foundation's).
            self.lora_head_delta_w[adapter_name] = nn.Parameter(torch.zeros(slots, n_out, n_in))
            self.lora_head_delta_b[adapter_name] = nn.Parameter(torch.zeros(slots, n_out))
            self.fedpa_spec[adapter_name] = _LayerSpec(paths=[], use_gate=False, head="private")
        elif shared_head:
            # One shared delta (a single "slot", the same semantics as a trainable shared copy of the
            # head) plus each user's own logit offsets: the user's base rate per task, which a low-rank
            # input-dependent path learns only slowly and at the cost of bending the user's item ranking.
            self.lora_head_shared_w[adapter_name] = nn.Parameter(torch.zeros(1, n_out, n_in))
            self.lora_head_shared_b[adapter_name] = nn.Parameter(torch.zeros(1, n_out))
            self.lora_user_bias[adapter_name] = nn.Parameter(torch.zeros(slots, n_out))
            self.fedpa_spec[adapter_name] = _LayerSpec(paths=[], use_gate=False, head="shared")
        else:
            paths = config.path_names
            if config.use_user_adapter:
                self.lora_user_A[adapter_name] = nn.Parameter(torch.empty(slots, n_in, r))
                self.lora_user_B[adapter_name] = nn.Parameter(torch.zeros(slots, r, n_out))
            if config.group_attributes:
                self.lora_group_A[adapter_name] = nn.ParameterDict({
                    a: nn.Parameter(torch.empty(config.group_vocab[a], n_in, r)) for a in config.group_attributes})
                self.lora_group_B[adapter_name] = nn.ParameterDict({
                    a: nn.Parameter(torch.zeros(config.group_vocab[a], r, n_out)) for a in config.group_attributes})
            if config.domain_values:
                self.lora_domain_A[adapter_name] = nn.Parameter(torch.empty(int(config.domain_values), n_in, r))
                self.lora_domain_B[adapter_name] = nn.Parameter(torch.zeros(int(config.domain_values), r, n_out))
            if config.use_global_adapter:
                self.lora_A[adapter_name] = nn.Linear(n_in, r, bias=False)
                self.lora_B[adapter_name] = nn.Linear(r, n_out, bias=False)
            if config.use_user_shift and (target == config.user_shift_module
                                          or target.endswith("." + config.user_shift_module)):
                self.lora_user_shift[adapter_name] = nn.Parameter(torch.zeros(slots, n_in))
            if config.use_gate:
                self.lora_gate_fc1[adapter_name] = nn.Linear(n_in, int(config.gate_hidden))
                self.lora_gate_fc2[adapter_name] = nn.Linear(int(config.gate_hidden), 1 + len(paths))
            self.fedpa_spec[adapter_name] = _LayerSpec(paths=paths, use_gate=bool(config.use_gate))
            self.reset_fedpa_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_fedpa_parameters(self, adapter_name: str) -> None:
        """A: kaiming-uniform(a=sqrt(5)) like peft's lora_A (bound 1/sqrt(in)); B: zeros."""
        bound = 1.0 / math.sqrt(self.in_features)
        if adapter_name in self.lora_user_A:
            self.lora_user_A[adapter_name].uniform_(-bound, bound)
            self.lora_user_B[adapter_name].zero_()
        if adapter_name in self.lora_group_A:
            for p in self.lora_group_A[adapter_name].values():
                p.uniform_(-bound, bound)
            for p in self.lora_group_B[adapter_name].values():
                p.zero_()
        if adapter_name in self.lora_domain_A:
            self.lora_domain_A[adapter_name].uniform_(-bound, bound)
            self.lora_domain_B[adapter_name].zero_()
        if adapter_name in self.lora_A:
            self.reset_lora_parameters(adapter_name, True)
        if adapter_name in self.lora_user_shift:
            self.lora_user_shift[adapter_name].zero_()
        if adapter_name in self.lora_user_bias:
            self.lora_user_bias[adapter_name].zero_()

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = None
        for adapter in self.active_adapters:
            spec = self.fedpa_spec.get(adapter)
            if spec is None:
                continue
            if spec.head:
                result = self._head_forward(adapter, x, *args, **kwargs)
                continue
            if adapter in self.lora_user_shift and self._user_path_on():
                # the user's own input offset (its private "user embedding"): base, paths and gate all read it
                x = x + _slot_rows(self.lora_user_shift[adapter], self._route().user_slot)
            if result is None:
                result = self.base_layer(x, *args, **kwargs)
            result = result + self._delta(adapter, x).to(result.dtype)
        return result if result is not None else self.base_layer(x, *args, **kwargs)

    def gate_logits(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_gate_fc2[adapter](F.relu(self.lora_gate_fc1[adapter](x)))

    def _route(self) -> Routing:
        # inside model(**batch) the pre-hook has routed this forward; a direct call to the tower
        # (a client training on cached tower inputs) is routed by use_routing(...)
        current = None if self.routing is None else (self.routing.current or self.routing.override)
        if current is None:
            raise RoutingError("FedPA layer called outside a routed forward: call the adapted model with the batch "
                               "(model(**batch)) or wrap the call in use_routing(...)")
        return current

    def head_deltas(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's weight / bias deltas [S, out, in] / [S, out]: S user slots, or 1 when shared."""
        if self.fedpa_spec[adapter].head == "shared":
            return self.lora_head_shared_w[adapter], self.lora_head_shared_b[adapter]
        return self.lora_head_delta_w[adapter], self.lora_head_delta_b[adapter]

    def _head_forward(self, adapter: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Foundation head + this user's full-rank delta (zero at init, so the output starts exactly equal);
        a shared head: + the one shared delta + this user's logit offsets (when the user path is on)."""
        slot = self._route().user_slot
        dw, db = self.head_deltas(adapter)
        base = self.base_layer(x, *args, **kwargs)
        if dw.shape[0] == 1 or bool((slot == slot[0]).all()):
            s = int(slot[0]) if dw.shape[0] > 1 else 0
            out = base + F.linear(x, dw[s], db[s])
        else:
            xb = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.bmm(xb, dw[slot].transpose(1, 2)) + db[slot][:, None, :]
            out = base + delta.reshape(*x.shape[:-1], dw.shape[1])
        if adapter in self.lora_user_bias and self._user_path_on():
            bias = _slot_rows(self.lora_user_bias[adapter], slot)
            if bias.dim() == 2 and out.dim() > 2:  # per-example offsets over a [B, ..., out] output
                bias = bias.reshape(bias.shape[0], *([1] * (out.dim() - 2)), bias.shape[-1])
            out = out + bias
        return out

    def _user_path_on(self) -> bool:
        allowed = self.routing.paths if self.routing is not None else None
        return allowed is None or "user" in allowed

    def active_path_mask(self, spec: _LayerSpec) -> list[bool]:
        allowed = self.routing.paths if self.routing is not None else None
        if allowed is None:
            return [True] * len(spec.paths)
        return [p in allowed or (p.startswith("group:") and "group" in allowed) for p in spec.paths]

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        spec = self.fedpa_spec[adapter]
        xd = self.lora_dropout[adapter](x)
        active = self.active_path_mask(spec)
        route = self._route() if any(p != "global" for p, a in zip(spec.paths, active) if a) else None
        factors = self._shared_factors(adapter, spec, active, route) if any(active) else None
        if factors is not None:
            return self._stacked_delta(adapter, spec, active, factors, x, xd)
        deltas = []
        for p, on in zip(spec.paths, active):
            if not on:
                deltas.append(None)
            elif p == "user":
                deltas.append(_lowrank(xd, self.lora_user_A[adapter], self.lora_user_B[adapter], route.user_slot))
            elif p.startswith("group:"):
                a = p[len("group:"):]
                j = self.routing.config.group_attributes.index(a)
                deltas.append(_lowrank(xd, self.lora_group_A[adapter][a], self.lora_group_B[adapter][a],
                                       route.group_index[:, j]))
            elif p == "domain":
                deltas.append(_domain_lowrank(xd, self.lora_domain_A[adapter], self.lora_domain_B[adapter],
                                              route.domain))
            else:  # global: peft's own LoRA pair
                deltas.append(self.lora_B[adapter](self.lora_A[adapter](xd)))
        scale = self.scaling[adapter]
        if not any(active):
            return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        if spec.use_gate:
            logits = self.gate_logits(adapter, x)  # [..., K], K = 1 + P
            if not all(active):
                keep = torch.tensor([True, *active], device=x.device)
                logits = logits.masked_fill(~keep, float("-inf"))
            g = logits.softmax(-1)
            out = sum(g[..., k + 1: k + 2] * d for k, d in enumerate(deltas) if d is not None)
        else:
            live = [d for d in deltas if d is not None]
            out = sum(live) / len(live)
        return out if scale == 1 else out * scale

    def _shared_factors(self, adapter: str, spec: _LayerSpec, active: list[bool],
                        route: Routing | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(A [in, r], B [r, out]) of every active path when the whole batch uses one row of each (one user,
        as on a device, in a client or in the cohort engine); None when examples need different rows."""
        out = []
        for p, on in zip(spec.paths, active):
            if not on:
                continue
            if p == "global":
                out.append((self.lora_A[adapter].weight.t(), self.lora_B[adapter].weight.t()))
                continue
            if p == "domain":  # rows of several domains, or codes batched under vmap: never read their values here
                return None
            if p == "user":
                a, b, rows = self.lora_user_A[adapter], self.lora_user_B[adapter], route.user_slot
            else:
                attr = p[len("group:"):]
                j = self.routing.config.group_attributes.index(attr)
                a, b, rows = self.lora_group_A[adapter][attr], self.lora_group_B[adapter][attr], route.group_index[:, j]
            if a.shape[0] == 1:
                out.append((a[0], b[0]))
            elif bool((rows == rows[0]).all()):
                k = int(rows[0])
                out.append((a[k], b[k]))
            else:
                return None
        return out

    def _stacked_delta(self, adapter: str, spec: _LayerSpec, active: list[bool],
                       factors: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
                       xd: torch.Tensor) -> torch.Tensor:
        """Σ_k g_k (x A_k) B_k as one product: the gate (or the mean) weighs the rank-r activations of the
        paths side by side, [x A_1 | ... | x A_K], before one multiplication by [B_1; ...; B_K]. Same value
        as the path-by-path sum, with two matrix products instead of 2K and no [..., out]-sized products."""
        r, k = factors[0][0].shape[-1], len(factors)
        fuse_gate = spec.use_gate and xd is x  # no dropout: the gate's first layer joins the same product
        if fuse_gate:   # one concatenation: [A_1 | ... | A_K | gate fc1]
            fc1 = self.lora_gate_fc1[adapter]
            h_all = x @ torch.cat([*(a for a, _ in factors), fc1.weight.t()], dim=-1)
            h = h_all[..., :k * r]                                       # [..., K r]
            logits = self.lora_gate_fc2[adapter](F.relu(h_all[..., k * r:] + fc1.bias))
        else:
            h = xd @ torch.cat([a for a, _ in factors], dim=-1)          # [in, K r]
        if spec.use_gate:
            if not fuse_gate:
                logits = self.gate_logits(adapter, x)                    # [..., 1 + P]
            if not all(active):
                keep = torch.tensor([True, *active], device=x.device)
                logits = logits.masked_fill(~keep, float("-inf"))
            cols = [j + 1 for j, on in enumerate(active) if on]
            g = logits.softmax(-1)[..., cols]                            # [..., K]
            h = (h.unflatten(-1, (k, r)) * g.unsqueeze(-1)).flatten(-2)  # each path's r activations times its g
        else:
            h = h / k
        out = h @ torch.cat([b for _, b in factors], dim=-2)
        scale = self.scaling[adapter]
        return out if scale == 1 else out * scale   # rank = alpha (fedpa's default): no pass over [..., out]

    # ------------------------------------------------------------------ merging (peft API)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold into the base weight: only possible for a lone global path without a gate (plain LoRA)."""
        names = adapter_names or self.active_adapters
        for a in names:
            spec = self.fedpa_spec.get(a)
            if spec is None or a in self.merged_adapters:
                continue
            if spec.head or spec.use_gate or spec.paths != ["global"]:
                raise FedpaError("a FedPA layer with user/group paths or a gate is input-dependent and cannot be "
                                 "folded into one weight; use foundation.adapters.merge_for_user")
            delta = self.get_delta_weight(a)
            w = self.get_base_layer().weight
            if safe_merge and not torch.isfinite(w.data + delta).all():
                raise ValueError(f"NaNs detected while merging adapter {a}")
            w.data += delta
            self.merged_adapters.append(a)

    def unmerge(self) -> None:
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            self.get_base_layer().weight.data -= self.get_delta_weight(a)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def __repr__(self) -> str:
        return "fedpa." + super().__repr__()


def _lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, ..., in] through per-example factors a[rows] [in, r], b[rows] [r, out]."""
    if a.shape[0] == 1 or bool((rows == rows[0]).all()):
        k = int(rows[0]) if a.shape[0] > 1 else 0
        return (x @ a[k]) @ b[k]  # one row for the whole batch (the on-device case): no gather
    xb = x.reshape(x.shape[0], -1, x.shape[-1])
    y = torch.bmm(torch.bmm(xb, a[rows]), b[rows])
    return y.reshape(*x.shape[:-1], b.shape[-1])


def _domain_lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """x [B, ..., in] through the factors of each row's domain, a[domain] [in, r], b[domain] [r, out]: every
    domain's product, kept by a one-hot mask. No gather and no branch on the codes, so the same code runs
    under torch.func.vmap with codes that differ per user (the cohort engine); there are only a few domains."""
    if domain is None:
        raise RoutingError("the domain-specific path needs each row's domain code (Routing.domain)")
    y = torch.einsum("b...i,dir,dro->b...do", x, a, b)
    mask = (domain[:, None] == torch.arange(a.shape[0], device=domain.device)).to(x.dtype)
    mask = mask.reshape(mask.shape[0], *([1] * (x.dim() - 2)), a.shape[0], 1)
    return (y * mask).sum(-2)


def _slot_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-example rows t[rows] of a per-slot tensor [U, ...]; one row (broadcast) when the batch has one."""
    if t.shape[0] == 1 or bool((rows == rows[0]).all()):
        return t[int(rows[0]) if t.shape[0] > 1 else 0]
    return t[rows]
