"""Which rows of the stacked adapters each example uses: group values from the profile, user slots from the
user id, set by a forward pre-hook on the adapted model or explicitly with `use_routing`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from ..config import ConfigError
from ..errors import FedpaError, RoutingError  # noqa: F401  (RoutingError: imported from here too)
from ..functional import check_domains, check_group_rows  # noqa: F401  (check_domains: from here too)
from .config import FedPAConfig


@dataclass
class Routing:
    """Per-example routing for one forward: group rows [B, G], user slots [B] and domain codes [B]."""

    group_index: torch.Tensor | None = None
    user_slot: torch.Tensor | None = None
    domain: torch.Tensor | None = None


class RoutingState:
    """Shared by all FedPA layers of one adapted model (not a module, not saved)."""

    def __init__(self, config: FedPAConfig):
        self.config = config
        self.current: Routing | None = None
        self.override: Routing | None = None
        self.paths: set[str] | None = None
        self.slot_ids: torch.Tensor | None = None  # sorted user ids
        self.slot_of: torch.Tensor | None = None   # their slots
        self.columns = [config.user_fields.index(a) for a in config.group_attributes]

    # The hooks are bound methods (not closures) so that copy.deepcopy of an adapted model yields a
    # copy whose hooks and layers share one *copied* state.
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        profile = kwargs.get("user_profile", args[0] if args else None)
        self.current = self.route(profile, kwargs.get("user_id"), kwargs.get("domain"))

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.current = None  # a layer called outside a routed forward fails loudly instead of reusing stale rows

    def route(self, user_profile: torch.Tensor | None, user_id: torch.Tensor | None,
              domain: torch.Tensor | None = None) -> Routing:
        if self.override is not None:
            return self.override
        cfg = self.config
        if cfg.domain_values:
            if domain is None:
                raise RoutingError("this adapter has a domain-specific path: pass batch['domain'] (each row's domain "
                                   "code) or route explicitly with use_routing(..., domain=...)")
            domain = check_domains(domain, cfg.domain_values)
        group_index = None
        if self.columns:
            if user_profile is None:
                raise RoutingError("group adapters need batch['user_profile'] to route examples")
            group_index = user_profile[:, self.columns].long()
            check_group_rows(group_index, cfg.group_attributes, cfg.group_vocab)
        slot = None
        if self.uses_slots:
            n = user_profile.shape[0] if user_profile is not None else (user_id.shape[0] if user_id is not None else 0)
            if cfg.user_slots == 1:
                slot = torch.zeros(n, dtype=torch.long, device=_device_of(user_profile, user_id))
            elif user_id is None or self.slot_ids is None:
                raise RoutingError(f"this adapter stacks {cfg.user_slots} users: pass batch['user_id'] and call "
                                   "set_user_slots(model, user_ids), or route explicitly with use_routing(...)")
            else:
                uid = user_id.long().to(self.slot_ids.device)
                pos = torch.searchsorted(self.slot_ids, uid).clamp(max=len(self.slot_ids) - 1)
                hit = self.slot_ids[pos] == uid
                if not bool(hit.all()):
                    raise RoutingError(f"user id {int(uid[~hit][0])} has no adapter slot in this model")
                slot = self.slot_of[pos].to(user_id.device)
        return Routing(group_index=group_index, user_slot=slot, domain=domain)

    @property
    def uses_slots(self) -> bool:
        return self.config.use_user_adapter or self.config.head == "private"


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    for t in tensors:
        if t is not None:
            return t.device
    return torch.device("cpu")


def routing_state(model: nn.Module) -> RoutingState:
    state = getattr(foundation_of(model), "_fedpa_routing", None)
    if state is None:
        raise FedpaError("this model has no FedPA adapters (use attach_adapters / load_adapters)")
    return state


def foundation_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def remove_routing_hooks(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), RoutingState)]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)


def set_user_slots(model: nn.Module, user_ids: Sequence[int] | torch.Tensor) -> None:
    """Slot i of the stacked user adapters serves ``user_ids[i]`` (routing by ``batch['user_id']``)."""
    state = routing_state(model)
    ids = torch.as_tensor(list(user_ids) if not isinstance(user_ids, torch.Tensor) else user_ids).long().flatten()
    if len(ids) > state.config.user_slots:
        raise RoutingError(f"{len(ids)} users for {state.config.user_slots} adapter slots")
    if len(torch.unique(ids)) != len(ids):
        raise RoutingError("user ids for adapter slots must be distinct")
    order = torch.argsort(ids)
    state.slot_ids, state.slot_of = ids[order], order


@contextlib.contextmanager
def use_routing(model: nn.Module, group_index: torch.Tensor | None = None,
                user_slot: torch.Tensor | None = None, domain: torch.Tensor | None = None) -> Iterator[None]:
    """Route the forwards inside the block explicitly (group rows [B, G], user slots [B], domain codes [B]).
    Inside a vmapped function the domain codes may be batched: they are then taken as given (checked by the
    caller), since a check would read their values."""
    state = routing_state(model)
    prev = state.override
    state.override = Routing(group_index=None if group_index is None else group_index.long(),
                             user_slot=None if user_slot is None else user_slot.long(),
                             domain=None if domain is None else domain.long())
    try:
        yield
    finally:
        state.override = prev


def set_active_paths(model: nn.Module, paths: Iterable[str] | None) -> None:
    """Restrict forwards to some adapter paths ("user", "global", "group" or "group:<attr>"); None = all.

    Ditto uses ("global",) for the global objective and ("user",) for the personal one.
    """
    state = routing_state(model)
    if paths is None:
        state.paths = None
        return
    allowed = set(state.config.path_names) | {"group"}
    paths = set(paths)
    unknown = paths - allowed
    if unknown:
        raise ConfigError(f"unknown adapter path(s) {', '.join(sorted(unknown))}; this adapter has "
                          f"{', '.join(state.config.path_names)}")
    state.paths = paths
