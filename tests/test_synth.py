"""The synthetic RecFlow generator: schema, determinism, and that its world has the
structure fedpa relies on (stage order, feedback, profile groups, drift), measured
against the oracle it stores."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from fedpa.foundation.errors import FedpaError
from fedpa.recdata.schema import LABELS, SCHEMAS, STAGE_CODE, STAGES
from fedpa.recdata.store import Dataset, DatasetError, DatasetWriter
from fedpa.recdata.synth import PRESETS, generate, oracle_utility, preset_differences

SEED = 7
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Dataset, list[tuple[str, int, int]]]:
    calls: list[tuple[str, int, int]] = []
    path = generate("tiny", tmp_path_factory.mktemp("synth") / "tiny", seed=SEED,
                    progress=lambda stage, done, total: calls.append((stage, done, total)))
    return Dataset(path), calls


@pytest.fixture(scope="module")
def tiny(tiny_run) -> Dataset:
    return tiny_run[0]


def concat_days(ds: Dataset, name: str) -> pa.Table:
    return pa.concat_tables(t for _, t in ds.iter_days(name))


def column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def utility_of(ds: Dataset, table: pa.Table) -> np.ndarray:
    """Oracle utility of every (user, video) row, on the row's own day."""
    out = np.empty(table.num_rows)
    day_of_row = (column(table, "request_timestamp") // 86_400_000)
    for day in ds.days:
        epoch_day = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()) // 86_400
        rows = day_of_row == epoch_day
        out[rows] = oracle_utility(ds, column(table, "user_id")[rows], column(table, "video_id")[rows], day)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def user_latents(ds: Dataset, day: str) -> np.ndarray:
    users = np.arange(ds.manifest["rows"]["users"])
    table = pa.ipc.open_file(str(ds.path / "oracle" / "user_latent" / f"{day}.arrow")).read_all()
    assert np.array_equal(column(table, "user_id"), users)
    latent = table.column("latent").combine_chunks()
    return latent.flatten().to_numpy().reshape(len(users), -1)


# ----------------------------------------------------------------------------- format


def test_a_dataset_of_the_preset_as_defined_differs_in_nothing(tiny_run):
    ds, _ = tiny_run
    assert preset_differences(ds.manifest, "tiny") == {}


def test_manifest_records_the_world(tiny_run):
    ds, calls = tiny_run
    m = ds.manifest
    assert m["source"] == "synthetic:tiny" and m["preset"] == "tiny" and m["seed"] == SEED
    assert m["start_day"] == "2024-01-13"
    assert ds.days == [(date(2024, 1, 13) + timedelta(days=i)).isoformat() for i in range(TINY.n_days)]
    assert m["generator"]["effective_view_rate"] == TINY.effective_view_rate
    assert m["generator"]["like_rate"] == TINY.like_rate
    assert m["generator"]["funnel_sizes"] == list(TINY.funnel_sizes)
    assert set(m["realized_label_rates"]) == set(LABELS)
    assert "watch_intercept" in m["calibration"]
    assert m["vocab"]["user_id"] == TINY.n_users and m["vocab"]["video_id"] == TINY.n_items
    assert m["vocab"]["category_level_two"] == TINY.n_categories_l2 + 1  # code 0 = unknown
    assert calls == [("days", i + 1, TINY.n_days) for i in range(TINY.n_days)]


def test_tables_conform_to_the_schema(tiny):
    users, items = tiny.users(), tiny.items()
    assert users.schema.equals(SCHEMAS["users"]) and items.schema.equals(SCHEMAS["items"])
    for name in ("requests", "exposures", "stage_samples"):
        for _, table in tiny.iter_days(name):
            assert table.schema.equals(SCHEMAS[name]), name
    assert np.array_equal(column(users, "user_id"), np.arange(TINY.n_users))
    assert np.array_equal(column(items, "video_id"), np.arange(TINY.n_items))
    for name in ("device_id", "age", "gender", "province"):
        assert column(users, name).min() >= 0
    assert column(users, "gender").max() == 2 and column(users, "age").max() <= TINY.n_age_buckets
    duration = column(items, "duration")
    assert duration.min() >= 5_000 and duration.max() <= 300_000
    assert column(items, "author_id").min() >= 1
    # Level two is nested in level one: each level-two category has one parent.
    pairs = np.unique(np.stack([column(items, "category_level_two"), column(items, "category_level_one")]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == TINY.n_categories_l2
    start = int(datetime(2024, 1, 13, tzinfo=UTC).timestamp())
    assert column(items, "upload_timestamp").max() < start

    requests = concat_days(tiny, "requests")
    request_ids = column(requests, "request_id")
    assert len(np.unique(request_ids)) == len(request_ids)
    for day, table in tiny.iter_days("requests"):
        day_start = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()) * 1000
        ts = column(table, "request_timestamp")
        assert ts.min() >= day_start and ts.max() < day_start + 86_400_000


def test_requests_carry_recflow_shaped_samples_and_exposures(tiny):
    requests = concat_days(tiny, "requests")
    exposures = concat_days(tiny, "exposures")
    samples = concat_days(tiny, "stage_samples")
    n_requests = requests.num_rows

    per_request = np.unique(column(exposures, "request_id"), return_counts=True)[1]
    assert len(per_request) == n_requests
    assert per_request.min() >= 1 and per_request.max() <= TINY.max_exposures
    assert 3.6 < per_request.mean() < 4.6  # RecFlow: ~4 exposures per request

    stage = column(samples, "stage")
    for name, count in zip(STAGES, TINY.stored_samples):
        assert np.count_nonzero(stage == STAGE_CODE[name]) == count * n_requests, name
    _, coarse, rank, rerank = TINY.funnel_sizes[1:]
    rank_index, rerank_index = column(samples, "rank_index"), column(samples, "rerank_index")
    expected = {  # (rank_index range, rerank_index range); -1 = never reached that stage
        "prerank_neg": ((-1, -1), (-1, -1)), "coarse_neg": ((-1, -1), (-1, -1)),
        "rank_neg": ((rank, coarse - 1), (-1, -1)),
        "rank_pos": ((0, TINY.stored_samples[STAGE_CODE["rank_pos"]] - 1), (0, rank - 1)),
        "rerank_neg": ((0, rank - 1), (rerank, rank - 1)), "rerank_pos": ((0, rank - 1), (0, rerank - 1)),
    }
    for name, ((r_lo, r_hi), (rr_lo, rr_hi)) in expected.items():
        rows = stage == STAGE_CODE[name]
        assert r_lo <= rank_index[rows].min() and rank_index[rows].max() <= r_hi, name
        assert rr_lo <= rerank_index[rows].min() and rerank_index[rows].max() <= rr_hi, name

    # A candidate is dropped once: the dropped samples of a request are distinct items.
    request_id, video_id = column(samples, "request_id"), column(samples, "video_id")
    dropped = np.isin(stage, [STAGE_CODE[s] for s in ("prerank_neg", "coarse_neg", "rank_neg")])
    keys = request_id[dropped] * TINY.n_items + video_id[dropped]
    assert len(np.unique(keys)) == len(keys)
    # Exposed items come out of the re-ranking: each is a rerank_pos sample of its request.
    kept = stage == STAGE_CODE["rerank_pos"]
    kept_keys = request_id[kept] * TINY.n_items + video_id[kept]
    shown_keys = column(exposures, "request_id") * TINY.n_items + column(exposures, "video_id")
    assert np.isin(shown_keys, kept_keys).all()
    assert column(exposures, "rerank_index").max() < rerank


def test_generation_is_deterministic(tmp_path, tiny):
    again = generate("tiny", tmp_path / "again", seed=SEED)
    files = sorted(p.relative_to(tiny.path) for p in tiny.path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny.path / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = generate("tiny", tmp_path / "other", seed=SEED + 1, days=1)
    day = tiny.days[0]
    assert not Dataset(other).day("exposures", day).equals(tiny.day("exposures", day))


# ----------------------------------------------------------------------------- the world


def test_stage_samples_carry_the_stage_order(tiny):
    samples = concat_days(tiny, "stage_samples")
    utility = utility_of(tiny, samples)
    stage = column(samples, "stage")
    mean = {name: utility[stage == STAGE_CODE[name]].mean() for name in STAGES}
    mean["exposed"] = utility_of(tiny, concat_days(tiny, "exposures")).mean()
    print({k: round(v, 3) for k, v in mean.items()})
    # The funnel's order (FS-LTR's): each stage keeps better items than it drops.
    order = ["prerank_neg", "coarse_neg", "rank_neg", "rerank_neg", "rank_pos", "rerank_pos", "exposed"]
    for worse, better in zip(order, order[1:]):
        assert mean[better] > mean[worse] + 0.05, (worse, better, mean)
    assert mean["exposed"] - mean["prerank_neg"] > 2.0


def test_feedback_follows_utility_through_watch_time(tiny):
    exposures = concat_days(tiny, "exposures")
    playing, duration = column(exposures, "playing_time"), column(exposures, "duration")
    effective, long_view = column(exposures, "effective_view"), column(exposures, "long_view")
    assert np.array_equal(effective == 1, playing * 10 >= duration * 3)
    assert np.array_equal(long_view == 1, playing >= duration)
    assert not np.any(long_view > effective)
    assert 0.3 <= effective.mean() <= 0.5
    for label in ("like", "follow", "forward", "comment"):
        values = column(exposures, label)
        assert not np.any(values > effective), label  # interactions need an effective view
        assert tiny.manifest["realized_label_rates"][label] == pytest.approx(values.mean())
    like_rate = column(exposures, "like").mean()
    assert TINY.like_rate / 2 < like_rate < TINY.like_rate * 2

    utility = utility_of(tiny, exposures)
    low, high = np.quantile(utility, [0.25, 0.75])
    assert effective[utility >= high].mean() > effective[utility <= low].mean() + 0.2


def shared_profile_values(users: pa.Table, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """For user pairs (i, j): how many of age, gender, province they share (known values only)."""
    shared = np.zeros(len(i), dtype=int)
    for feature in ("age", "gender", "province"):
        value = column(users, feature)
        shared += (value[i] == value[j]) & (value[i] > 0)
    return shared


def test_users_of_a_profile_group_share_interests(tiny):
    latent = user_latents(tiny, tiny.days[0])
    users = tiny.users()
    i, j = np.triu_indices(len(latent), k=1)
    similarity = cosine(latent[i], latent[j])
    for feature in ("age", "gender", "province"):
        value = column(users, feature)
        known = (value[i] > 0) & (value[j] > 0)
        same = known & (value[i] == value[j])
        assert similarity[same].mean() > similarity[known & ~same].mean(), feature
    shared = shared_profile_values(users, i, j)
    by_shared = [similarity[shared == k].mean() for k in range(4)]
    print("latent similarity by shared profile values:", np.round(by_shared, 3))
    assert all(b > a + 0.05 for a, b in zip(by_shared, by_shared[1:]))


def test_profile_groups_show_in_behaviour(tiny):
    """Users who share profile values watch more similar categories."""
    exposures = concat_days(tiny, "exposures")
    category = column(tiny.items(["category_level_two"]), "category_level_two")[column(exposures, "video_id")]
    histogram = np.zeros((TINY.n_users, TINY.n_categories_l2 + 1))
    np.add.at(histogram, (column(exposures, "user_id"), category), 1)
    active = np.nonzero(histogram.sum(1))[0]
    i, j = (active[k] for k in np.triu_indices(len(active), k=1))
    similarity = cosine(histogram[i], histogram[j])
    shared = shared_profile_values(tiny.users(), i, j)
    by_shared = [similarity[shared == k].mean() for k in range(3)]
    print("behaviour similarity by shared profile values:", np.round(by_shared, 3))
    assert all(b > a + 0.02 for a, b in zip(by_shared, by_shared[1:]))
    assert by_shared[2] > 1.5 * by_shared[0]


def test_interests_drift_over_days(tiny):
    first = user_latents(tiny, tiny.days[0])
    next_day = cosine(first, user_latents(tiny, tiny.days[1])).mean()
    last_day = cosine(first, user_latents(tiny, tiny.days[-1])).mean()
    assert next_day < 0.999
    assert last_day < next_day - 0.01


def test_activity_and_popularity_are_skewed(tiny):
    requests_per_user = np.bincount(column(concat_days(tiny, "requests"), "user_id"), minlength=TINY.n_users)
    top_decile = np.sort(requests_per_user)[-TINY.n_users // 10:].sum() / requests_per_user.sum()
    assert top_decile > 0.25  # uniform activity would give 0.10
    exposures_per_item = np.sort(np.bincount(column(concat_days(tiny, "exposures"), "video_id")))[::-1]
    top_percent = exposures_per_item[: TINY.n_items // 100].sum() / exposures_per_item.sum()
    assert top_percent > 0.05  # uniform popularity would give 0.01


# ----------------------------------------------------------------------------- oracle


def test_oracle_utility_reads_the_stored_world(tiny):
    day = tiny.days[1]
    rng = np.random.default_rng(1)
    users = rng.integers(0, TINY.n_users, 500)
    videos = rng.integers(0, TINY.n_items, 500)
    items = pa.ipc.open_file(str(tiny.path / "oracle" / "items.arrow")).read_all()
    item_latent = items.column("latent").combine_chunks().flatten().to_numpy().reshape(TINY.n_items, -1)
    expected = (user_latents(tiny, day)[users] * item_latent[videos]).sum(1) + column(items, "bias")[videos]
    np.testing.assert_allclose(oracle_utility(tiny, users, videos, day), expected, rtol=1e-5, atol=1e-5)
    # Broadcasting: one user against many videos.
    np.testing.assert_allclose(oracle_utility(tiny, users[0], videos, day),
                               oracle_utility(tiny, np.full(500, users[0]), videos, day))
    assert oracle_utility(tiny, users.reshape(20, 25), videos.reshape(20, 25), day).shape == (20, 25)
    # The ground truth never sits in the features.
    for name in ("requests", "exposures", "stage_samples"):
        assert not any("util" in c or "latent" in c for c in tiny.day(name, day).column_names)


def test_oracle_utility_is_the_utility_the_funnel_ranked_by(tiny):
    """White box: rebuild the generator's world from the seed and compare its utility."""
    from fedpa.recdata.synth import resolve_config
    from fedpa.recdata.synth.funnel import _utility
    from fedpa.recdata.synth.world import _World

    world = _World(resolve_config("tiny"), SEED)
    rng = np.random.default_rng(2)
    users = rng.integers(0, TINY.n_users, 300)
    internal_items = rng.integers(0, TINY.n_items, (300, 7))
    for day in tiny.days:
        generated = _utility(world, world.user_latents()[users], internal_items)
        oracle = oracle_utility(tiny, users[:, None], world.video_id[internal_items], day)
        np.testing.assert_allclose(oracle, generated, rtol=1e-5, atol=1e-5)
        world.advance_day()


def test_oracle_utility_rejects_what_it_cannot_answer(tiny, tmp_path):
    with pytest.raises(DatasetError, match="no day"):
        oracle_utility(tiny, np.array([0]), np.array([0]), "2030-01-01")
    with pytest.raises(DatasetError, match="video_ids"):
        oracle_utility(tiny, np.array([0]), np.array([TINY.n_items]), tiny.days[0])
    with pytest.raises(DatasetError, match="user_ids"):
        oracle_utility(tiny, np.array([-1]), np.array([0]), tiny.days[0])
    with DatasetWriter(tmp_path / "plain", source="test") as writer:
        writer.write_users(tiny.users())
        writer.write_items(tiny.items())
        day = tiny.days[0]
        writer.write_day(day, requests=tiny.day("requests", day), exposures=tiny.day("exposures", day))
        plain = Dataset(writer.commit())
    with pytest.raises(DatasetError, match="no oracle"):
        oracle_utility(plain, np.array([0]), np.array([0]), day)


# ----------------------------------------------------------------------------- failures


def test_abort_leaves_no_dataset_and_keeps_the_existing_one(tmp_path):
    class Stop(Exception):
        pass

    def stop_at_second_day(stage: str, done: int, total: int) -> None:
        if done == 2:
            raise Stop

    fresh = tmp_path / "fresh"
    with pytest.raises(Stop):
        generate("tiny", fresh, progress=stop_at_second_day)
    assert list(tmp_path.iterdir()) == []

    existing = generate("tiny", tmp_path / "existing", days=1, seed=3)
    before = {p.relative_to(existing): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    with pytest.raises(Stop):
        generate("tiny", existing, overwrite=True, progress=stop_at_second_day)
    after = {p.relative_to(existing): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(FedpaError, match="unknown synthetic preset 'huge'"):
        generate("huge", tmp_path / "x")
    with pytest.raises(FedpaError, match="days must be an integer >= 1"):
        generate("tiny", tmp_path / "x", days=0)
    with pytest.raises(FedpaError, match="unknown parameter"):
        generate("tiny", tmp_path / "x", n_userz=5)
    with pytest.raises(FedpaError, match="funnel_sizes"):
        generate("tiny", tmp_path / "x", funnel_sizes=(100, 200, 50, 20, 10))
    with pytest.raises(FedpaError, match="stored_samples"):
        generate("tiny", tmp_path / "x", stored_samples=(10, 10, 10, 40, 10, 10))
    with pytest.raises(FedpaError, match="stage_noise"):
        generate("tiny", tmp_path / "x", stage_noise=(0.1, 0.6, 0.5, 0.35, 0.25))
    with pytest.raises(FedpaError, match="effective_view_rate"):
        generate("tiny", tmp_path / "x", effective_view_rate=1.5)
    with pytest.raises(FedpaError, match="seed"):
        generate("tiny", tmp_path / "x", seed=-1)
    assert not (tmp_path / "x").exists()
    generate("tiny", tmp_path / "x", days=1)
    with pytest.raises(DatasetError, match="already exists"):
        generate("tiny", tmp_path / "x", days=1)


def test_overrides_change_the_world(tmp_path):
    ds = Dataset(generate("tiny", tmp_path / "custom", days=1, n_users=50, effective_view_rate=0.3,
                          stored_samples=[5, 5, 5, 10, 5, 10]))
    assert ds.manifest["rows"]["users"] == 50
    assert ds.manifest["generator"]["stored_samples"] == [5, 5, 5, 10, 5, 10]
    # a dataset made with other parameters than the preset's names each one (what `fedpa demo` warns about)
    assert preset_differences(ds.manifest, "tiny") == {
        "n_users": (50, 200), "n_days": (1, 4), "effective_view_rate": (0.3, TINY.effective_view_rate),
        "stored_samples": ([5, 5, 5, 10, 5, 10], list(TINY.stored_samples))}
    assert preset_differences(ds.manifest, "small") == {}  # another preset's dataset: nothing to compare
    exposures = ds.day("exposures", ds.days[0])
    assert 0.2 < column(exposures, "effective_view").mean() < 0.4
