"""The discrete Gaussian on SecAgg+'s fixed point: the sampler, its calibration, and a node's share of distributed
noise. numpy only (OpenDP imported when a draw is made), so that a SecAgg+ phase, which imports this, still starts
without torch.

Design notes: docs/design/differential-privacy.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["FRAC_BITS", "MIN_DISCRETE_SIGMA", "DistributedNoise", "discrete_gaussian", "discrete_noise_sigma",
           "integer_sensitivity"]


def discrete_gaussian(sigma: float, size: int) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian N_Z(0, sigma^2) (Canonne, Kamath, Steinke 2020), as
    int64. OpenDP's exact sampler: rejection sampling in rational arithmetic from the float ``sigma``, no
    floating-point shortcut, bits from OpenDP's secure randomness source; what the distributed-DP literature
    (Kairouz, Liu, Steinke 2021) adds to the integers secure aggregation sums."""
    import opendp.prelude as dp

    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"discrete Gaussian scale must be a positive number, got {sigma}")
    dp.enable_features("contrib")    # OpenDP files its Gaussian over integers under contributed mechanisms
    meas = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64"), size=size), dp.l2_distance(T="i64"),
                              scale=float(sigma))
    return np.asarray(meas([0] * size), dtype=np.int64)


FRAC_BITS = 24   # the fixed point of the noise: SecAgg+'s own (common.secagg.QuantConfig's default)
MIN_DISCRETE_SIGMA = 4.0
"""Below this scale (in units of 2^-frac_bits) a sum of discrete Gaussians is refused: Kairouz, Liu, Steinke
(2021, Thm. 4.9) bound how far such a sum is from one discrete Gaussian by tau = 10 sum_k exp(-2 pi^2 sigma^2
k/(k+1)) <= 10 n exp(-pi^2 sigma^2), about 1e-68 n at 4, so the Gaussian's accounting holds as it is."""


def integer_sensitivity(sens: float, frac_bits: int, dim: int) -> float:
    """L2 sensitivity of a user's contribution once rounded to the fixed point 2^-frac_bits: rounding moves each
    of ``dim`` coordinates of either neighbouring sum by at most 1/2 unit, so sqrt(dim) units more."""
    return sens * 2.0 ** frac_bits + math.sqrt(dim)


def discrete_noise_sigma(noise_multiplier: float, sens: float, frac_bits: int, dim: int, share: float = 1.0) -> float:
    """Scale, in fixed-point units, of the discrete Gaussian that carries ``share`` of the noise variance
    (z * integer sensitivity)^2 (1 = all of it; in distributed mode a node's k users' share of a quorum m, k/m)."""
    sigma = noise_multiplier * integer_sensitivity(sens, frac_bits, dim) * math.sqrt(share)
    if sigma < MIN_DISCRETE_SIGMA:
        raise ValueError(f"discrete Gaussian scale {sigma:.3g} (fixed-point units) is below {MIN_DISCRETE_SIGMA}: "
                         "raise the noise multiplier")
    return sigma


@dataclass(frozen=True)
class DistributedNoise:
    """What a node adds in distributed mode: the discrete Gaussian of ``share`` (its users over the quorum) of the
    variance (z * integer sensitivity)^2, drawn at the masking step for the round's fixed point and length."""

    multiplier: float
    sensitivity: float
    share: float

    def draw(self, frac_bits: int, dim: int) -> np.ndarray:
        return discrete_gaussian(discrete_noise_sigma(self.multiplier, self.sensitivity, frac_bits, dim, self.share),
                                 dim)

    def to_array(self) -> np.ndarray:
        return np.array([self.multiplier, self.sensitivity, self.share], np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> DistributedNoise:
        z, sens, share = (float(v) for v in np.asarray(a, np.float64).reshape(3))
        if not all(math.isfinite(v) and v > 0 for v in (z, sens, share)):
            raise ValueError(f"distributed noise settings must be positive numbers, got {z, sens, share}")
        return cls(z, sens, share)
