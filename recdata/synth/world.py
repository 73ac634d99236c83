"""The latent world: users with drifting interests and activity, items in categories and authors, popularity."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa

from .config import DOMAIN_NAMES, SynthConfig
from .oracle import _latent_column

# Random streams: every (stream, day, block) has its own generator, so the output
# depends on the seed only (and on _REQUESTS_PER_BLOCK, which fixes the blocks).
_STREAM_USERS, _STREAM_ITEMS, _STREAM_DRIFT, _STREAM_SCHEDULE, _STREAM_FUNNEL, _STREAM_PILOT, _STREAM_DOMAIN = range(7)
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


class _Surface:
    """The items one surface shows: per level-two category, a block of the internal order (most popular
    first) and its share of the surface's catalogue, which retrieval draws categories by."""

    def __init__(self, start: np.ndarray, size: np.ndarray):
        self.start, self.size = start, size
        self.mass = size / size.sum()


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
        # the second surface draws from a stream of its own: a one-surface world is the same as before it existed
        self.item_domain = None
        if config.two_domains:
            self._build_second_domain(_rng(seed, _STREAM_DOMAIN))

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

    def user_latents(self, domain: int = 1) -> np.ndarray:
        """(n_users, dim) float32 interest vectors of the current day on surface ``domain`` (1, or 2 in a
        two-domain world), utility scale included."""
        c = self.config
        latent = c.individual_scale * self.individual
        for feature, vectors in self.group_vectors.items():
            latent = latent + self.group_scale[feature] * vectors[self.profile[feature]]
        if domain == 2:
            # the same taste up to a share of its own, at the same expected norm: transfer t is the correlation
            norm = math.sqrt(c.individual_scale ** 2 + sum(s ** 2 for s in self.group_scale.values()))
            t = c.domain_transfer
            latent = (t * latent + math.sqrt(1 - t ** 2) * norm * self.second_individual
                      + c.second_domain_shift * norm * self.second_shift)
        return (c.utility_scale * latent).astype(np.float32)

    def _build_second_domain(self, rng: np.random.Generator) -> None:
        """Which items are on the second surface, each user's own share of taste there, and who is active on
        which surface. The second surface's items come from every category (live streams by the same kind of
        creators as the short videos): what a user shows of a category on one surface says something of the
        other, as much as ``domain_transfer`` lets it."""
        c = self.config
        # each category's least popular share of items, rounded at random, at least one item left on the first
        second = np.floor(c.second_domain_share * self.category_size + rng.random(len(self.category_size)))
        second = np.minimum(second.astype(np.int64), self.category_size - 1)
        first = self.category_size - second
        self.surfaces = {1: _Surface(self.category_start, first), 2: _Surface(self.category_start + first, second)}
        category = np.repeat(np.arange(len(self.category_size)), self.category_size)
        rank = np.arange(c.n_items) - self.category_start[category]
        self.item_domain = np.where(rank < first[category], 1, 2).astype(np.int64)
        self.second_individual = _unit_vectors(rng, c.n_users, c.latent_dim)
        draw = rng.random(c.n_users)
        second_only = draw < c.second_domain_only_users
        first_only = (draw >= c.second_domain_only_users) & (draw < c.second_domain_only_users
                                                              + c.first_domain_only_users)
        self.activity_by_domain = {1: np.where(second_only, 0.0, self.activity),
                                   2: np.where(first_only, 0.0, c.second_domain_activity * self.activity)}
        shift = rng.standard_normal(c.latent_dim)
        self.second_shift = (shift / np.linalg.norm(shift)).astype(np.float32)  # one direction, unit length

    def surface(self, domain: int | None = None) -> _Surface:
        """The catalogue a request of surface ``domain`` retrieves from (None, or a one-surface world: all)."""
        if domain is None or self.item_domain is None:
            return _Surface(self.category_start, self.category_size)
        return self.surfaces[domain]

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
        start_s = int(datetime.fromisoformat(c.start_day).replace(tzinfo=UTC).timestamp())
        upload_age = rng.integers(1, c.upload_window_days * 86_400, size=c.n_items)
        self._item_columns = {
            "author_id": rng.permutation(c.n_authors)[author] + 1,
            "category_level_one": (self.l1_of_l2[category] + 1).astype(np.int32),
            "category_level_two": (category + 1).astype(np.int32),
            "upload_type": rng.choice(np.arange(1, 5, dtype=np.int32), size=c.n_items, p=_UPLOAD_TYPE_SHARES),
            "upload_timestamp": start_s - upload_age,
        }
        self.video_id = rng.permutation(c.n_items)

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
        if self.item_domain is not None:
            columns["domain"] = self.item_domain[by_video]
        self._item_columns = {}
        return pa.table(columns)

    @property
    def domain_names(self) -> dict[int, str] | None:
        return None if self.item_domain is None else dict(DOMAIN_NAMES)

    def oracle_items_table(self) -> pa.Table:
        by_video = self._internal_by_video()
        columns = {
            "video_id": np.arange(self.config.n_items, dtype=np.int64),
            "bias": self.item_bias[by_video],
            "latent": _latent_column(self.item_latent[by_video]),
        }
        if self.item_domain is not None:
            columns["domain"] = self.item_domain[by_video]
        return pa.table(columns)

    def oracle_user_table(self) -> pa.Table:
        columns = {"user_id": np.arange(self.config.n_users, dtype=np.int64),
                   "latent": _latent_column(self.user_latents())}
        if self.item_domain is not None:
            columns["latent_second"] = _latent_column(self.user_latents(2))
        return pa.table(columns)

    def oracle_description(self) -> dict:
        return {
            "utility": "utility(user, video, day) = dot(user_latent/DAY.arrow[user].latent, "
                       "items.arrow[video].latent) + items.arrow[video].bias"
                       + ("; for an item with domain 2 the user's latent is latent_second" if self.item_domain
                          is not None else ""),
            "latent_dim": self.config.latent_dim,
            "n_users": self.config.n_users,
            "n_items": self.config.n_items,
            "days": self.days,
        }


def _lognormal_shares(rng: np.random.Generator, n: int) -> np.ndarray:
    shares = np.exp(rng.standard_normal(n))
    return shares / shares.sum()
