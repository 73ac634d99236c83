"""Which torch device a computation runs on: ``auto`` (CUDA when torch sees one, else the CPU), ``cpu`` or
``cuda[:N]``. A GPU is never required; asking for one that is not there is refused by name rather than
failing deep inside torch."""

from __future__ import annotations

import torch

from .errors import FedpaError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, setting: str = "--device") -> torch.device:
    """``setting``: what the user set (named in the refusal, so they know what to change)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise FedpaError(f"device '{name}': torch sees no CUDA device here ({build}); use {setting} cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FedpaError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise FedpaError(f"device '{name}' is not one of {', '.join(CHOICES)} (or cuda:N)")
