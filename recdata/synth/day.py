"""One day of traffic: requests scheduled over the hours, each run through the funnel, with feedback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from ..schema import LABELS, SCHEMAS, STAGES
from .config import INTERACTIONS
from .feedback import (
    _Calibration,
    _effective_view_probability,
    _feedback,
    _interaction_probability,
    _log_duration_ratio,
)
from .funnel import _run_funnel
from .world import (
    _HOURLY_TRAFFIC,
    _PILOT_USERS,
    _REQUESTS_PER_BLOCK,
    _STREAM_FUNNEL,
    _STREAM_PILOT,
    _STREAM_SCHEDULE,
    _rng,
    _Surface,
    _World,
)


@dataclass
class _DayTables:
    requests: pa.Table
    exposures: pa.Table
    stage_samples: pa.Table


@dataclass
class _Schedule:
    """A day's requests, sorted by (user, time): the order the writer stores them in."""

    user: np.ndarray  # (R,) int64
    timestamp: np.ndarray  # (R,) int64 ms
    exposures: np.ndarray  # (R,) int64 number of exposed items per request


def _schedule_requests(world: _World, users: np.ndarray, counts: np.ndarray, day: str,
                       rng: np.random.Generator) -> _Schedule:
    """``counts[i]`` requests of ``users[i]`` at times of ``day`` that follow the daily traffic."""
    c = world.config
    user = np.repeat(users, counts)
    hour_shares = _HOURLY_TRAFFIC / _HOURLY_TRAFFIC.sum()
    hour = rng.choice(24, size=len(user), p=hour_shares)
    ms_in_day = hour * 3_600_000 + rng.integers(0, 3_600_000, size=len(user))
    order = np.lexsort((ms_in_day, user))
    day_start = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()) * 1000
    extra = c.max_exposures - 1
    exposures = 1 + (rng.binomial(extra, (c.mean_exposures - 1) / extra, size=len(user)) if extra else 0)
    return _Schedule(user=user[order], timestamp=day_start + ms_in_day[order],
                     exposures=np.broadcast_to(exposures, len(user)).astype(np.int64))


def _simulate_day(world: _World, day_index: int, first_request_id: int,
                  calibration: _Calibration) -> _DayTables:
    """All requests of one day through the funnel, with feedback: the day's three tables (in a two-domain
    world, each surface's requests through a funnel that retrieves from that surface's items)."""
    c = world.config
    day = world.days[day_index]
    rng = _rng(world.seed, _STREAM_SCHEDULE, day_index)
    users = np.arange(c.n_users)
    if world.item_domain is None:
        schedule = _schedule_requests(world, users, rng.poisson(world.activity), day, rng)
        return _simulate_requests(world, schedule, world.user_latents(), None, day_index, first_request_id,
                                  calibration, ())
    parts = []
    for domain in (1, 2):
        schedule = _schedule_requests(world, users, rng.poisson(world.activity_by_domain[domain]), day, rng)
        parts.append(_simulate_requests(world, schedule, world.user_latents(domain), world.surface(domain),
                                        day_index, first_request_id, calibration, (domain,)))
        first_request_id += parts[-1].requests.num_rows
    # the writer sorts each table by (user, time)
    return _DayTables(*(pa.concat_tables([getattr(p, name) for p in parts])
                        for name in ("requests", "exposures", "stage_samples")))


def _simulate_requests(world: _World, schedule: _Schedule, latents: np.ndarray, surface: _Surface | None,
                       day_index: int, first_request_id: int, calibration: _Calibration,
                       stream: tuple[int, ...]) -> _DayTables:
    """``schedule``'s requests through the funnel (retrieving from ``surface``'s items, when given), with
    feedback. ``stream`` tells the random streams of the surfaces of one day apart."""
    c = world.config
    n_requests = len(schedule.user)
    request_id = first_request_id + np.arange(n_requests, dtype=np.int64)
    stored = sum(c.stored_samples)
    stage_code = np.repeat(np.arange(len(STAGES), dtype=np.int8), c.stored_samples)
    exposure_end = np.cumsum(schedule.exposures)
    n_exposures = int(exposure_end[-1]) if n_requests else 0

    sample_video = np.empty((n_requests, stored), dtype=np.int64)
    sample_rank = np.empty((n_requests, stored), dtype=np.int32)
    sample_rerank = np.empty((n_requests, stored), dtype=np.int32)
    exposure = {
        "video_id": np.empty(n_exposures, dtype=np.int64),
        "rank_index": np.empty(n_exposures, dtype=np.int32),
        "rerank_index": np.empty(n_exposures, dtype=np.int32),
        "playing_time": np.empty(n_exposures, dtype=np.int64),
        "duration": np.empty(n_exposures, dtype=np.int64),
        **{lab: np.empty(n_exposures, dtype=np.int8) for lab in LABELS},
    }
    for block, (lo, hi) in enumerate(_request_blocks(schedule.user)):
        rng = _rng(world.seed, _STREAM_FUNNEL, day_index, block, *stream)
        result = _run_funnel(world, latents, schedule.user[lo:hi], schedule.exposures[lo:hi], rng, surface)
        sample_video[lo:hi] = world.video_id[result.sample_items]
        sample_rank[lo:hi] = result.sample_rank_index
        sample_rerank[lo:hi] = result.sample_rerank_index
        e_lo = int(exposure_end[lo - 1]) if lo else 0
        e_hi = int(exposure_end[hi - 1])
        exposure["video_id"][e_lo:e_hi] = world.video_id[result.exposed_items]
        exposure["rank_index"][e_lo:e_hi] = result.exposed_rank_index
        exposure["rerank_index"][e_lo:e_hi] = result.exposed_rerank_index
        duration = world.duration[result.exposed_items]
        exposure["duration"][e_lo:e_hi] = duration
        for name, values in _feedback(world.config, calibration, result.exposed_utility, duration, rng).items():
            exposure[name][e_lo:e_hi] = values

    requests = pa.table({"request_id": request_id, "user_id": schedule.user,
                         "request_timestamp": schedule.timestamp}, schema=SCHEMAS["requests"])
    per_exposure = np.repeat(np.arange(n_requests), schedule.exposures)
    exposures = pa.table({"request_id": request_id[per_exposure], "user_id": schedule.user[per_exposure],
                          "request_timestamp": schedule.timestamp[per_exposure], **exposure},
                         schema=SCHEMAS["exposures"])
    del per_exposure
    stage_samples = pa.table({
        "request_id": _repeat_rows(request_id, stored),
        "user_id": _repeat_rows(schedule.user, stored),
        "request_timestamp": _repeat_rows(schedule.timestamp, stored),
        "video_id": sample_video.ravel(),
        "stage": np.tile(stage_code, n_requests),
        "rank_index": sample_rank.ravel(),
        "rerank_index": sample_rerank.ravel(),
    }, schema=SCHEMAS["stage_samples"])
    return _DayTables(requests=requests, exposures=exposures, stage_samples=stage_samples)


def _repeat_rows(values: np.ndarray, times: int) -> np.ndarray:
    """Each value ``times`` times in a row (a broadcast copy: several times faster than np.repeat)."""
    out = np.empty((len(values), times), dtype=values.dtype)
    out[:] = values[:, None]
    return out.ravel()


def _request_blocks(request_user: np.ndarray) -> list[tuple[int, int]]:
    """Cut the day's requests into blocks of about _REQUESTS_PER_BLOCK, never splitting a user."""
    blocks, lo, n = [], 0, len(request_user)
    while lo < n:
        hi = min(lo + _REQUESTS_PER_BLOCK, n)
        hi = int(np.searchsorted(request_user, request_user[hi - 1], side="right"))
        blocks.append((lo, hi))
        lo = hi
    return blocks


def _calibrate_feedback(world: _World) -> _Calibration:
    """Fit the label intercepts on the exposures of a pilot sample of first-day requests."""
    c = world.config
    rng = _rng(world.seed, _STREAM_PILOT)
    pilot = np.sort(rng.choice(c.n_users, size=min(c.n_users, _PILOT_USERS), replace=False))
    # Every pilot user asks at least once, so that the pilot always has exposures.
    counts = np.maximum(rng.poisson(world.activity[pilot]), 1)
    schedule = _schedule_requests(world, pilot, counts, world.days[0], rng)
    latents = world.user_latents()
    utility, duration = [], []
    for lo, hi in _request_blocks(schedule.user):  # (labels calibrate on the first surface)
        result = _run_funnel(world, latents, schedule.user[lo:hi], schedule.exposures[lo:hi], rng,
                             world.surface(1))
        utility.append(result.exposed_utility.astype(np.float64))
        duration.append(world.duration[result.exposed_items])
    u = np.concatenate(utility)
    log_duration_ratio = _log_duration_ratio(c, np.concatenate(duration))
    watch = _solve_intercept(
        lambda a: _effective_view_probability(c, a, u, log_duration_ratio).mean(), c.effective_view_rate)
    effective = _effective_view_probability(c, watch, u, log_duration_ratio)
    interactions = {
        label: _solve_intercept(lambda a: (effective * _interaction_probability(c, a, u)).mean(),
                                c.interaction_rate(label))
        for label in INTERACTIONS
    }
    return _Calibration(watch_intercept=watch, interaction_intercepts=interactions)


def _solve_intercept(rate_at: Callable[[float], float], target: float) -> float:
    """The intercept at which the increasing function ``rate_at`` reaches ``target`` (bisection)."""
    lo, hi = -50.0, 50.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if rate_at(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
