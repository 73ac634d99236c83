"""The federation's configuration: one dataclass, read from Flower's run config.

Keys are the field names with dashes (``num-rounds``), as Flower's
``[tool.flwr.app.config]`` and ``flwr run . --run-config`` spell them. The
server validates the whole configuration before round 1 and sends the part
clients need inside every instruction, so that `flwr run .`, `fedpa simulate`
and a deployed SuperNode all see the same values.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedpa.foundation.config import CATEGORICAL_ITEM_FIELDS
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import load_foundation
from fedpa.recmodels.personalization import ALGORITHMS, PersonalModel, get_algorithm
from fedpa.recmodels.stages.pointwise import FEDERATED_STAGES, load_stage_host

from .aggregation import ROBUST_METHODS


class ConfigValueError(FedpaError):
    pass


DP_MODES = ("central", "distributed", "local")
COHORT_ENGINES = ("vectorized", "loop")


@dataclass
class FederationConfig:
    data_dir: str = "data/small"
    foundation: str = "runs/foundation"
    run_dir: str = "runs/simulate"
    algorithm: str = "fedpa"
    num_rounds: int = 10
    clients_per_round: float = 1.0   # <= 1: fraction of clients; > 1: a count
    local_epochs: int = 1
    lr: float = 0.01
    lr_decay: float = 1.0            # round r trains at lr * lr-decay^(r-1): later rounds refine rather than re-fit
    batch_size: int = 64
    rank: int = 4
    group_attributes: str = ""       # comma-separated profile fields; "" = the default (age, gender)
    use_user_adapter: bool = True    # ablations of FedPA
    use_group_adapters: bool = True
    use_gate: bool = True
    use_user_shift: bool = False     # FedPA: a private per-user offset of the tower input (the release's private user embeddings)
    use_user_bias: bool = False      # FedPA: private per-user logit offsets beside the shared head, calibrated on-device
    item_bias_fields: str = ""       # FedPA: shared item-side logit offsets keyed by these item fields (comma-separated), averaged per row
    item_bias_lr: float = 0.0        # their local learning rate (decays with lr-decay); 0 = lr
    item_bias_prior: float = 0.0     # phantom readers per table row in its server-side mean: shrinks rarely read rows
    foundation_logit_scale: float = 1.0  # multiplies the frozen foundation's logits before personalization adds to them
    head: str = ""                   # prediction head: "" = the algorithm's (FedPA: shared) | shared | private | frozen
    ditto_lambda: float = 0.1
    split: str = "by-day"
    negatives: int = 99
    seed: int = 0
    eval_every: int = 1
    min_reply_fraction: float = 0.5
    round_timeout: float = 600.0
    max_clients: int = 0             # 0 = every private user is a client
    federate_open_users: bool = False  # open users are clients too (MRFF's protocol scores every user)
    partition_seed: int = 0          # which users are open / private; fixed across seeds so that the
                                     # foundation (pre-trained on the open users of this seed) never saw a client
    active_top_fraction: float = 0.2
    open_active_fraction: float = 0.8
    open_rest_fraction: float = 0.2
    activity_attribute: str = ""
    active_values: str = ""          # comma-separated ints
    min_nodes: int = 1
    dp_noise_multiplier: float = 0.0  # client-level DP noise multiplier z: 0 = off
    dp_mode: str = "central"         # central (server adds noise) | distributed (clients, needs secagg) | local
    dp_clip: float = 1.0             # L2 bound of one user's shared update
    dp_delta: float = 0.0            # 0 = 1 / number of clients
    dp_max_epsilon: float = 0.0      # privacy budget: stop before a round would exceed it (0 = none)
    robust_aggregation: str = "none"  # none | trimmed-mean | median (per user; not with secagg)
    trim_fraction: float = 0.1       # trimmed mean: share of the largest and of the smallest values dropped
    norm_bound: float = 0.0          # server-side L2 bound of each user's update (0 = none; not with secagg)
    secagg: bool = False             # SecAgg+ over the nodes' contributions (the server sees only the sum)
    personal_store: str = ""         # directory of the encrypted personal store ("" = keep state in memory)
    personal_store_key_file: str = ""
    resume: bool = False             # continue run-dir from its last checkpoint (same configuration)
    feature_cache: str = ""          # root of the simulation's cached tower inputs ("" = ~/.cache/fedpa/features, "none" = off)
    cohort_engine: str = "vectorized"  # a node serving several users trains them: vectorized (recmodels.cohort) | loop
    stage: str = ""                  # personalize a funnel stage head (retrieval | prerank | rank) instead of the foundation's tower
    stage_models: str = ""           # the `fedpa funnel` run directory whose trained stage heads are personalized
    stage_negatives: int = 4         # per request: the stage's own negatives added to a user's rows (recdata.stage_rows)

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> "FederationConfig":
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(k for k in rc if k not in known)
        if unknown:
            raise ConfigValueError(f"unknown configuration key(s): {', '.join(unknown)}")
        kw = {}
        for key, value in rc.items():
            f = known[key]
            kw[f.name] = _coerce(key, value, f.type)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> "FederationConfig":
        """The configuration a run directory was written with (its config.json)."""
        path = Path(run_dir) / "config.json"
        try:
            written = json.loads(path.read_text())
        except OSError:
            raise ConfigValueError(f"{run_dir}: not a run directory (no config.json)") from None
        except ValueError as e:
            raise ConfigValueError(f"{path}: not valid JSON ({e})") from None
        known = {f.name.replace("_", "-") for f in fields(cls)}
        return cls.from_run_config({k: v for k, v in written.items() if k in known})

    def differences(self, written: dict[str, Any], ignore: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Keys (dashed) whose value in ``written`` (a run's config.json) differs from this configuration;
        a key the run predates counts with its default value."""
        defaults = FederationConfig().to_run_config()
        return sorted(k for k, v in self.to_run_config().items()
                      if k not in ignore and written.get(k, defaults[k]) != v)

    def validate(self) -> None:
        def bad(msg):
            raise ConfigValueError(msg)
        if self.algorithm not in ALGORITHMS:
            bad(f"unknown algorithm '{self.algorithm}' (one of {', '.join(ALGORITHMS)})")
        if self.num_rounds < 0:
            bad(f"num-rounds must be >= 0, got {self.num_rounds}")
        if not self.clients_per_round > 0:
            bad(f"clients-per-round must be > 0, got {self.clients_per_round}")
        if self.clients_per_round > 1 and self.clients_per_round != int(self.clients_per_round):
            bad(f"clients-per-round above 1 is a count and must be whole, got {self.clients_per_round}")
        if self.local_epochs < 0:
            bad(f"local-epochs must be >= 0, got {self.local_epochs}")
        if not self.lr > 0:
            bad(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            bad(f"lr-decay must be in (0, 1], got {self.lr_decay}")
        if self.batch_size < 1:
            bad(f"batch-size must be >= 1, got {self.batch_size}")
        if self.rank < 1:
            bad(f"rank must be >= 1, got {self.rank}")
        if self.eval_every < 1:
            bad(f"eval-every must be >= 1, got {self.eval_every}")
        if not 0 < self.min_reply_fraction <= 1:
            bad(f"min-reply-fraction must be in (0, 1], got {self.min_reply_fraction}")
        if self.max_clients < 0:
            bad(f"max-clients must be >= 0, got {self.max_clients}")
        if not self.round_timeout > 0:
            bad(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        if self.min_nodes < 1:
            bad(f"min-nodes must be >= 1, got {self.min_nodes}")
        if self.seed < 0 or self.partition_seed < 0:
            bad(f"seed and partition-seed must be >= 0, got {self.seed}, {self.partition_seed}")
        if self.negatives < 1:
            bad(f"negatives must be >= 1, got {self.negatives}")
        for name in ("active_top_fraction", "open_active_fraction", "open_rest_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.dp_noise_multiplier < 0 or not self.dp_clip > 0 or not 0 <= self.dp_delta < 1 \
                or self.dp_max_epsilon < 0:
            bad("dp-noise-multiplier and dp-max-epsilon must be >= 0, dp-clip > 0 and dp-delta in [0, 1)")
        if self.dp_mode not in DP_MODES:
            bad(f"unknown dp-mode '{self.dp_mode}' ({', '.join(DP_MODES)})")
        if self.dp_mode == "distributed" and self.dp_noise_multiplier > 0 and not self.secagg:
            bad("dp-mode 'distributed' needs secagg: without it the server sees each node's update with only "
                "a fraction of the noise (use dp-mode 'central' or 'local', or turn secagg on)")
        if self.robust_aggregation not in ROBUST_METHODS:
            bad(f"unknown robust-aggregation '{self.robust_aggregation}' ({', '.join(ROBUST_METHODS)})")
        if not 0 <= self.trim_fraction < 0.5:
            bad(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.norm_bound < 0:
            bad(f"norm-bound must be >= 0, got {self.norm_bound}")
        if self.secagg and (self.robust_aggregation != "none" or self.norm_bound > 0):
            bad("robust aggregation and norm bounds need each user's update, and under secure aggregation the "
                "server sees only the sum: turn secagg off, or bound norms on the clients (dp-clip)")
        if self.head not in ("", "shared", "private", "frozen"):
            bad(f"unknown head '{self.head}' (shared, private, frozen; empty = the algorithm's own)")
        if self.cohort_engine not in COHORT_ENGINES:
            bad(f"unknown cohort-engine '{self.cohort_engine}' ({', '.join(COHORT_ENGINES)})")
        if self.stage and self.stage not in FEDERATED_STAGES:
            bad(f"unknown stage '{self.stage}' ({', '.join(FEDERATED_STAGES)}; re-ranking reads whole lists and "
                "stays as trained)")
        if self.stage_negatives < 0:
            bad(f"stage-negatives must be >= 0, got {self.stage_negatives}")
        if self.stage and not self.stage_models:
            bad("stage needs stage-models: the `fedpa funnel` run directory holding the trained stage heads")
        if self.item_bias_lr < 0:
            bad(f"item-bias-lr must be >= 0 (0 = lr), got {self.item_bias_lr}")
        if not self.item_bias_prior >= 0:
            bad(f"item-bias-prior must be >= 0, got {self.item_bias_prior}")
        if not 0 < self.foundation_logit_scale < math.inf:
            bad(f"foundation-logit-scale must be a positive number, got {self.foundation_logit_scale}")
        if self.stage and self.foundation_logit_scale != 1.0:
            bad("foundation-logit-scale scales the foundation's own head; a funnel stage is scored by its own head")
        if self.item_bias_fields:
            unknown = [f for f in self.item_bias_list if f not in CATEGORICAL_ITEM_FIELDS]
            if unknown or not self.item_bias_list:
                bad(f"item-bias-fields: {', '.join(unknown) or 'none given'} (categorical item fields: "
                    f"{', '.join(CATEGORICAL_ITEM_FIELDS)})")
        if self.item_bias_fields and self.algorithm == "fedpa":  # a FedPA option: the others ignore it
            if self.stage:
                bad("item-bias-fields applies to the foundation's scorer, not to a funnel stage's head")
            if self.dp_noise_multiplier > 0 and self.dp_mode == "local":
                bad("item-bias-fields cannot run under local DP: local mode sends counts in the clear, and the "
                    "tables' per-row counts are the items a user read (use dp-mode central or distributed)")
            if self.robust_aggregation != "none" or self.norm_bound > 0:
                bad("item-bias-fields cannot run with robust aggregation (its tables are averaged per row)")
        if self.split not in ("by-day", "chrono", "loo", "last"):
            bad(f"unknown split '{self.split}' (by-day, chrono, loo, last)")

    @property
    def item_bias_list(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.item_bias_fields.split(",") if f.strip())

    def round_lr(self, round_: int) -> float:
        """The local learning rate of training round ``round_`` (1-based)."""
        return self.lr * self.lr_decay ** max(int(round_) - 1, 0)

    def round_item_bias_lr(self, round_: int) -> float | None:
        """The item-side tables' learning rate in round ``round_`` (None: the round's lr)."""
        return self.round_lr(round_) * self.item_bias_lr / self.lr if self.item_bias_lr else None

    def sample_size(self, num_clients: int) -> int:
        if self.clients_per_round <= 1:
            return max(1, math.ceil(self.clients_per_round * num_clients))
        return min(num_clients, int(self.clients_per_round))

    def personal_model(self, algorithm: str | None = None, *, user_slots: int = 1,
                       foundation: Any = None) -> PersonalModel:
        """The model clients train for this run: the foundation's tower, or with ``stage`` that stage's
        trained head over the same tower inputs, with the algorithm's adapters."""
        foundation = foundation if foundation is not None else load_foundation(self.foundation)
        if self.foundation_logit_scale != 1.0:
            foundation.scale_logits(self.foundation_logit_scale)
        host = load_stage_host(foundation, self.stage_models, self.stage) if self.stage else None
        return PersonalModel(foundation, get_algorithm(algorithm or self.algorithm), seed=self.seed,
                             user_slots=user_slots, host=host, **self.model_options())

    def model_options(self) -> dict[str, Any]:
        """`PersonalModel`'s keyword arguments for this run: adapter overrides and item-side tables."""
        kw: dict[str, Any] = {"r": self.rank, "lora_alpha": self.rank}
        if self.head:
            kw["head"] = self.head
        if self.algorithm in ("fedpa", "centralized"):
            kw.update(use_user_adapter=self.use_user_adapter, use_group_adapters=self.use_group_adapters,
                      use_gate=self.use_gate, use_user_shift=self.use_user_shift and self.use_user_adapter)
            if self.use_user_bias and self.algorithm == "fedpa":
                kw["use_user_bias"] = True
            if self.item_bias_fields and self.algorithm == "fedpa":
                kw["item_bias_fields"] = self.item_bias_list
            if self.group_attributes:
                kw["group_attributes"] = [a.strip() for a in self.group_attributes.split(",") if a.strip()]
        return kw


def _coerce(key: str, value: Any, typ: Any) -> Any:
    typ = typ if isinstance(typ, type) else {"int": int, "float": float, "bool": bool, "str": str}[str(typ)]
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError
        if typ is int:
            if isinstance(value, float) and value != int(value):
                raise ValueError
            return int(value)
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigValueError(f"configuration '{key}': {value!r} is not a valid {typ.__name__}") from None
