"""Privacy accounting on the server: each round is one Gaussian event of Flower's RDP accountant, composed
over the run (no amplification by sampling is claimed)."""

from __future__ import annotations

import logging


def event_multiplier(mode: str, noise_multiplier: float) -> float:
    """Noise multiplier of the Gaussian event one round is, under add-or-remove-one."""
    return noise_multiplier / 2.0 if mode == "local" else noise_multiplier


def make_accountant(population: int, delta: float):
    from flwr.serverapp import PrivacyConfig
    from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting warns about orders it skips
    cfg = PrivacyConfig(target_delta=delta, population_size=population,
                        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                        sampling_method=SamplingMethod.NO_AMPLIFICATION)
    return RdpAccountant(cfg)


def round_event(noise_multiplier: float, sample_size: int, population: int):
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=sample_size,
                                population_size=population)
