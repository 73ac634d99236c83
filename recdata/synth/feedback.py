"""Feedback on exposures: effective and long views, likes, follows, forwards, comments, calibrated to target
rates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import EFFECTIVE_VIEW_RATIO, INTERACTIONS, SynthConfig
from .funnel import _sigmoid


@dataclass(frozen=True)
class _Calibration:
    """Intercepts that make the label rates match the configured ones (fitted on a pilot)."""

    watch_intercept: float
    interaction_intercepts: dict[str, float]

    def as_dict(self) -> dict:
        return {"watch_intercept": self.watch_intercept,
                **{f"{lab}_intercept": v for lab, v in self.interaction_intercepts.items()}}


def _log_duration_ratio(config: SynthConfig, duration: np.ndarray) -> np.ndarray:
    return np.log(duration / config.duration_median_ms)


def _effective_view_probability(config: SynthConfig, intercept: float, utility: np.ndarray,
                                 log_duration_ratio: np.ndarray) -> np.ndarray:
    """P(watch ratio >= 30%) under the logistic watch-time model."""
    mean = intercept + config.watch_utility_slope * utility - config.watch_duration_slope * log_duration_ratio
    return _sigmoid((mean - math.log(EFFECTIVE_VIEW_RATIO)) / config.watch_noise)


def _interaction_probability(config: SynthConfig, intercept: float, utility: np.ndarray) -> np.ndarray:
    """P(interaction | effective view)."""
    return _sigmoid(intercept + config.interaction_utility_slope * utility)


def _feedback(config: SynthConfig, calibration: _Calibration, utility: np.ndarray, duration: np.ndarray,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Playing time and the six labels of exposed items with these utilities and durations."""
    u = utility.astype(np.float64)
    uniform = rng.random(len(u))
    logistic = np.log(uniform) - np.log1p(-uniform)
    log_ratio = (calibration.watch_intercept + config.watch_utility_slope * u
                 - config.watch_duration_slope * _log_duration_ratio(config, duration)
                 + config.watch_noise * logistic)
    ratio = np.exp(np.minimum(log_ratio, math.log(config.max_watch_ratio)))
    playing_time = np.rint(ratio * duration).astype(np.int64)
    # Integer comparisons, so that the labels agree exactly with the stored times.
    effective = playing_time * 10 >= duration * 3  # EFFECTIVE_VIEW_RATIO
    labels = {"playing_time": playing_time,
              "effective_view": effective.astype(np.int8),
              "long_view": (playing_time >= duration).astype(np.int8)}
    for label in INTERACTIONS:
        p = _interaction_probability(config, calibration.interaction_intercepts[label], u)
        labels[label] = (effective & (rng.random(len(u)) < p)).astype(np.int8)
    return labels
