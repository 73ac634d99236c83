"""The `fedpa` command line: one module per command (`fedpa data …` in `data`); `common` holds what they
share, including the options every federation command derives from `FederationConfig`."""

from . import cache, compare, data, demo, deploy, device, export, funnel, pretrain, privacy_sweep, simulate  # noqa: F401,E501
from .common import app

__all__ = ["app"]
