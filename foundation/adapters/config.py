"""FedPA's adapter configuration: a peft `LoraConfig` with FedPA's fields, the algorithm presets, and the
defaults read off a foundation's config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peft import LoraConfig
from torch import nn

from ..checkpoint import CheckpointError
from ..config import ConfigError, FoundationConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
HEAD_MODULE = "tower.head"
HEAD_MODES = ("shared", "private", "frozen")
MAX_GROUP_VALUES = 4096  # one LoRA pair per value: an id-like attribute would explode the adapter


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
    domain_values: int = field(default=0, metadata={
        "help": "rows of the domain-specific shared path (UniCDR+'s domain-specific part beside the domain-invariant "
                "user and group paths): one LoRA pair per domain code, chosen by each row's domain; 0 = none"})
    use_user_bias: bool = field(default=False, metadata={
        "help": "private per-user offset of every output logit, beside a shared head (needs head = shared)"})

    def __post_init__(self):
        super().__post_init__()
        self.user_fields = list(self.user_fields or [])
        self.group_attributes = list(self.group_attributes or []) if self.use_group_adapters else []
        self.group_vocab = {str(k): int(v) for k, v in (self.group_vocab or {}).items()}
        from .layer import FedPALinear  # the layer reads this config: imported here to avoid a cycle

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
        if not 0 <= int(self.domain_values) <= MAX_GROUP_VALUES or int(self.domain_values) == 1:
            raise ConfigError(f"domain_values must be 0 (no domain path) or 2..{MAX_GROUP_VALUES} (codes 0..n-1), "
                              f"got {self.domain_values}")
        if not (self.use_user_adapter or self.group_attributes or self.use_global_adapter):
            raise ConfigError("an adapter needs at least one path (user, group or global)")
        if self.r < 1:
            raise ConfigError(f"rank r must be >= 1, got {self.r}")
        if self.use_user_bias and self.head != "shared":
            raise ConfigError(f"use_user_bias goes with a shared head (head = {self.head!r}: a private head "
                              "already has a per-user bias, a frozen one has nothing to offset)")

    @property
    def path_names(self) -> list[str]:
        """Adapter paths in gate order (after the base path): user, group:<attr>..., domain, global."""
        names = ["user"] if self.use_user_adapter else []
        names += [f"group:{a}" for a in self.group_attributes]
        names += ["domain"] if self.domain_values else []
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
