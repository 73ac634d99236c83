"""The synthetic RecFlow world: fedpa's embedded default dataset.

A generative world rather than random columns, so that the things fedpa
learns (user-group adapters, stage-aware rankers, personal adapters) have
something real to find, and so that an oracle knows the truth:

*Users* have a latent interest vector per day: the sum of one vector per
profile value (age bucket, gender, province, device model; ``0`` = unknown
has none) plus an individual part. The individual part drifts as a
mean-reverting random walk (``interest_persistence`` per day) and the group
vectors drift slowly (``group_drift``), so interests change over the days.
Users also have an activity level (mean requests per day, lognormal: heavy
tailed, so "highly active" means something).

*Items* sit in two nested category levels (every level-two category belongs
to one level-one category) and have an author (authors publish within one
level-two category). An item's latent vector is the sum of its level-one,
level-two, author and own vectors; its scalar bias (quality) correlates with
its popularity. Popularity within a category is Zipf-like in the item's
popularity rank. The true utility of item ``i`` for user ``u`` on day ``t``
is ``<user_latent[t, u], item_latent[i]> + item_bias[i]`` (the user latents
carry ``utility_scale``).

*Requests* go through RecFlow's funnel, retrieval → pre-ranking → coarse
ranking → ranking → re-ranking → edge ranking (exposure). Each stage ranks by
a noisy model of the true utility, and the noise shrinks stage by stage:

- Pre-ranking and coarse ranking are cheap models in production; here they
  score a candidate by the user's affinity for its level-two category (the
  category part of the true utility) plus logistic noise. Because their
  decisions then depend on the category only, their keep/drop outcomes over
  the thousands of retrieved candidates are simulated exactly by per-category
  probabilities (order statistics: each user-day gets the thresholds that keep
  the nominal fractions of the retrieval distribution) instead of drawing
  every retrieved candidate. The stored ``prerank_neg`` / ``coarse_neg``
  samples and the ranking stage's input are drawn from the matching
  conditional distributions, so every stored sample is consistent with the
  stage scores.
- Ranking and re-ranking score the materialised survivors (RecFlow: 500) with
  the full utility plus Gaussian noise and keep the top ones (RecFlow: 120,
  then 10); the edge ranking picks the exposed items (1 to ``max_exposures``,
  ``mean_exposures`` on average) from the re-ranked list with the least noise.

Stored samples follow RecFlow: ``prerank_neg`` and ``coarse_neg`` (sampled
from those dropped), ``rank_neg`` (sampled from those dropped at ranking),
``rank_pos`` (top of the ranking), ``rerank_neg`` (sampled from those dropped
at re-ranking), ``rerank_pos`` (top of the re-ranking). As in RecFlow's
per-request stage dictionaries, one item can carry several labels in a
request (a ``rank_pos`` item is also a ``rerank_pos`` or ``rerank_neg`` one),
one row per label; the exposed items are a subset of the re-ranked list and
go to the ``exposures`` table with feedback.

*Feedback* comes from the utility through watch time: the log watch ratio is
``intercept + watch_utility_slope·u − watch_duration_slope·log(duration /
duration_median) + watch_noise·logistic``; ``effective_view`` is a watch ratio
≥ 0.3 and ``long_view`` ≥ 1. Likes, follows, forwards and comments happen
only on effective views, with a probability that rises with the utility. The
intercepts are calibrated on a pilot of the first day so that the label rates
match ``effective_view_rate`` and the four interaction rates. RecFlow does
not publish its label rates: the defaults are assumptions, recorded in the
manifest (``generator``) with the rates actually realised (``realized_label_rates``).

The latent world is written apart from the features, under ``oracle/``
(item latents and biases, one file of user latents per day), and is read back
by :func:`oracle_utility` for oracle evaluation only.

Generation is deterministic for a seed (same bytes) and streams day by day:
only one day of samples is ever in memory, and all the work of a day is
vectorised over blocks of requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from fedpa.foundation.errors import FedpaError

from .schema import LABELS, SCHEMAS, STAGES
from .store import Dataset, DatasetError, DatasetWriter

__all__ = ["PRESETS", "SynthConfig", "generate", "oracle_utility", "parse_overrides", "preset_differences",
           "resolve_config"]

ProgressCallback = Callable[[str, int, int], None]

INTERACTIONS = ("like", "follow", "forward", "comment")
EFFECTIVE_VIEW_RATIO = 0.3  # RecFlow: effective_view = watched >= 30% of the duration; long_view >= 100%


@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of the synthetic world; a preset is one instance, overrides replace fields."""

    # -- population
    n_users: int
    n_days: int
    requests_per_user_day: float
    """Mean requests per user and day, over all users (inactive days included)."""
    activity_spread: float = 1.0
    """Sigma of the lognormal spread of users' mean activity (heavy tail of very active users)."""
    n_age_buckets: int = 7
    n_provinces: int = 34
    n_device_models: int = 100
    """``device_id`` is a device-model code shared by many users, so it can define a user group."""
    unknown_profile_rate: float = 0.02
    """Share of users whose age, gender, province or device is unknown (code 0)."""
    start_day: str = "2024-01-13"

    # -- catalogue
    n_items: int = 20_000
    n_categories_l1: int = 8
    n_categories_l2: int = 40
    n_authors: int = 500
    popularity_exponent: float = 0.8
    """Zipf exponent of the retrieval propensity over an item's popularity rank in its category."""
    duration_median_ms: int = 20_000
    duration_spread: float = 0.8
    """Sigma of log duration; durations are clipped to 5 s .. 5 min."""
    upload_window_days: int = 180
    """Items were uploaded during this many days before ``start_day``."""

    # -- latent world
    latent_dim: int = 16
    utility_scale: float = 6.0
    age_scale: float = 0.45
    gender_scale: float = 0.35
    province_scale: float = 0.3
    device_scale: float = 0.2
    individual_scale: float = 0.6
    category_l1_scale: float = 0.5
    category_l2_scale: float = 0.45
    author_scale: float = 0.35
    item_scale: float = 0.3
    item_bias_scale: float = 0.3
    quality_popularity_correlation: float = 0.5
    interest_persistence: float = 0.97
    """Day-to-day autocorrelation of a user's individual interest (a mean-reverting random walk)."""
    group_drift: float = 0.02
    """Daily random-walk step of the profile-group interest vectors (relative to their scale)."""

    # -- funnel (defaults: RecFlow's)
    funnel_sizes: tuple[int, int, int, int, int] = (8_000, 3_000, 500, 120, 10)
    """Candidates after retrieval, pre-ranking, coarse ranking, ranking and re-ranking. Only the
    coarse-ranking survivors are materialised per request; the first two sizes set fractions."""
    stored_samples: tuple[int, int, int, int, int, int] = (40, 40, 10, 10, 10, 10)
    """Stored samples per request for each stage label, in ``schema.STAGES`` order."""
    stage_noise: tuple[float, float, float, float, float] = (0.8, 0.6, 0.5, 0.35, 0.25)
    """Noise std of pre-ranking, coarse ranking, ranking, re-ranking, edge ranking (decreasing),
    in units of the utility (a user's category affinities spread with a std of about 1)."""
    retrieval_temperature: float = 2.0
    """Retrieval draws categories with weight ``size · exp(affinity / temperature)``."""
    mean_exposures: float = 4.08
    max_exposures: int = 6

    # -- feedback. RecFlow publishes no label rates: these defaults are assumptions.
    effective_view_rate: float = 0.40
    """Target share of exposures watched >= 30% (keeps AUC on effective_view meaningful)."""
    watch_utility_slope: float = 1.0
    """How much the log watch ratio rises per unit of utility."""
    watch_duration_slope: float = 0.3
    """How much the log watch ratio falls per unit of log duration (long videos are left earlier)."""
    watch_noise: float = 0.5
    """Scale of the logistic noise on the log watch ratio; with the slopes it sets the long_view rate."""
    max_watch_ratio: float = 4.0
    """Replays: playing time is capped at this multiple of the duration."""
    like_rate: float = 0.02
    follow_rate: float = 0.003
    forward_rate: float = 0.002
    comment_rate: float = 0.004
    interaction_utility_slope: float = 1.0
    """How much the log-odds of an interaction (given an effective view) rise per unit of utility."""

    def interaction_rate(self, label: str) -> float:
        return getattr(self, f"{label}_rate")

    def validate(self, where: str) -> None:
        """Raise FedpaError naming the first parameter that cannot describe a world."""

        def bad(name: str, why: str) -> FedpaError:
            return FedpaError(f"{where}: parameter '{name}' {why} (got {getattr(self, name)!r})")

        positive_ints = ("n_users", "n_days", "n_age_buckets", "n_provinces", "n_device_models",
                         "n_items", "n_categories_l1", "n_categories_l2", "n_authors", "latent_dim",
                         "duration_median_ms", "upload_window_days", "max_exposures")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "must be a positive integer")
        positive_floats = ("requests_per_user_day", "utility_scale", "duration_spread",
                           "retrieval_temperature", "watch_noise", "max_watch_ratio", "mean_exposures")
        for name in positive_floats:
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive number")
        non_negative = ("activity_spread", "age_scale", "gender_scale", "province_scale",
                        "device_scale", "individual_scale", "category_l1_scale", "category_l2_scale",
                        "author_scale", "item_scale", "item_bias_scale", "group_drift",
                        "popularity_exponent", "watch_utility_slope", "watch_duration_slope",
                        "interaction_utility_slope")
        for name in non_negative:
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a number >= 0")
        for name in ("unknown_profile_rate", "quality_popularity_correlation", "interest_persistence"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise bad(name, "must be in [0, 1]")
        for name in ("effective_view_rate", *(f"{lab}_rate" for lab in INTERACTIONS)):
            if not _is_number(getattr(self, name)) or not 0 < getattr(self, name) < 1:
                raise bad(name, "must be in (0, 1)")
        for name in INTERACTIONS:
            if self.interaction_rate(name) >= self.effective_view_rate:
                raise bad(f"{name}_rate", "must be below effective_view_rate (interactions need an effective view)")
        try:
            date.fromisoformat(self.start_day)
        except (TypeError, ValueError):
            raise bad("start_day", "must be an ISO date YYYY-MM-DD") from None
        if self.n_categories_l2 < self.n_categories_l1:
            raise bad("n_categories_l2", "must be >= n_categories_l1 (level two is nested in level one)")
        if self.n_authors < self.n_categories_l2:
            raise bad("n_authors", "must be >= n_categories_l2 (every category has an author)")
        if self.n_items < self.n_categories_l2:
            raise bad("n_items", "must be >= n_categories_l2 (every category has an item)")

        sizes, stored = self.funnel_sizes, self.stored_samples
        if not isinstance(sizes, tuple) or len(sizes) != 5 or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise bad("funnel_sizes", "must be 5 positive integers (retrieval, pre-rank, coarse, rank, re-rank)")
        if any(a <= b for a, b in zip(sizes, sizes[1:])):
            raise bad("funnel_sizes", "must strictly decrease stage by stage")
        if not isinstance(stored, tuple) or len(stored) != len(STAGES) or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in stored):
            raise bad("stored_samples", f"must be {len(STAGES)} positive integers ({', '.join(STAGES)})")
        retrieval, prerank, coarse, rank, rerank = sizes
        limits = {"prerank_neg": retrieval - prerank, "coarse_neg": prerank - coarse, "rank_neg": coarse - rank,
                  "rank_pos": rank, "rerank_neg": rank - rerank, "rerank_pos": rerank}
        for stage, count in zip(STAGES, stored):
            if count > limits[stage]:
                raise bad("stored_samples", f"asks for {count} {stage} samples but the funnel has only "
                                            f"{limits[stage]} to sample from")
        noise = self.stage_noise
        if not isinstance(noise, tuple) or len(noise) != 5 or any(not _is_number(s) or s <= 0 for s in noise):
            raise bad("stage_noise", "must be 5 positive numbers")
        if any(a < b for a, b in zip(noise, noise[1:])):
            raise bad("stage_noise", "must not increase stage by stage (later stages are more accurate)")
        if self.max_exposures > rerank:
            raise bad("max_exposures", f"must be <= the re-ranking output ({rerank})")
        if not 1 <= self.mean_exposures <= self.max_exposures:
            raise bad("mean_exposures", f"must be in [1, max_exposures={self.max_exposures}]")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


PRESETS: dict[str, SynthConfig] = {
    # Tests: a few seconds. The funnel keeps RecFlow's early fractions, scaled down at the end.
    "tiny": SynthConfig(
        n_users=200, n_days=4, requests_per_user_day=4.0, n_device_models=10, n_provinces=10,
        n_items=20_000, n_categories_l1=8, n_categories_l2=40, n_authors=500,
        funnel_sizes=(1_600, 600, 100, 30, 10), stored_samples=(10, 10, 10, 10, 10, 10),
    ),
    # The demo default: ~2,000 users x 14 days, ~8 requests per user-day. A user's own taste persists
    # over the window (0.999 a day; the profile-group parts still drift): at 0.97 it decorrelated so fast
    # that nothing a user's rows show could learn it, and no method, pooled or per user, ranked a user's
    # own exposures better than the frozen foundation (README, "Results on the embedded default").
    "small": SynthConfig(
        n_users=2_000, n_days=14, requests_per_user_day=8.0, n_device_models=50,
        n_items=100_000, n_categories_l1=20, n_categories_l2=160, n_authors=8_000,
        funnel_sizes=(3_200, 1_200, 200, 50, 10), stored_samples=(10, 10, 5, 10, 5, 10),
        interest_persistence=0.999,
    ),
    # RecFlow's scale and funnel: 42K users, 37 days, ~9.3M requests, ~38M exposures, ~9M videos.
    # Its category, author and device counts are not published: assumptions.
    "recflow": SynthConfig(
        n_users=42_000, n_days=37, requests_per_user_day=9_300_000 / (42_000 * 37), n_device_models=1_000,
        n_items=9_000_000, n_categories_l1=40, n_categories_l2=400, n_authors=1_000_000,
        interest_persistence=0.999,  # as `small`
    ),
}


# ============================================================================= public API


def generate(preset: str, out: str | Path, *, seed: int = 0, days: int | None = None, overwrite: bool = False,
             progress: ProgressCallback | None = None, **overrides) -> Path:
    """Write the synthetic dataset ``preset`` (with ``overrides`` of its SynthConfig fields) to ``out``.

    The dataset appears at ``out`` only when every day is written; an error or an
    interruption (including one raised by ``progress``) leaves ``out`` as it was.
    ``progress("days", done, total)`` is called after each day. Returns the dataset path.
    """
    config = resolve_config(preset, days=days, **overrides)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FedpaError(f"synthetic preset '{preset}': seed must be an integer >= 0 (got {seed!r})")
    with DatasetWriter(out, source=f"synthetic:{preset}", overwrite=overwrite) as writer:
        world = _World(config, seed)
        writer.write_users(world.users_table())
        writer.write_items(world.items_table())
        _release_arrow_memory()
        writer.write_extra("oracle/items.arrow", table=world.oracle_items_table())
        _release_arrow_memory()
        calibration = _calibrate_feedback(world)
        label_counts = dict.fromkeys(LABELS, 0)
        exposures_total = 0
        next_request_id = 0
        for day_index, day in enumerate(world.days):
            writer.write_extra(f"oracle/user_latent/{day}.arrow", table=world.oracle_user_table())
            tables = _simulate_day(world, day_index, next_request_id, calibration)
            next_request_id += tables.requests.num_rows
            exposures_total += tables.exposures.num_rows
            for label in LABELS:
                label_counts[label] += int(np.count_nonzero(tables.exposures.column(label).to_numpy()))
            writer.write_day(day, requests=tables.requests, exposures=tables.exposures,
                             stage_samples=tables.stage_samples)
            del tables
            _release_arrow_memory()
            world.advance_day()
            if progress is not None:
                progress("days", day_index + 1, len(world.days))
        writer.write_extra("oracle/world.json", obj=world.oracle_description())
        return writer.commit(
            preset=preset,
            seed=seed,
            start_day=config.start_day,
            generator=_parameters(config),
            calibration=calibration.as_dict(),
            realized_label_rates={lab: n / max(exposures_total, 1) for lab, n in label_counts.items()},
        )


def _release_arrow_memory() -> None:
    """Hand the memory Arrow freed (the writer's sorted copies) back to the OS.

    Arrow's allocator keeps freed memory for its own reuse, but the next arrays come
    from numpy's allocator: without this, the peaks of the item tables and of each
    day would stack on one another (recflow: 4.0 instead of 3.5 GiB).
    """
    pa.default_memory_pool().release_unused()


def parse_overrides(preset: str, items: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings (the CLI's ``--set``) as overrides of ``preset``'s SynthConfig fields, each
    value read as its field's type (a tuple as comma-separated values); `resolve_config` validates them."""
    base = _preset(preset)
    known = {f.name for f in fields(SynthConfig)}
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise FedpaError(f"--set '{item}': expected KEY=VALUE")
        if key not in known:
            raise FedpaError(f"--set '{item}': unknown parameter '{key}'")
        default = getattr(base, key)
        try:
            if isinstance(default, tuple):
                kind = type(default[0])
                out[key] = tuple(kind(v.strip()) for v in text.split(","))
            else:
                out[key] = type(default)(text.strip())
        except ValueError:
            raise FedpaError(f"--set '{item}': '{text}' is not a valid {type(default).__name__} "
                             f"(the preset has {default!r})") from None
    return out


def preset_differences(manifest: dict, preset: str) -> dict[str, tuple[object, object]]:
    """World parameters in which a generated dataset (its manifest) differs from ``preset`` as defined
    now: name -> (the dataset's, the preset's). Empty for another preset's or an imported dataset."""
    if manifest.get("preset") != preset or preset not in PRESETS or "generator" not in manifest:
        return {}
    current = _parameters(PRESETS[preset])
    return {k: (manifest["generator"].get(k), v) for k, v in current.items() if manifest["generator"].get(k) != v}


def _preset(preset: str) -> SynthConfig:
    if preset not in PRESETS:
        raise FedpaError(f"unknown synthetic preset '{preset}' (one of {', '.join(PRESETS)})")
    return PRESETS[preset]


def _parameters(config: SynthConfig) -> dict[str, object]:
    """The world's parameters as the manifest records them (JSON: tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def resolve_config(preset: str, *, days: int | None = None, **overrides) -> SynthConfig:
    """The validated SynthConfig of ``preset`` with ``days`` and field ``overrides`` applied."""
    base = _preset(preset)
    where = f"synthetic preset '{preset}'"
    known = {f.name: f for f in fields(SynthConfig)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise FedpaError(f"{where}: unknown parameter(s) {', '.join(unknown)}")
    if days is not None:
        if isinstance(days, bool) or not isinstance(days, int) or days < 1:
            raise FedpaError(f"{where}: days must be an integer >= 1 (got {days!r})")
        overrides["n_days"] = days
    overrides = {k: tuple(v) if isinstance(getattr(base, k), tuple) and isinstance(v, list) else v
                 for k, v in overrides.items()}
    config = replace(base, **overrides)
    config.validate(where)
    return config


def oracle_utility(dataset: Dataset, user_ids: np.ndarray, video_ids: np.ndarray, day: str) -> np.ndarray:
    """The true utility of ``video_ids`` for ``user_ids`` (broadcast together) on ``day``.

    For oracle evaluation only: it reads the latent world under ``oracle/``, which no
    model may see. Raises DatasetError if the dataset has no oracle or an id is unknown.
    """
    oracle = dataset.path / "oracle"
    if not (oracle / "world.json").exists():
        raise DatasetError(f"{dataset.path}: no oracle (only synthetic datasets have one)")
    dataset.check_day(day)
    users, videos = np.broadcast_arrays(np.asarray(user_ids), np.asarray(video_ids))
    if not (np.issubdtype(users.dtype, np.integer) and np.issubdtype(videos.dtype, np.integer)):
        raise DatasetError("oracle_utility: user_ids and video_ids must be integer arrays")
    user_latent = _read_latents(oracle / "user_latent" / f"{day}.arrow", "user_id")
    items = _read_oracle_table(oracle / "items.arrow")
    item_latent = _fixed_size_list_matrix(items.column("latent"))
    item_bias = items.column("bias").to_numpy()
    for name, ids, n in (("user_ids", users, len(user_latent)), ("video_ids", videos, len(item_latent))):
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise DatasetError(f"oracle_utility: {name} must be in [0, {n}) (got {ids.min()} .. {ids.max()})")
    flat_users, flat_videos = users.ravel(), videos.ravel()
    utility = np.einsum("nd,nd->n", user_latent[flat_users], item_latent[flat_videos]) + item_bias[flat_videos]
    return utility.reshape(users.shape)


def _read_oracle_table(path: Path) -> pa.Table:
    if not path.exists():
        raise DatasetError(f"{path}: oracle file is missing")
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _read_latents(path: Path, id_column: str) -> np.ndarray:
    table = _read_oracle_table(path)
    ids = table.column(id_column).to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise DatasetError(f"{path}: '{id_column}' must be 0 .. n-1 in order")
    return _fixed_size_list_matrix(table.column("latent"))


def _fixed_size_list_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A (rows, dim) zero-copy view of a fixed-size-list column of floats."""
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return array.flatten().to_numpy().reshape(len(array), array.type.list_size)


def _latent_column(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])


# ============================================================================= the world

# Random streams: every (stream, day, block) has its own generator, so the output
# depends on the seed only (and on _REQUESTS_PER_BLOCK, which fixes the blocks).
_STREAM_USERS, _STREAM_ITEMS, _STREAM_DRIFT, _STREAM_SCHEDULE, _STREAM_FUNNEL, _STREAM_PILOT = range(6)
_REQUESTS_PER_BLOCK = 4096
_PILOT_USERS = 1_500
_MAX_REDRAW_ROUNDS = 500

# Share of a day's requests in each hour (UTC): quiet nights, a lunch peak, a long evening peak.
_HOURLY_TRAFFIC = np.array([2, 1, 1, 1, 1, 1, 2, 3, 4, 4, 5, 5, 6, 5, 4, 4, 4, 5, 6, 7, 8, 8, 7, 4], dtype=float)
_UPLOAD_TYPE_SHARES = np.array([0.6, 0.25, 0.1, 0.05])  # codes 1..4


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Gaussian vectors with expected squared norm 1."""
    return (rng.standard_normal((n, dim), dtype=np.float32) / np.float32(math.sqrt(dim)))


def _zipf_shares(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Shares of n codes with Zipf-like sizes, the big ones at random codes."""
    shares = rng.permutation(np.arange(1, n + 1, dtype=float) ** -exponent)
    return shares / shares.sum()


def _zipf_rank(uniform: np.ndarray, size: np.ndarray, exponent: float) -> np.ndarray:
    """0-based rank in [0, size) with P(rank k) roughly proportional to (k+1)^-exponent.

    Inverse CDF of the continuous power law on [1, size + 1), in float32 (ranks below
    2^24 are exact, and the speed matters: every candidate of every request comes here).
    """
    n = (size + 1).astype(np.float32)
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(uniform * np.log(n))
    else:
        a = np.float32(1.0 - exponent)
        x = (1 + uniform * (n ** a - 1)) ** (1 / a)
    return np.minimum(x.astype(np.int64) - 1, size - 1)


class _World:
    """The latent world: users (profiles, activity, drifting interests) and the item catalogue.

    Items are kept in an internal order (grouped by level-two category, most popular
    first) so that retrieval draws an item by category and popularity rank with two
    array lookups; ``video_id`` is a random permutation of that order, so ids leak
    neither category nor popularity.
    """

    def __init__(self, config: SynthConfig, seed: int):
        self.config = config
        self.seed = seed
        start = date.fromisoformat(config.start_day)
        self.days = [(start + timedelta(days=i)).isoformat() for i in range(config.n_days)]
        self.day_index = 0
        self._build_users(_rng(seed, _STREAM_USERS))
        self._build_catalogue(_rng(seed, _STREAM_ITEMS))

    # -- users

    def _build_users(self, rng: np.random.Generator) -> None:
        c = self.config
        n, dim = c.n_users, c.latent_dim

        def profile(n_codes: int, shares: np.ndarray) -> np.ndarray:
            codes = rng.choice(np.arange(1, n_codes + 1), size=n, p=shares).astype(np.int64)
            codes[rng.random(n) < c.unknown_profile_rate] = 0
            return codes

        # Age buckets: a bell over the buckets, peaking below the middle.
        bucket = np.arange(c.n_age_buckets)
        age_shares = np.exp(-0.5 * ((bucket - 0.4 * c.n_age_buckets) / (0.25 * c.n_age_buckets + 0.5)) ** 2)
        self.profile = {
            "age": profile(c.n_age_buckets, age_shares / age_shares.sum()),
            "gender": profile(2, np.array([0.52, 0.48])),
            "province": profile(c.n_provinces, _zipf_shares(rng, c.n_provinces, 0.7)),
            "device_id": profile(c.n_device_models, _zipf_shares(rng, c.n_device_models, 1.0)),
        }
        self.group_scale = {"age": c.age_scale, "gender": c.gender_scale, "province": c.province_scale,
                            "device_id": c.device_scale}
        vocab = {"age": c.n_age_buckets, "gender": 2, "province": c.n_provinces, "device_id": c.n_device_models}
        # One interest vector per profile value; value 0 (unknown) carries none.
        self.group_vectors = {}
        for feature, n_codes in vocab.items():
            vectors = _unit_vectors(rng, n_codes + 1, dim)
            vectors[0] = 0.0
            self.group_vectors[feature] = vectors
        self.individual = _unit_vectors(rng, n, dim)
        spread = c.activity_spread
        self.activity = c.requests_per_user_day * np.exp(spread * rng.standard_normal(n) - spread ** 2 / 2)

    def user_latents(self) -> np.ndarray:
        """(n_users, dim) float32 interest vectors of the current day, utility scale included."""
        c = self.config
        latent = c.individual_scale * self.individual
        for feature, vectors in self.group_vectors.items():
            latent = latent + self.group_scale[feature] * vectors[self.profile[feature]]
        return (c.utility_scale * latent).astype(np.float32)

    def advance_day(self) -> None:
        """Drift interests by one day: individual AR(1) walk plus a slow group random walk."""
        c = self.config
        self.day_index += 1
        rng = _rng(self.seed, _STREAM_DRIFT, self.day_index)
        rho = c.interest_persistence
        self.individual = (rho * self.individual
                           + math.sqrt(1 - rho ** 2) * _unit_vectors(rng, c.n_users, c.latent_dim))
        for vectors in self.group_vectors.values():
            step = c.group_drift * _unit_vectors(rng, len(vectors), c.latent_dim)
            step[0] = 0.0
            vectors += step

    # -- catalogue

    def _build_catalogue(self, rng: np.random.Generator) -> None:
        c = self.config
        n_l1, n_l2, dim = c.n_categories_l1, c.n_categories_l2, c.latent_dim
        # Level-two categories nested in level-one: every level-one category gets at least one.
        self.l1_of_l2 = np.concatenate([rng.permutation(n_l1),
                                        rng.choice(n_l1, size=n_l2 - n_l1, p=_zipf_shares(rng, n_l1, 0.8))])
        self.category_size = 1 + rng.multinomial(c.n_items - n_l2, _lognormal_shares(rng, n_l2))
        self.category_start = np.concatenate([[0], np.cumsum(self.category_size)[:-1]])
        category = np.repeat(np.arange(n_l2), self.category_size)
        popularity_rank = np.arange(c.n_items) - self.category_start[category]

        # Authors publish in one level-two category; a few prolific ones publish most.
        author_home = np.sort(np.concatenate([np.arange(n_l2),
                                              rng.choice(n_l2, size=c.n_authors - n_l2,
                                                         p=self.category_size / c.n_items)]))
        authors_in = np.bincount(author_home, minlength=n_l2)
        author_start = np.concatenate([[0], np.cumsum(authors_in)[:-1]])
        author = author_start[category] + _zipf_rank(rng.random(c.n_items, dtype=np.float32), authors_in[category], 1.0)

        l1_vectors = _unit_vectors(rng, n_l1, dim)
        l2_vectors = _unit_vectors(rng, n_l2, dim)
        author_vectors = _unit_vectors(rng, c.n_authors, dim)
        self.category_latent = (c.category_l1_scale * l1_vectors[self.l1_of_l2]
                                + c.category_l2_scale * l2_vectors).astype(np.float32)
        self.item_latent = np.empty((c.n_items, dim), dtype=np.float32)
        chunk = 1 << 20
        for lo in range(0, c.n_items, chunk):
            hi = min(lo + chunk, c.n_items)
            self.item_latent[lo:hi] = (self.category_latent[category[lo:hi]]
                                       + c.author_scale * author_vectors[author[lo:hi]]
                                       + c.item_scale * _unit_vectors(rng, hi - lo, dim))
        # One opaque row per item, so that a batch of rows is gathered with one fast 1-D take.
        self.item_rows = self.item_latent.view(np.dtype((np.void, 4 * dim))).ravel()

        popularity = -np.log1p(popularity_rank)
        popularity = (popularity - popularity.mean()) / (popularity.std() + 1e-12)
        rho = c.quality_popularity_correlation
        self.item_bias = (c.item_bias_scale * (rho * popularity + math.sqrt(1 - rho ** 2)
                                               * rng.standard_normal(c.n_items))).astype(np.float32)

        l1_duration_offset = 0.4 * rng.standard_normal(n_l1)
        log_duration = (math.log(c.duration_median_ms) + l1_duration_offset[self.l1_of_l2[category]]
                        + c.duration_spread * rng.standard_normal(c.n_items))
        self.duration = np.clip(np.exp(log_duration), 5_000, 300_000).astype(np.int64)
        start_s = int(datetime.fromisoformat(c.start_day).replace(tzinfo=timezone.utc).timestamp())
        upload_age = rng.integers(1, c.upload_window_days * 86_400, size=c.n_items)
        self._item_columns = {
            "author_id": rng.permutation(c.n_authors)[author] + 1,
            "category_level_one": (self.l1_of_l2[category] + 1).astype(np.int32),
            "category_level_two": (category + 1).astype(np.int32),
            "upload_type": rng.choice(np.arange(1, 5, dtype=np.int32), size=c.n_items, p=_UPLOAD_TYPE_SHARES),
            "upload_timestamp": start_s - upload_age,
        }
        self.video_id = rng.permutation(c.n_items)
        self.category_mass = self.category_size / c.n_items

    # -- tables

    def users_table(self) -> pa.Table:
        columns = {"user_id": np.arange(self.config.n_users, dtype=np.int64)}
        columns.update({k: self.profile[k] for k in ("device_id", "age", "gender", "province")})
        return pa.table(columns)

    def _internal_by_video(self) -> np.ndarray:
        """Internal index of each video_id (the inverse permutation)."""
        internal = np.empty_like(self.video_id)
        internal[self.video_id] = np.arange(len(self.video_id))
        return internal

    def items_table(self) -> pa.Table:
        """The item features in video_id order (the writer's sort then finds them sorted).

        Built once: the feature columns are released afterwards.
        """
        by_video = self._internal_by_video()
        columns = {"video_id": np.arange(self.config.n_items, dtype=np.int64)}
        columns.update((name, values[by_video]) for name, values in self._item_columns.items())
        columns["duration"] = self.duration[by_video]
        self._item_columns = {}
        return pa.table(columns)

    def oracle_items_table(self) -> pa.Table:
        by_video = self._internal_by_video()
        return pa.table({
            "video_id": np.arange(self.config.n_items, dtype=np.int64),
            "bias": self.item_bias[by_video],
            "latent": _latent_column(self.item_latent[by_video]),
        })

    def oracle_user_table(self) -> pa.Table:
        return pa.table({"user_id": np.arange(self.config.n_users, dtype=np.int64),
                         "latent": _latent_column(self.user_latents())})

    def oracle_description(self) -> dict:
        return {
            "utility": "utility(user, video, day) = dot(user_latent/DAY.arrow[user].latent, "
                       "items.arrow[video].latent) + items.arrow[video].bias",
            "latent_dim": self.config.latent_dim,
            "n_users": self.config.n_users,
            "n_items": self.config.n_items,
            "days": self.days,
        }


def _lognormal_shares(rng: np.random.Generator, n: int) -> np.ndarray:
    shares = np.exp(rng.standard_normal(n))
    return shares / shares.sum()


# ============================================================================= one day


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
    day_start = int(datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp()) * 1000
    extra = c.max_exposures - 1
    exposures = 1 + (rng.binomial(extra, (c.mean_exposures - 1) / extra, size=len(user)) if extra else 0)
    return _Schedule(user=user[order], timestamp=day_start + ms_in_day[order],
                     exposures=np.broadcast_to(exposures, len(user)).astype(np.int64))


def _simulate_day(world: _World, day_index: int, first_request_id: int,
                  calibration: _Calibration) -> _DayTables:
    """All requests of one day through the funnel, with feedback: the day's three tables."""
    c = world.config
    day = world.days[day_index]
    rng = _rng(world.seed, _STREAM_SCHEDULE, day_index)
    schedule = _schedule_requests(world, np.arange(c.n_users), rng.poisson(world.activity), day, rng)
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
    latents = world.user_latents()
    for block, (lo, hi) in enumerate(_request_blocks(schedule.user)):
        rng = _rng(world.seed, _STREAM_FUNNEL, day_index, block)
        result = _run_funnel(world, latents, schedule.user[lo:hi], schedule.exposures[lo:hi], rng)
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


# ============================================================================= the funnel


@dataclass
class _FunnelResult:
    """One block of requests after the funnel; items are internal indices."""

    sample_items: np.ndarray  # (R, stored)
    sample_rank_index: np.ndarray  # (R, stored)
    sample_rerank_index: np.ndarray  # (R, stored)
    exposed_items: np.ndarray  # (E,) request by request, in edge-ranking order
    exposed_rank_index: np.ndarray
    exposed_rerank_index: np.ndarray
    exposed_utility: np.ndarray


def _logistic_scale(std: float) -> float:
    """Scale of the logistic distribution with standard deviation ``std``."""
    return std * math.sqrt(3) / math.pi


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _solve_threshold(affinity: np.ndarray, weight: np.ndarray, scale: float, target: float) -> np.ndarray:
    """Per row, the t with sum_c weight[c] * sigmoid((affinity[c] - t) / scale) == target.

    That is the score threshold a stage needs to keep the fraction ``target`` of the
    candidates (weight = their distribution over categories, already multiplied by the
    chance of surviving earlier stages). Newton on the log of the kept fraction (nearly
    linear in t when the stage keeps few), safeguarded by a bracket that always holds the
    root, since the kept fraction falls monotonically in t.
    """
    lo = affinity.min(axis=1) - 40 * scale
    hi = affinity.max(axis=1) + 40 * scale
    t = np.clip((weight * affinity).sum(axis=1) / weight.sum(axis=1), lo, hi)
    rows = np.arange(len(t))  # rows not solved yet
    for _ in range(100):
        a, w, x = affinity[rows], weight[rows], t[rows]
        passing = _sigmoid((a - x[:, None]) / scale)
        kept = (w * passing).sum(axis=1)
        excess = np.log(kept / target)
        open_ = np.abs(excess) > 1e-9
        rows, a, w, x, passing, kept, excess = (v[open_] for v in (rows, a, w, x, passing, kept, excess))
        if not len(rows):
            break
        lo[rows] = np.where(excess > 0, x, lo[rows])
        hi[rows] = np.where(excess > 0, hi[rows], x)
        log_slope = (w * passing * (1 - passing)).sum(axis=1) / (scale * kept)
        newton = x + excess / np.maximum(log_slope, 1e-300)
        inside = (newton > lo[rows]) & (newton < hi[rows])
        t[rows] = np.where(inside, newton, 0.5 * (lo[rows] + hi[rows]))
    return t


class _CategorySampler:
    """Draws level-two categories for requests from per-user distributions (inverse CDF).

    The CDFs of a block's users are laid end to end, user ``j``'s shifted by ``j``, so
    one ``searchsorted`` serves every request of the block.
    """

    def __init__(self, weight: np.ndarray):
        cdf = np.cumsum(weight, axis=1)
        cdf /= cdf[:, -1:]
        cdf[:, -1] = 1.0
        self.n_users, self.n_categories = weight.shape
        self.flat = (cdf + np.arange(self.n_users)[:, None]).ravel()

    def draw(self, user: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """Categories for local users ``user`` (broadcast against ``uniform`` in [0, 1))."""
        index = np.searchsorted(self.flat, user + uniform, side="right")
        return np.minimum(index - user * self.n_categories, self.n_categories - 1)

    def draw_stratified(self, user: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """(len(user), n) categories; draw k takes its quantile from [k/n, (k+1)/n).

        Stratified sampling: each draw still follows the distribution, but a request's
        mix of categories varies less than with independent draws (like retrieval
        channels with quotas). It is also cheap: the categories at the stratum edges
        are searched once per user, and a stratum that lies inside one category (most
        do) needs no search at all.
        """
        edges = self.draw(np.arange(self.n_users)[:, None], np.arange(n + 1) / n)[user]
        uniform = (np.arange(n) + rng.random((len(user), n))) / n
        category = edges[:, :-1].copy()
        crossing = np.nonzero(edges[:, 1:] != category)
        category[crossing] = self.draw(user[crossing[0]], uniform[crossing])
        return category


def _run_funnel(world: _World, latents: np.ndarray, request_user: np.ndarray, n_exposed: np.ndarray,
                rng: np.random.Generator) -> _FunnelResult:
    """One block of requests (sorted by user) through the six stages."""
    c = world.config
    _, _, coarse, rank, rerank = c.funnel_sizes
    n_prerank_neg, n_coarse_neg, n_rank_neg, n_rank_pos, n_rerank_neg, n_rerank_pos = c.stored_samples
    _, _, noise_rank, noise_rerank, noise_edge = c.stage_noise
    users, local_user = np.unique(request_user, return_inverse=True)
    n_requests = len(request_user)
    n_dropped_early = n_prerank_neg + n_coarse_neg

    samplers = _early_stage_samplers(world, latents[users])
    items = _draw_candidates(world, samplers, (n_prerank_neg, n_coarse_neg, coarse), local_user, rng)
    candidates = items[:, n_dropped_early:]  # ranking's input

    # Ranking, re-ranking and edge ranking: the full utility plus shrinking Gaussian noise.
    utility = _utility(world, latents[request_user], candidates)
    rank_order = _descending_order(utility + noise_rank * rng.standard_normal(utility.shape, dtype=np.float32))
    kept_utility = np.take_along_axis(utility, rank_order[:, :rank], axis=1)  # kept item j = rank position j
    rerank_order = _descending_order(kept_utility + noise_rerank
                                     * rng.standard_normal(kept_utility.shape, dtype=np.float32))
    rerank_position = np.empty_like(rerank_order)
    np.put_along_axis(rerank_position, rerank_order, np.arange(rank, dtype=rerank_order.dtype)[None, :], axis=1)

    # The ranked samples, by their position in the ranking's output.
    ranked_position = np.concatenate([
        _random_positions(rng, n_requests, rank, coarse, n_rank_neg),  # rank_neg: dropped at ranking
        np.broadcast_to(np.arange(n_rank_pos, dtype=np.int32), (n_requests, n_rank_pos)),  # rank_pos: its top
        np.take_along_axis(rerank_order, _random_positions(rng, n_requests, rerank, rank, n_rerank_neg),
                           axis=1),  # rerank_neg: dropped at re-ranking
        rerank_order[:, :n_rerank_pos],  # rerank_pos: the re-ranking's top
    ], axis=1)
    ranked_items = np.take_along_axis(candidates, np.take_along_axis(rank_order, ranked_position, axis=1), axis=1)
    ranked_rerank_index = np.where(
        ranked_position < rank,
        np.take_along_axis(rerank_position, np.minimum(ranked_position, rank - 1), axis=1), -1)
    not_ranked = np.full((n_requests, n_dropped_early), -1, dtype=np.int32)

    # Edge ranking picks the exposed items out of the re-ranking's output.
    top_kept = rerank_order[:, :rerank]
    top_utility = np.take_along_axis(kept_utility, top_kept, axis=1)
    edge_order = _descending_order(top_utility + noise_edge * rng.standard_normal(top_utility.shape, dtype=np.float32))
    shown = np.arange(rerank)[None, :] < n_exposed[:, None]
    exposed_position = np.take_along_axis(top_kept, edge_order, axis=1)[shown]
    exposed_request = np.nonzero(shown)[0]
    exposed_column = rank_order[exposed_request, exposed_position]

    return _FunnelResult(
        sample_items=np.concatenate([items[:, :n_dropped_early], ranked_items], axis=1),
        sample_rank_index=np.concatenate([not_ranked, ranked_position], axis=1),
        sample_rerank_index=np.concatenate([not_ranked, ranked_rerank_index], axis=1),
        exposed_items=candidates[exposed_request, exposed_column],
        exposed_rank_index=exposed_position,
        exposed_rerank_index=edge_order[shown],
        exposed_utility=utility[exposed_request, exposed_column],
    )


def _early_stage_samplers(world: _World, user_latent: np.ndarray) -> list[_CategorySampler]:
    """Category distributions of the candidates dropped at pre-ranking, dropped at coarse
    ranking, and kept by both (ranking's input), for each user.

    Retrieval draws categories with weight ``size · exp(affinity / temperature)``;
    pre-ranking and coarse ranking score a candidate by its category affinity plus
    logistic noise and keep it above a threshold, chosen per user so that each stage
    keeps its nominal fraction. A candidate's fate then depends on its category only.
    """
    c = world.config
    retrieval, prerank, coarse, _, _ = c.funnel_sizes
    affinity = (user_latent @ world.category_latent.T).astype(np.float64)
    log_weight = np.log(world.category_mass) + affinity / c.retrieval_temperature
    retrieved = np.exp(log_weight - log_weight.max(axis=1, keepdims=True))
    retrieved /= retrieved.sum(axis=1, keepdims=True)
    scale_prerank, scale_coarse = (_logistic_scale(noise) for noise in c.stage_noise[:2])
    threshold = _solve_threshold(affinity, retrieved, scale_prerank, prerank / retrieval)
    pass_prerank = _sigmoid((affinity - threshold[:, None]) / scale_prerank)
    threshold = _solve_threshold(affinity, retrieved * pass_prerank, scale_coarse, coarse / retrieval)
    pass_coarse = _sigmoid((affinity - threshold[:, None]) / scale_coarse)
    return [_CategorySampler(retrieved * (1 - pass_prerank)),
            _CategorySampler(retrieved * pass_prerank * (1 - pass_coarse)),
            _CategorySampler(retrieved * pass_prerank * pass_coarse)]


def _draw_candidates(world: _World, samplers: list[_CategorySampler], group_sizes: tuple[int, ...],
                     local_user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(R, sum(group_sizes)) items per request: ``group_sizes[g]`` slots drawn from ``samplers[g]``.

    A retrieved candidate is dropped at one stage only, so the items of a request are
    distinct: repeated draws (popular items) are drawn again until none is left.
    """
    categories = np.concatenate([sampler.draw_stratified(local_user, size, rng)
                                 for sampler, size in zip(samplers, group_sizes)], axis=1)
    items = _item_in_category(world, categories, rng)
    slot_group = np.repeat(np.arange(len(group_sizes)), group_sizes)
    rows = np.arange(len(local_user))  # requests that may still hold a repeated item
    for _ in range(_MAX_REDRAW_ROUNDS):
        request, slot = _repeated_slots(items[rows])
        if not len(request):
            return items
        request = rows[request]
        rows = np.unique(request)
        for group, sampler in enumerate(samplers):
            chosen = slot_group[slot] == group
            redrawn = sampler.draw(local_user[request[chosen]], rng.random(int(chosen.sum())))
            items[request[chosen], slot[chosen]] = _item_in_category(world, redrawn, rng)
    raise FedpaError("synthetic funnel: could not draw distinct candidates for every request; the catalogue "
                     "is too small for the funnel (raise n_items or lower funnel_sizes)")


def _item_in_category(world: _World, category: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = world.category_size[category]
    rank = _zipf_rank(rng.random(category.shape, dtype=np.float32), size, world.config.popularity_exponent)
    return world.category_start[category] + rank


def _repeated_slots(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(request, slot) of every repeated item after its first slot in the request."""
    n_slots = items.shape[1]
    shift = max(int(n_slots - 1).bit_length(), 1)
    keys = items << shift
    keys |= np.arange(n_slots)
    keys.sort(axis=1)
    item = keys >> shift
    repeated = item[:, 1:] == item[:, :-1]
    request, position = np.nonzero(repeated)
    return request, keys[request, position + 1] & ((1 << shift) - 1)


def _utility(world: _World, request_latent: np.ndarray, items: np.ndarray) -> np.ndarray:
    """True utility (float32) of ``items`` (R, n) for the requests' users."""
    dim = world.config.latent_dim
    utility = np.empty(items.shape, dtype=np.float32)
    # Chunks of 256K rows (16 MiB at 16 dims) stay below glibc's mmap threshold, so their
    # memory is reused from block to block instead of page-faulted in afresh.
    rows_per_chunk = max(1, (1 << 18) // items.shape[1])
    for lo in range(0, len(items), rows_per_chunk):
        hi = min(lo + rows_per_chunk, len(items))
        vectors = np.take(world.item_rows, items[lo:hi]).view(np.float32).reshape(hi - lo, -1, dim)
        utility[lo:hi] = np.matmul(vectors, request_latent[lo:hi, :, None])[:, :, 0]
    utility += world.item_bias[items]
    return utility


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """Column indices of each row by decreasing score (ties by column).

    One int64 sort of (order-preserving score bits << 32 | column): numpy's SIMD sort of
    integers is several times faster than argsort.
    """
    bits = (-scores).astype(np.float32).view(np.int32)
    keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) << 32
    keys |= np.arange(scores.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    return (keys & 0xFFFFFFFF).astype(np.int32)


def _random_positions(rng: np.random.Generator, n_rows: int, lo: int, hi: int, k: int) -> np.ndarray:
    """(n_rows, k) distinct positions in [lo, hi) per row, uniformly at random."""
    if k == hi - lo:
        return np.broadcast_to(np.arange(lo, hi, dtype=np.int32), (n_rows, k)).copy()
    keys = rng.random((n_rows, hi - lo), dtype=np.float32)
    return (np.argpartition(keys, k - 1, axis=1)[:, :k] + lo).astype(np.int32)


# ============================================================================= feedback


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
    for lo, hi in _request_blocks(schedule.user):
        result = _run_funnel(world, latents, schedule.user[lo:hi], schedule.exposures[lo:hi], rng)
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
