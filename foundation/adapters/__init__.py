"""FedPA adapters on the frozen foundation, as a peft tuner (split the way peft splits `tuners/lora`).

- `config`    FedPAConfig (a peft LoraConfig with FedPA's fields), the algorithm PRESETS, adapter_config(...)
- `routing`   which adapter rows an example uses (group values, user slots): set_user_slots, use_routing,
              set_active_paths
- `layer`     FedPALinear, the peft layer with gated user / group / global paths (and the per-user head)
- `model`     attach_adapters / save_adapters / load_adapters, ditto_penalty
- `exchange`  parameter_kinds (frozen / private / shared), extract_* / load_* of what a client exchanges
- `merge`     merge_for_user: one user's dense model for export

Design notes (the formula, how it plugs into peft, initialisation, what travels): docs/design/adapters.md
"""

from .config import (
                     ADAPTER_CONFIG_NAME,
                     ADAPTER_WEIGHTS_NAME,
                     HEAD_MODES,
                     HEAD_MODULE,
                     MAX_GROUP_VALUES,
                     PRESETS,
                     FedPAConfig,
                     adapter_config,
                     default_group_attributes,
                     default_target_modules,
)
from .exchange import (
                     Kind,
                     extract_private,
                     extract_shared,
                     load_private,
                     load_shared,
                     normalise_groups,
                     parameter_kinds,
)
from .layer import FedPALinear, GateMLP
from .merge import GatedPathsLinear, merge_for_user
from .model import attach_adapters, ditto_penalty, load_adapters, save_adapters
from .routing import Routing, RoutingError, set_active_paths, set_user_slots, use_routing

__all__ = [
    "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "HEAD_MODES", "HEAD_MODULE", "MAX_GROUP_VALUES", "PRESETS",
    "FedPAConfig", "FedPALinear", "GateMLP", "GatedPathsLinear", "Kind", "Routing", "RoutingError",
    "adapter_config", "attach_adapters", "default_group_attributes", "default_target_modules", "ditto_penalty",
    "extract_private", "extract_shared", "load_adapters", "load_private", "load_shared", "merge_for_user",
    "normalise_groups", "parameter_kinds", "save_adapters", "set_active_paths", "set_user_slots", "use_routing",
]
