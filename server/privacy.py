"""Client-level differential privacy in trusted-aggregator mode, with Flower's RDP accountant.

Each user's update (the shared entries it contributes to: global ones and its own groups') is
clipped to L2 norm C on the client. The server adds Gaussian noise to the *sums* before dividing
by the counts. A user changes the vector of sums by at most its clipped delta (norm ≤ C) plus 1 in
each of its 1 + G counts (global + G group attributes), so the L2 sensitivity of the released
vector is S = sqrt(C² + 1 + G), and every coordinate (deltas and counts) gets noise N(0, (z·S)²):
one Gaussian mechanism with noise multiplier z per round. Counts are clamped to ≥ 1 before
dividing (post-processing). Accounting (Flower's RDP accountant) composes one Gaussian event per
round under the add-or-remove-one relation *without* amplification by sampling: a valid, conservative
bound whatever the sampling (a user's presence changes the released sums by at most S in any round
it takes part in). δ defaults to 1 / population.

With secure aggregation on, the server still adds the noise to the unmasked sum: the guarantee
is against everyone who sees the model afterwards, not against the server (distributed noise is
not built).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .aggregation import SharedTensor, count_keys

log = logging.getLogger("fedpa.server")


def clip_delta(delta: dict[str, np.ndarray], spec: list[SharedTensor], groups: set[str],
               clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the entries a user contributes so that their joint L2 norm is at most ``clip``."""
    mine = [t.name for t in spec if t.group is None or t.group in groups]
    norm = math.sqrt(sum(float(np.sum(np.square(delta[n], dtype=np.float64))) for n in mine))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (v * np.float32(scale) if k in mine else v) for k, v in delta.items()}, norm


def sensitivity(clip: float, n_group_attributes: int) -> float:
    return math.sqrt(clip ** 2 + 1 + n_group_attributes)


def add_noise(sums: dict[str, np.ndarray], spec: list[SharedTensor], std: float,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for key in [t.name for t in spec] + list(count_keys(spec)):
        v = np.asarray(sums[key], dtype=np.float64)
        out[key] = v + rng.normal(0.0, std, size=v.shape)
    for key in count_keys(spec):
        out[key] = np.maximum(out[key], 1.0)  # post-processing: never divide by a tiny or negative count
    return out


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
