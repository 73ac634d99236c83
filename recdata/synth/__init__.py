"""The synthetic RecFlow world, fedpa's embedded default dataset: a generative world (users with drifting
interests, items in categories, RecFlow's funnel with its stage samples, calibrated feedback) whose latent
truth is kept for oracle evaluation.

- `config`    SynthConfig, PRESETS (tiny, small, recflow), overrides
- `world`     the latent users and items
- `day`       one day of traffic, and the calibration of feedback rates by a pilot day
- `funnel`    the funnel's stages for a block of requests
- `feedback`  the label model
- `generate`  writing a dataset, atomically
- `oracle`    reading the latent world back

Design notes: docs/design/synthetic-world.md
"""

from .config import PRESETS, SynthConfig, parse_overrides, preset_differences, resolve_config
from .generate import generate
from .oracle import oracle_utility

__all__ = ["PRESETS", "SynthConfig", "generate", "oracle_utility", "parse_overrides", "preset_differences",
           "resolve_config"]
