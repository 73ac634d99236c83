"""The synthetic world's parameters: `SynthConfig`, the presets (tiny, small, recflow), and typed overrides."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import date

from fedpa.foundation.errors import FedpaError

from ..schema import STAGES

ProgressCallback = Callable[[str, int, int], None]

INTERACTIONS = ("like", "follow", "forward", "comment")
DOMAIN_NAMES = {1: "short-video", 2: "live"}  # the surfaces of a two-domain world, by their code in items.domain
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

    # -- a second surface (UniCDR+, Moment&Cross: short video is dense, live streaming sparse). Off at 0.
    second_domain_share: float = 0.0
    """Share of every category's items (its least popular ones) on a second, sparse surface ("live"); 0 = one
    surface. A request on that surface retrieves from those items only; categories and authors are shared."""
    second_domain_activity: float = 0.1
    """A user's requests on the second surface, as a share of its requests on the first."""
    domain_transfer: float = 0.7
    """Correlation of a user's interest on the second surface with its interest on the first (1 = the same
    taste, 0 = unrelated): how much dense-surface behaviour can teach about the sparse one."""
    second_domain_shift: float = 0.0
    """Scale (relative to a user's own taste) of a taste every user shares on the second surface only: what
    the surface itself favours (a live stream is not a short video), which no first-surface row can teach."""
    second_domain_only_users: float = 0.15
    """Share of users active on the second surface only (no dense-surface rows: nothing to transfer from)."""
    first_domain_only_users: float = 0.3
    """Share of users who never open the second surface."""

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

    @property
    def two_domains(self) -> bool:
        return self.second_domain_share > 0

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
        for name in ("unknown_profile_rate", "quality_popularity_correlation", "interest_persistence",
                     "domain_transfer", "second_domain_only_users", "first_domain_only_users"):
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

        if not _is_number(self.second_domain_share) or not 0 <= self.second_domain_share < 1:
            raise bad("second_domain_share", "must be in [0, 1) (0 = one surface)")
        if not _is_number(self.second_domain_shift) or self.second_domain_shift < 0:
            raise bad("second_domain_shift", "must be a number >= 0")
        if not _is_number(self.second_domain_activity) or self.second_domain_activity <= 0:
            raise bad("second_domain_activity", "must be a positive number")
        if self.second_domain_only_users + self.first_domain_only_users > 1:
            raise bad("second_domain_only_users", "plus first_domain_only_users must be at most 1")

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
