"""FedPA adapters on the frozen foundation, through peft.

Public API::

    FedPAConfig(peft.LoraConfig)                 # LoRA config + FedPA fields (saved in adapter_config.json)
    adapter_config(foundation_config, preset="fedpa", **overrides) -> FedPAConfig
    PRESETS: fedpa | fedavg-lora | fedper | ditto | local
    attach_adapters(foundation, config | preset, **overrides) -> peft.PeftModel
    save_adapters(model, out_dir) / load_adapters(foundation, adapter_dir, *, trainable=True) -> PeftModel
    set_user_slots(model, user_ids)               # slot i serves user_ids[i] (routing by batch["user_id"])
    use_routing(model, group_index=None, user_slot=None)   # context manager: explicit per-example routing
    set_active_paths(model, paths | None)         # e.g. ("user",) / ("global",) for Ditto's two objectives
    parameter_kinds(model) -> dict[str, Kind]     # frozen / private / shared (+ group key)
    extract_shared(model, group_values) -> dict[str, Tensor];  load_shared(model, tensors)
    extract_private(model, slot=0) -> dict[str, Tensor];       load_private(model, tensors, slot=0)
    ditto_penalty(model) -> Tensor                # sum ||user - global||^2 over LoRA factors
    merge_for_user(model, user_slot=0, group_values=None) -> FoundationModel (plain torch, no peft)
    FedPALinear                                   # the custom peft LoRA layer (nn.Linear targets)

How FedPA plugs into peft
-------------------------
peft 0.21's supported extension point for new LoRA layer types is
``LoraConfig._register_custom_module({nn.Linear: FedPALinear})`` (LoraModel's
dispatcher tries registered custom classes first). `FedPAConfig` is a dataclass
subclass of `LoraConfig` that registers `FedPALinear` in ``__post_init__`` and
adds the FedPA fields, so peft's own machinery does the rest unchanged:
target matching and injection (``get_peft_model``), freezing everything that is
not on a tuner layer, ``modules_to_save`` for the trainable prediction head,
the on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``,
keys with the adapter name removed) and loading (``set_peft_model_state_dict``).
`FedPALinear` subclasses peft's ``LoraLayer`` and declares its extra
parameter containers in ``adapter_layer_names`` (all keyed by adapter name), so
peft's structural state-dict selection saves and reloads them. The global path
(``fedavg-lora`` / ``ditto``) *is* peft's own ``lora_A``/``lora_B`` pair.
A stock ``PeftConfig.from_pretrained`` would drop the FedPA fields (with a
warning) because peft's PeftType enum is closed; ``load_adapters`` reads the
file as a `FedPAConfig`.

The layer (per adapted nn.Linear W, b with input x; s = lora_alpha / r)
---------------------------------------------------------------------
Paths k = 0..K-1: base (k = 0), user (if enabled), one per group attribute j in
``group_attributes`` order, global (if enabled). Path k's low-rank delta is
D_k(x) = s · x A_k B_k (D_0 = 0); A_user = A_u[slot], A_group j = A_{j, v_j}.

    gate:   g(x) = softmax(W2 · ReLU(W1 · x + b1) + b2) over the K = 1 + P paths     (use_gate)
    output: y = Σ_k g_k(x) · (W x + b + D_k(x))  =  W x + b + Σ_{k>=1} g_k(x) · D_k(x)   (gate)
            y = W x + b + (1/P) Σ_{k>=1} D_k(x)                                        (no gate)

(P = number of adapter paths; the identity Σ g_k = 1 gives the right-hand form,
which is what the layer computes: the base matmul once, plus P low-rank terms.)

i.e. every path contains the frozen base transform and the paths are mixed
*before* the foundation's own activation (which stays where the tower puts
it). Why this and not the release's x' = g0·ReLU(Wx+b) + g1·u + Σ g_{1+j}·h_j:
(1) with B = 0 the adapted model equals the frozen foundation *exactly, for any
gate value* (the release's uniform gate would scale the pre-trained output by
1/K and break it); (2) each path is a standard LoRA-adapted linear layer, so
the layer targets plain nn.Linear (peft's normal dispatch), works on the output
layer too, and with one path and no gate it *is* LoRA (fedavg-lora equals
stock peft LoRA numerically); (3) it merges: path k is the dense layer
(W + ΔW_k, b), so a user's model is K dense layers plus the gate
(`merge_for_user`). Without a gate the deltas are averaged over the adapter
paths (fixed uniform mix; the base keeps weight 1) so that a single-path
variant is exactly LoRA rather than LoRA at half scale.

Defaults: r = 4 (the release's rank), lora_alpha = 4, so s = α/r = 1: the delta
is not rescaled, hence a learning rate means the same thing for every rank
(with Adam, the release's α = 1 only divides the adapters' effective learning
rate by 4). A ~ kaiming-uniform (peft's LoRA default, bound 1/sqrt(in)), B = 0
(standard), gate = nn.Linear default init. At step 0 only the B factors get a
gradient (A's gradient is ∝ B, the gate's is ∝ the spread between paths, both 0);
after one optimiser step every factor and the gate have non-zero gradients.

User shift (``use_user_shift``, off by default): the layer named ``user_shift_module`` (the first
target, the one that reads the tower's input) adds a private per-user vector s_u (zero at init) to
its input before the base, the paths and the gate read it: x' = x + s_u. It plays the role of the
release's private user embeddings (each client keeps and trains its own copy of its input
embedding); every reader of x is affine in x at that point, so it folds into biases when merging.

Routing: each forward needs, per example, the row of every group attribute
(its profile value, read from ``user_profile`` by a forward pre-hook on the
foundation) and a user slot. A model holds ``user_slots`` U user adapters
stacked as [U, in, r] / [U, r, out]; U = 1 on a device (every example uses slot
0), U > 1 serves a stack of users in one forward: ``set_user_slots`` maps
``batch["user_id"]`` to slots, or ``use_routing`` passes explicit indices.
Group adapters are stacked per attribute as [V_j, in, r] / [V_j, r, out] (V_j =
the attribute's vocabulary). Rows are gathered per example; when a batch uses
one row (the device case) the gather is skipped.

Caveat for stacked simulation: only user adapters (and a private head) are per
slot. Gate, shared head and group rows are single tensors, so one optimiser
step on a cohort forward trains them jointly (like centralized training), not
like K clients training local copies before averaging (for that, give each
client its own parameter copies, e.g. ``torch.func.functional_call``, which
works with these layers). Adam's moments also keep moving the rows of a slot
that is absent from a batch.

Head (``head``; the module is ``head_module``, default ``tower.head``): "shared" (default, FedPA) = peft ``modules_to_save`` copy of
``tower.head``, trained and exchanged; "private" (FedPer, local) = the head
gets a FedPALinear in private-head mode holding per-slot *deltas* [U, out, in]
and [U, out] added to the frozen head (zero at init); "frozen" = unchanged.
User bias (``use_user_bias``, shared head only, off by default): the head becomes a FedPALinear in
"shared head" mode instead: one shared delta ``lora_head_shared_w`` [1, out, in] /
``lora_head_shared_b`` [1, out] (exchanged like the shared copy it replaces) plus private per-slot
logit offsets ``lora_user_bias`` [U, out], folded into the head's bias when merging. A client sets them from its own labels before its first local step
(`recmodels.personalization.calibrated_bias`).

Presets: fedpa (user + groups + gate, shared head), fedavg-lora (one global
LoRA, all shared), fedper (global LoRA + private head), ditto (global + user
LoRA, no gate; train the global objective with ``set_active_paths(m,
["global"])`` and the personal one with ``["user"]`` + ``ditto_penalty``),
local (user LoRA + private head, nothing shared). Any flag can be overridden.

Merging (`merge_for_user`): for one user slot and its group values each FedPA
layer becomes either one nn.Linear (no gate: W + mean ΔW over the active paths)
or a `GatedPathsLinear`: one nn.Linear in -> K·out holding [W; W+ΔW_user;
W+ΔW_{j,v_j}; ...] plus the gate MLP, output Σ_k softmax(gate(x))_k (W_k x + b).
The softmax depends on x, so no single matrix can represent it; this is the
exact function with plain linear layers (tested to 1e-5), quantizable and ONNX
exportable (set ``dedupe_histories = False`` on the merged model first).

Exchange names (`parameter_kinds`, `extract_*`, `load_*`) are stable across
peft versions and adapter names: the foundation module path plus the LoRA
attribute, e.g. ``tower.fc1.lora_gate_fc1.weight``, ``tower.fc1.lora_user_A``,
``tower.fc1.lora_group_B.age=3`` (one entry per (attribute, value) row),
``tower.fc1.lora_A.weight`` (global path), ``tower.head.modules_to_save.weight``
(the trainable head copy); frozen foundation parameters keep their own names
(``tower.fc1.weight``, ``tower.head.weight``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora.layer import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .checkpoint import CheckpointError, replace_dir, seal_safetensors, verify_safetensors
from .config import ConfigError, FoundationConfig
from .errors import FedpaError
from .model import FoundationModel

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
HEAD_MODULE = "tower.head"
HEAD_MODES = ("shared", "private", "frozen")
MAX_GROUP_VALUES = 4096  # one LoRA pair per value: an id-like attribute would explode the adapter
_PEFT_PREFIX = "base_model.model."


class RoutingError(FedpaError):
    """A batch cannot be routed to adapters (unknown user, group value out of range, ...)."""


# ============================================================================ config


@dataclass
class FedPAConfig(LoraConfig):
    """peft LoraConfig plus FedPA's fields; registers `FedPALinear` for nn.Linear targets.

    FedPA fields: ``variant`` (preset name, informational), ``user_fields`` (the
    foundation's profile column order), ``group_attributes`` (subset of
    user_fields) and ``group_vocab`` (rows per attribute), ``user_slots`` (U),
    ``use_user_adapter``, ``use_group_adapters``, ``use_global_adapter``,
    ``use_gate``, ``gate_hidden``, ``head`` ("shared" = trainable, exchanged, like
    FedPA; "private" = one head per user slot, never leaves the client (FedPer);
    "frozen" = the foundation's head).
    """

    variant: str = field(default="fedpa", metadata={"help": "FedPA preset this config was built from"})
    user_fields: list = field(default_factory=list, metadata={"help": "foundation profile columns, in order"})
    group_attributes: list = field(default_factory=list, metadata={"help": "profile fields with group adapters"})
    group_vocab: dict = field(default_factory=dict, metadata={"help": "values per group attribute"})
    user_slots: int = field(default=1, metadata={"help": "user adapters stacked in one model"})
    use_user_adapter: bool = field(default=True, metadata={"help": "private per-user LoRA path"})
    use_group_adapters: bool = field(default=True, metadata={"help": "shared per-(attribute, value) LoRA paths"})
    use_global_adapter: bool = field(default=False, metadata={"help": "one globally shared LoRA path"})
    use_gate: bool = field(default=True, metadata={"help": "input-dependent softmax gate over paths"})
    gate_hidden: int = field(default=16, metadata={"help": "hidden width of the gate MLP"})
    head: str = field(default="shared", metadata={"help": "prediction head: shared | private | frozen"})
    head_module: str = field(default=HEAD_MODULE, metadata={"help": "module path of the prediction head"})
    use_user_shift: bool = field(default=False, metadata={
        "help": "private per-user offset of the first adapted layer's input (the release keeps user embeddings "
                "on the client)"})
    user_shift_module: str = field(default="", metadata={"help": "the module whose input is shifted"})
    use_user_bias: bool = field(default=False, metadata={
        "help": "private per-user offset of every output logit, beside a shared head (needs head = shared)"})

    def __post_init__(self):
        super().__post_init__()
        self.user_fields = list(self.user_fields or [])
        self.group_attributes = list(self.group_attributes or []) if self.use_group_adapters else []
        self.group_vocab = {str(k): int(v) for k, v in (self.group_vocab or {}).items()}
        self._register_custom_module({nn.Linear: FedPALinear})

    def fedpa_validate(self) -> None:
        if self.head not in HEAD_MODES:
            raise ConfigError(f"head must be one of {HEAD_MODES}, got {self.head!r}")
        if int(self.user_slots) < 1:
            raise ConfigError(f"user_slots must be >= 1, got {self.user_slots}")
        unknown = [a for a in self.group_attributes if a not in self.user_fields]
        if unknown:
            raise ConfigError(f"group attribute(s) {', '.join(unknown)} are not profile fields "
                              f"({', '.join(self.user_fields) or 'none'})")
        novocab = [a for a in self.group_attributes if int(self.group_vocab.get(a, 0)) < 1]
        if novocab:
            raise ConfigError(f"group_vocab has no size for group attribute(s) {', '.join(novocab)}")
        huge = [f"{a} ({self.group_vocab[a]})" for a in self.group_attributes if self.group_vocab[a] > MAX_GROUP_VALUES]
        if huge:
            raise ConfigError(f"group attribute(s) {', '.join(huge)} have more than {MAX_GROUP_VALUES} values; "
                              "group adapters are meant for bucketed attributes (one adapter per value)")
        if not (self.use_user_adapter or self.group_attributes or self.use_global_adapter):
            raise ConfigError("an adapter needs at least one path (user, group or global)")
        if self.r < 1:
            raise ConfigError(f"rank r must be >= 1, got {self.r}")
        if self.use_user_bias and self.head != "shared":
            raise ConfigError(f"use_user_bias goes with a shared head (head = {self.head!r}: a private head "
                              "already has a per-user bias, a frozen one has nothing to offset)")

    @property
    def path_names(self) -> list[str]:
        """Adapter paths in gate order (after the base path): user, group:<attr>..., global."""
        names = ["user"] if self.use_user_adapter else []
        names += [f"group:{a}" for a in self.group_attributes]
        names += ["global"] if self.use_global_adapter else []
        return names

    @classmethod
    def from_json_file(cls, path: str | Path) -> FedPAConfig:
        """Read an ``adapter_config.json`` written by `save_adapters` (CheckpointError if unusable)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (not an adapter directory)") from None
        except Exception as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        if raw.get("peft_type") != "LORA" or "group_attributes" not in raw:
            raise CheckpointError(f"{path}: not a FedPA adapter config (peft_type LORA with FedPA fields expected)")
        known = {f.name for f in fields(cls) if f.init}
        try:
            cfg = cls(**{k: v for k, v in raw.items() if k in known})
            cfg.fedpa_validate()
        except Exception as e:
            raise CheckpointError(f"{path}: invalid FedPA adapter config ({e})") from e
        return cfg


PRESETS: dict[str, dict[str, Any]] = {
    # FedPA: private user path + shared group paths + shared gate, shared head.
    "fedpa": dict(use_user_adapter=True, use_group_adapters=True, use_global_adapter=False, use_gate=True,
                  head="shared"),
    # FedAvg of one ordinary LoRA adapter: everything shared.
    "fedavg-lora": dict(use_user_adapter=False, use_group_adapters=False, use_global_adapter=True, use_gate=False,
                        head="shared"),
    # FedPer-style: shared LoRA body, private head.
    "fedper": dict(use_user_adapter=False, use_group_adapters=False, use_global_adapter=True, use_gate=False,
                   head="private"),
    # Ditto: a global (shared) LoRA and a personal (private) LoRA; set_active_paths picks one per objective.
    "ditto": dict(use_user_adapter=True, use_group_adapters=False, use_global_adapter=True, use_gate=False,
                  head="shared"),
    # Local only: a private LoRA and a private head, nothing shared.
    "local": dict(use_user_adapter=True, use_group_adapters=False, use_global_adapter=False, use_gate=False,
                  head="private"),
}


def default_target_modules(foundation_config: FoundationConfig) -> list[str]:
    """The prediction tower's hidden layers (``tower.fc1`` ...)."""
    hidden = foundation_config.tower_hidden if foundation_config.arch == "transformer" else foundation_config.mlp_hidden
    return [f"tower.fc{i + 1}" for i in range(len(hidden))]


def default_group_attributes(foundation_config: FoundationConfig, max_values: int = 64, limit: int = 2) -> list[str]:
    """The first ``limit`` profile fields that look like bucketed attributes (as in the release): at most
    ``max_values`` values and not an id column (``*_id``, e.g. device_id, is not a user group)."""
    return [f for f in foundation_config.user_fields
            if not f.endswith("_id") and foundation_config.user_vocab[f] <= max_values][:limit]


def adapter_config(foundation_config: FoundationConfig, preset: str = "fedpa", **overrides: Any) -> FedPAConfig:
    """A `FedPAConfig` for ``foundation_config`` from a preset (see PRESETS), with overrides.

    Defaults: r=4, lora_alpha=4, target_modules = the tower's hidden layers,
    group_attributes = `default_group_attributes` (when the preset uses groups).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown adapter preset {preset!r}; choose one of {', '.join(PRESETS)}")
    kw: dict[str, Any] = dict(r=4, lora_alpha=4, lora_dropout=0.0, bias="none",
                              target_modules=default_target_modules(foundation_config))
    kw.update(PRESETS[preset])
    kw.update(overrides)
    if kw.get("use_group_adapters") and "group_attributes" not in overrides:
        kw["group_attributes"] = default_group_attributes(foundation_config)
    groups = list(kw.get("group_attributes") or []) if kw.get("use_group_adapters") else []
    missing = [a for a in groups if a not in foundation_config.user_vocab]
    if missing:
        raise ConfigError(f"group attribute(s) {', '.join(missing)} are not profile fields of the foundation "
                          f"({', '.join(foundation_config.user_fields)})")
    kw["group_attributes"] = groups
    kw["group_vocab"] = {a: int(foundation_config.user_vocab[a]) for a in groups}
    kw["user_fields"] = list(foundation_config.user_fields)
    if kw.get("use_user_shift") and not kw.get("user_shift_module"):
        kw["user_shift_module"] = list(kw["target_modules"])[0]  # the layer that reads the model's input
    head = kw.get("head", "shared")
    head_module = kw.setdefault("head_module", HEAD_MODULE)
    targets = list(kw["target_modules"])
    # a private head, or a shared one carrying per-user biases, is a FedPALinear in "head" mode
    head_layer = head == "private" or (head == "shared" and kw.get("use_user_bias"))
    if head_layer and head_module not in targets:
        targets.append(head_module)
    kw["target_modules"] = targets
    kw["modules_to_save"] = [head_module] if head == "shared" and not head_layer else None
    kw["variant"] = preset
    cfg = FedPAConfig(**kw)
    cfg.fedpa_validate()
    return cfg


# ============================================================================ routing


@dataclass
class Routing:
    """Per-example routing for one forward: group rows [B, G] and user slots [B]."""

    group_index: torch.Tensor | None = None
    user_slot: torch.Tensor | None = None


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
        self.current = self.route(profile, kwargs.get("user_id"))

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.current = None  # a layer called outside a routed forward fails loudly instead of reusing stale rows

    def route(self, user_profile: torch.Tensor | None, user_id: torch.Tensor | None) -> Routing:
        if self.override is not None:
            return self.override
        cfg = self.config
        group_index = None
        if self.columns:
            if user_profile is None:
                raise RoutingError("group adapters need batch['user_profile'] to route examples")
            group_index = user_profile[:, self.columns].long()
            for j, a in enumerate(cfg.group_attributes):
                col, v = group_index[:, j], cfg.group_vocab[a]
                bad = (col < 0) | (col >= v)
                if bool(bad.any()):
                    raise RoutingError(f"profile field '{a}' has value {int(col[bad][0])} outside the "
                                       f"{v} values the group adapters were built for (0..{v - 1})")
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
        return Routing(group_index=group_index, user_slot=slot)

    @property
    def uses_slots(self) -> bool:
        return self.config.use_user_adapter or self.config.head == "private"


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    for t in tensors:
        if t is not None:
            return t.device
    return torch.device("cpu")


def _routing_state(model: nn.Module) -> RoutingState:
    state = getattr(_foundation_of(model), "_fedpa_routing", None)
    if state is None:
        raise FedpaError("this model has no FedPA adapters (use attach_adapters / load_adapters)")
    return state


def _foundation_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _remove_routing_hooks(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), RoutingState)]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)


def _bind_routing(peft_model: PeftModel, config: FedPAConfig) -> RoutingState:
    base = peft_model.get_base_model()
    _remove_routing_hooks(base)
    state = RoutingState(config)
    base.register_forward_pre_hook(state.pre_hook, with_kwargs=True)
    base.register_forward_hook(state.post_hook, with_kwargs=True)
    base._fedpa_routing = state
    for m in base.modules():
        if isinstance(m, FedPALinear):
            m.routing = state
    return state


def set_user_slots(model: nn.Module, user_ids: Sequence[int] | torch.Tensor) -> None:
    """Slot i of the stacked user adapters serves ``user_ids[i]`` (routing by ``batch['user_id']``)."""
    state = _routing_state(model)
    ids = torch.as_tensor(list(user_ids) if not isinstance(user_ids, torch.Tensor) else user_ids).long().flatten()
    if len(ids) > state.config.user_slots:
        raise RoutingError(f"{len(ids)} users for {state.config.user_slots} adapter slots")
    if len(torch.unique(ids)) != len(ids):
        raise RoutingError("user ids for adapter slots must be distinct")
    order = torch.argsort(ids)
    state.slot_ids, state.slot_of = ids[order], order


@contextlib.contextmanager
def use_routing(model: nn.Module, group_index: torch.Tensor | None = None,
                user_slot: torch.Tensor | None = None) -> Iterator[None]:
    """Route the forwards inside the block explicitly (group rows [B, G], user slots [B])."""
    state = _routing_state(model)
    prev = state.override
    state.override = Routing(group_index=None if group_index is None else group_index.long(),
                             user_slot=None if user_slot is None else user_slot.long())
    try:
        yield
    finally:
        state.override = prev


def set_active_paths(model: nn.Module, paths: Iterable[str] | None) -> None:
    """Restrict forwards to some adapter paths ("user", "global", "group" or "group:<attr>"); None = all.

    Ditto uses ("global",) for the global objective and ("user",) for the personal one.
    """
    state = _routing_state(model)
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


# ============================================================================ the layer


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
        "lora_head_shared_w", "lora_head_shared_b",
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
        return out * scale

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
        r = factors[0][0].shape[-1]
        a_cat = torch.cat([a for a, _ in factors], dim=-1)               # [in, K r]
        fuse_gate = spec.use_gate and xd is x  # no dropout: the gate's first layer joins the same product
        if fuse_gate:
            fc1 = self.lora_gate_fc1[adapter]
            h_all = x @ torch.cat([a_cat, fc1.weight.t()], dim=-1)
            h = h_all[..., :a_cat.shape[-1]]                             # [..., K r]
            logits = self.lora_gate_fc2[adapter](F.relu(h_all[..., a_cat.shape[-1]:] + fc1.bias))
        else:
            h = xd @ a_cat
        if spec.use_gate:
            if not fuse_gate:
                logits = self.gate_logits(adapter, x)                    # [..., 1 + P]
            if not all(active):
                keep = torch.tensor([True, *active], device=x.device)
                logits = logits.masked_fill(~keep, float("-inf"))
            cols = [k + 1 for k, on in enumerate(active) if on]
            g = logits.softmax(-1)[..., cols]                            # [..., K]
            h = h * g.repeat_interleave(r, dim=-1)
        else:
            h = h / len(factors)
        return (h @ torch.cat([b for _, b in factors], dim=-2)) * self.scaling[adapter]

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


def _slot_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-example rows t[rows] of a per-slot tensor [U, ...]; one row (broadcast) when the batch has one."""
    if t.shape[0] == 1 or bool((rows == rows[0]).all()):
        return t[int(rows[0]) if t.shape[0] > 1 else 0]
    return t[rows]


# ============================================================================ attach / save / load


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
    _bind_routing(model, config)
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


# ============================================================================ kinds / exchange


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
    cfg = _routing_state(model).config
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
                               ("lora_head_shared_w", "shared"), ("lora_head_shared_b", "shared")):
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
                kinds[f"{short}.modules_to_save.{n}"] = Kind("shared" if cfg.head == "shared" else "private", param=pname)
                covered.add(pname)
    for pname, _ in model.named_parameters():
        if pname not in covered:  # the foundation, under its own parameter name
            kinds[_short(pname).replace(".base_layer.", ".").replace(".original_module.", ".")] = Kind("frozen", param=pname)
    return kinds


def _normalise_groups(cfg: FedPAConfig, group_values: Mapping[str, int] | Sequence[int] | torch.Tensor | None
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
    cfg = _routing_state(model).config
    groups = _normalise_groups(cfg, group_values)
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


# ============================================================================ merging


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
                   group_values: Mapping[str, int] | Sequence[int] | torch.Tensor | None = None) -> FoundationModel:
    """A dense FoundationModel computing exactly what the adapted model computes for one user.

    Per FedPA layer: without a gate everything folds into one nn.Linear
    (W + mean_k ΔW_k over the active paths); with a gate the layer becomes a
    `GatedPathsLinear` holding the K dense path weights (W, W+ΔW_user,
    W+ΔW_{j,v_j}, ...) in one nn.Linear plus the gate (an input-dependent softmax
    cannot be folded into a single matrix). The trained head (shared copy or this
    user's private slot) replaces the foundation's. No peft, no routing: call it
    with ``model(**batch)`` for batches of this user.
    """
    state = _routing_state(model)
    cfg = state.config
    groups = _normalise_groups(cfg, group_values)
    merged = copy.deepcopy(model.get_base_model())
    merged.__dict__.pop("_fedpa_routing", None)
    _remove_routing_hooks(merged)
    adapter = "default" if "default" in model.peft_config else next(iter(model.peft_config))
    for name, mod in list(merged.named_modules()):
        if isinstance(mod, FedPALinear):
            _set_module(merged, name, _fold_layer(mod, adapter, user_slot, groups, cfg, state.paths))
        elif isinstance(mod, ModulesToSaveWrapper):
            _set_module(merged, name, copy.deepcopy(mod.modules_to_save[adapter]))
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


def _fold_layer(layer: FedPALinear, adapter: str, slot: int, groups: dict[str, int], cfg: FedPAConfig,
                paths_filter: set[str] | None) -> nn.Module:
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
