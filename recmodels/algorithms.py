"""The algorithms' registry: what each one personalizes and shares. No torch here, so that the
configuration and the command line can list the algorithms without importing the model stack; the
models themselves are built by `recmodels.personalization.PersonalModel` from these entries."""

from __future__ import annotations

from dataclasses import dataclass

from fedpa.foundation.errors import FedpaError


@dataclass(frozen=True)
class Algorithm:
    name: str
    preset: str | None            # adapter preset in foundation.adapters.PRESETS; None = no adapters
    communicates: bool = True     # exchanges shared parameters with the server
    ditto: bool = False           # personal path trained with a proximal term to the global path
    finetune_before_eval: bool = False  # PFedRec-style: fine-tune the received shared part locally, then score
    centralized: bool = False     # pooled training outside the federation (upper bound)
    description: str = ""


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in [
    Algorithm("fedpa", "fedpa", description="private user adapter + shared group adapters + shared gate and head"),
    Algorithm("local", "local", communicates=False, description="private LoRA + private head, no communication"),
    Algorithm("fedavg-lora", "fedavg-lora", description="one shared LoRA and head, averaged (FedAvg)"),
    Algorithm("fedper", "fedper", description="shared LoRA body, private head (FedPer)"),
    Algorithm("pfedrec", "fedper", finetune_before_eval=True,
              description="shared LoRA fine-tuned locally before scoring, private head (PFedRec's dual "
                          "personalization)"),
    Algorithm("ditto", "ditto", ditto=True, description="global LoRA (FedAvg) + personal LoRA with a proximal term"),
    Algorithm("foundation", None, communicates=False, description="the frozen foundation, no adaptation"),
    Algorithm("centralized", "fedpa", communicates=False, centralized=True,
              description="FedPA's model trained on pooled private data (upper bound)"),
]}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise FedpaError(f"unknown algorithm '{name}' (one of {', '.join(ALGORITHMS)})")
    return ALGORITHMS[name]
