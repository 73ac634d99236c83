"""A dataset of two surfaces (UniCDR+, Moment&Cross): the synthetic two-domain world, the canonical format's
``items.domain``, and the rows a run of several domains trains and evaluates on."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fedpa.foundation.errors import FedpaError
from fedpa.recdata.examples import Lookups
from fedpa.recdata.partition import SplitConfig, select_domains, split_users
from fedpa.recdata.store import Dataset, DatasetError, DatasetWriter
from fedpa.recdata.synth import generate
from fedpa.recdata.synth.config import resolve_config
from fedpa.recdata.synth.oracle import oracle_utility

TWO = dict(second_domain_share=0.25, second_domain_activity=0.3, domain_transfer=0.7,
           second_domain_only_users=0.2, first_domain_only_users=0.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dataset:
    return Dataset(generate("tiny", tmp_path_factory.mktemp("domains") / "two", seed=3, n_users=300, **TWO))


def exposures(ds: Dataset) -> pa.Table:
    return pa.concat_tables(t for _, t in ds.iter_days("exposures"))


def test_the_two_domain_world_keeps_surfaces_apart(world):
    ds = world
    assert ds.domains == {"short-video": 1, "live": 2}
    domain_of = ds.item_domains()
    items = ds.items(["video_id", "category_level_two", "author_id", "domain"])
    cat, dom = items.column("category_level_two").to_numpy(), items.column("domain").to_numpy()
    # the second surface holds its share of every category's items (the same categories and creators)
    assert set(dom) == {1, 2} and (dom == 2).mean() == pytest.approx(0.25, abs=0.01)
    big = [c for c in np.unique(cat) if (cat == c).sum() >= 100]
    assert big and all(0.15 < (dom[cat == c] == 2).mean() < 0.35 for c in big)
    author = items.column("author_id").to_numpy()
    assert len(np.intersect1d(author[dom == 1], author[dom == 2])) > 100

    e = exposures(ds)
    rid, d = e.column("request_id").to_numpy(), domain_of[e.column("video_id").to_numpy()]
    # a request is on one surface: its exposures (and every stage sample) come from that surface's catalogue
    def one_surface_per_request(request: np.ndarray, domain: np.ndarray) -> dict:
        pairs = np.unique(np.stack([request, domain]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]
        return dict(zip(pairs[0], pairs[1]))

    exposed = one_surface_per_request(rid, d)
    samples = pa.concat_tables(t for _, t in ds.iter_days("stage_samples"))
    sampled = one_surface_per_request(samples.column("request_id").to_numpy(),
                                      domain_of[samples.column("video_id").to_numpy()])
    assert all(sampled[r] == exposed[r] for r in exposed)

    # who is where: second-surface-only users have no first-surface row, first-only users no second
    uid = e.column("user_id").to_numpy()
    first, second = set(uid[d == 1]), set(uid[d == 2])
    users = len(first | second)
    assert 0.1 < len(second - first) / users < 0.3      # second_domain_only_users = 0.2
    assert 0.2 < len(first - second) / users < 0.45     # first_domain_only_users = 0.3 (some never ask)
    assert 0.03 < (d == 2).mean() < 0.25                 # the second surface is the sparse one
    from fedpa.recdata.inspect import dataset_stats

    stats = dataset_stats(ds)["domains"]   # what `fedpa data inspect` prints per domain
    assert stats["live"]["exposures"] == int((d == 2).sum()) and stats["live"]["users"] == len(second)
    assert stats["short-video"]["exposures"] + stats["live"]["exposures"] == e.num_rows


def test_a_users_taste_transfers_across_surfaces_as_configured(world, tmp_path):
    """The oracle's per-surface user vectors correlate by domain_transfer: what the dense surface can teach."""
    def mean_cosine(ds: Dataset) -> float:
        table = pa.ipc.open_file(str(ds.path / "oracle" / "user_latent" / f"{ds.days[0]}.arrow")).read_all()
        a, b = (table.column(c).combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
                for c in ("latent", "latent_second"))
        return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    assert mean_cosine(world) == pytest.approx(0.7, abs=0.08)
    unrelated = Dataset(generate("tiny", tmp_path / "t0", seed=3, n_users=300, days=1,
                                **{**TWO, "domain_transfer": 0.0}))
    assert abs(mean_cosine(unrelated)) < 0.1
    # the oracle scores a second-surface item with the user's second-surface taste
    e = exposures(world).slice(0, 2000)
    vid, uid = e.column("video_id").to_numpy(), e.column("user_id").to_numpy()
    on_second = world.item_domains()[vid] == 2
    day = world.days[0]
    table = pa.ipc.open_file(str(world.path / "oracle" / "user_latent" / f"{day}.arrow")).read_all()
    second = table.column("latent_second").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    items = pa.ipc.open_file(str(world.path / "oracle" / "items.arrow")).read_all()
    latent = items.column("latent").combine_chunks().flatten().to_numpy().reshape(items.num_rows, -1)
    bias = items.column("bias").to_numpy()
    k = np.nonzero(on_second)[0][:20]
    expected = (second[uid[k]] * latent[vid[k]]).sum(1) + bias[vid[k]]
    assert np.allclose(oracle_utility(world, uid[k], vid[k], day), expected, atol=1e-5)


def test_a_one_surface_world_has_no_domains(tmp_path):
    ds = Dataset(generate("tiny", tmp_path / "one", seed=3, n_users=50, days=1))
    assert ds.domains == {} and "domain" not in ds.items().column_names
    with pytest.raises(DatasetError, match="one domain"):
        ds.domain_codes("live")
    with pytest.raises(FedpaError, match="second_domain_share"):
        resolve_config("tiny", second_domain_share=1.0)
    with pytest.raises(FedpaError, match="first_domain_only_users"):
        resolve_config("tiny", second_domain_share=0.2, second_domain_only_users=0.6, first_domain_only_users=0.6)


def test_the_writer_refuses_domains_it_cannot_name(tmp_path):
    items = pa.table({"video_id": np.arange(4), "author_id": np.ones(4, np.int64),
                      "category_level_one": np.ones(4, np.int64), "category_level_two": np.ones(4, np.int64),
                      "upload_type": np.ones(4, np.int64), "upload_timestamp": np.zeros(4, np.int64),
                      "duration": np.ones(4, np.int64), "domain": np.array([1, 1, 2, 3])})
    cases = [(items, None, "needs the names"),
             (items.drop_columns(["domain"]), {1: "a", 2: "b"}, "no 'domain' column"),
             (items, {1: "a", 2: "b"}, r"code\(s\) \[3\]"),
             (items, {1: "a"}, "at least two")]
    for table, names, message in cases:
        with DatasetWriter(tmp_path / "ds", source="test", overwrite=True) as w:
            with pytest.raises(DatasetError, match=message):
                w.write_items(table, domains=names)
    assert not (tmp_path / "ds").exists()  # nothing half-written


def test_rows_are_chosen_per_domain_and_users_by_their_other_domain(world):
    ds = world
    users = np.arange(300)
    lookups = Lookups.build(ds)
    splits = split_users(ds, users, SplitConfig("by-day"), lookups=lookups)
    domain_of = ds.item_domains()
    live = ds.domains["live"]

    single = select_domains(ds, splits, "live", "live")
    assert len(single.train) and set(domain_of[single.train.video_id]) == {live}
    assert set(domain_of[single.test.video_id]) == {live} and set(domain_of[single.val.video_id]) == {live}
    assert len(single.test) == int(np.sum(domain_of[splits.test.video_id] == live))

    cross = select_domains(ds, splits, "", "live")
    assert len(cross.train) == len(splits.train)  # every training row stays
    with_dense = select_domains(ds, splits, "", "live", "cross-domain")
    without = select_domains(ds, splits, "", "live", "single-domain")
    dense_users = set(splits.train.user_id[domain_of[splits.train.video_id] != live])
    assert set(with_dense.test.user_id) <= dense_users
    assert not set(without.test.user_id) & dense_users
    assert len(with_dense.test) + len(without.test) == len(cross.test)  # the two segments split the users
    assert len(with_dense.test) and len(without.test)

    # a single-domain platform: the other domain's rows are gone from the rows and from every behaviour sequence
    seen = select_domains(ds, splits, domains="live", eval_domains="live", eval_users="cross-domain")
    for ex in (seen.train, seen.val, seen.test):
        assert set(domain_of[ex.video_id]) <= {live}
        assert set(domain_of[ex.views.video_id]) == {live}
        history = ex.batch()["hist_items"][:, :, 0].numpy()       # video ids of each row's sequence
        mask = ex.batch()["hist_mask"].numpy()
        assert set(domain_of[history[mask]]) <= {live}
    # the users are told apart on the whole dataset: the same users as without the view
    assert set(seen.test.user_id) == set(with_dense.test.user_id) and len(seen.test) == len(with_dense.test)
    # and sequences of the full view do hold short-video views before those rows
    full = with_dense.test.batch()
    assert (domain_of[full["hist_items"][:, :, 0].numpy()[full["hist_mask"].numpy()]] != live).any()

    with pytest.raises(DatasetError, match="unknown domain.*tv"):
        select_domains(ds, splits, "tv", "")
    with pytest.raises(DatasetError, match="needs eval-domains"):
        select_domains(ds, splits, "", "", "cross-domain")
    loo = split_users(ds, users[:40], SplitConfig("loo", negatives=9), lookups=lookups)
    with pytest.raises(DatasetError, match="ranks cases"):
        select_domains(ds, loo, "", "live")
    assert select_domains(ds, loo, "live", "").group_size == loo.group_size  # training rows alone: fine


def test_an_imported_log_names_its_domains_and_a_device_subset_keeps_them(world, tmp_path):
    import pyarrow.csv as pcsv

    from fedpa.recdata.import_interactions import Mapping, import_interactions
    from fedpa.recdata.subset import write_user_subset

    log = pa.table({"uid": [1, 1, 2, 2], "vid": [10, 11, 10, 12], "ts": [1_685_000_000_000 + i for i in range(4)],
                    "click": [1, 0, 1, 1]})
    items = pa.table({"vid": [10, 11, 12], "surface": [1, 2, 2]})
    pcsv.write_csv(log, tmp_path / "log.csv")
    pcsv.write_csv(items, tmp_path / "items.csv")
    mapping = Mapping(user="uid", item="vid", timestamp="ts", labels={"effective_view": "click"}, item_id="vid",
                      item_columns={"domain": "surface"}, domains={1: "search", 2: "recommendation"})
    ds = Dataset(import_interactions(tmp_path / "log.csv", tmp_path / "imported", mapping,
                                     items=tmp_path / "items.csv"))
    assert ds.domains == {"search": 1, "recommendation": 2}
    assert sorted(ds.item_domains()[ds.items(["video_id"]).column("video_id").to_numpy()]) == [1, 2, 2]
    unnamed = Mapping(user="uid", item="vid", timestamp="ts", labels={"effective_view": "click"}, item_id="vid",
                      item_columns={"domain": "surface"})
    with pytest.raises(DatasetError, match="needs the names of its domains"):
        import_interactions(tmp_path / "log.csv", tmp_path / "unnamed", unnamed, items=tmp_path / "items.csv")
    # what a device is provisioned with keeps the domains of the dataset it came from
    sub = Dataset(write_user_subset(world, [5], tmp_path / "device"))
    assert sub.domains == world.domains
    assert np.array_equal(sub.item_domains(), world.item_domains()[:len(sub.item_domains())])


# ----------------------------------------------------------------------------- the domain-specific path


@pytest.fixture(scope="module")
def world_foundation(world, tmp_path_factory):
    from fedpa.simulations.pretraining import pretrain_foundation

    out = tmp_path_factory.mktemp("domains_foundation") / "foundation"
    pretrain_foundation(world.path, out, epochs=1, batch_size=1024)
    return out


def _domain_runtime(world, world_foundation, tmp_path, **kw):
    from fed_fixtures import fed_config

    from fedpa.client.runtime import ClientRuntime

    return ClientRuntime(fed_config(world.path, world_foundation, tmp_path / "run", algorithm="fedpa",
                                    max_clients=16, feature_cache="none", domain_adapters=True, **kw))


def test_each_row_takes_its_own_domains_path_and_a_merged_model_folds_one_domain(world, world_foundation, tmp_path):
    from fedpa.foundation.adapters import merge_for_user

    rt = _domain_runtime(world, world_foundation, tmp_path)
    pm = rt.model
    assert pm.config.domain_values == 3 and "domain" in pm.config.path_names
    shared = {n for n, _, g in pm.shared_spec() if "lora_domain" in n and g is None}
    assert shared, "the domain path is shared with everyone (no group membership)"
    user = next(u for u in (rt.user(c) for c in range(rt.num_clients))
                if {1, 2} <= set(pm.row_domains(u.test).tolist()))
    rows = pm.row_domains(user.test).numpy()
    before = pm.predict(user.test, user.profile)
    with torch.no_grad():   # move the live path only
        for name, p in pm.model.named_parameters():
            if "lora_domain_B" in name:
                p[2].normal_(0, 0.5)
    after = pm.predict(user.test, user.profile)
    assert np.array_equal(before[rows == 1], after[rows == 1])
    assert np.abs(before[rows == 2] - after[rows == 2]).min() > 0
    # the dense model of one domain computes what the adapted model computes for that domain's rows
    for domain in (1, 2):
        merged = merge_for_user(pm.model, 0, user.profile, domain=domain)
        dense = torch.sigmoid(merged.tower(user.test.features)[:, 0]).numpy()
        assert np.allclose(dense[rows == domain], after[rows == domain], atol=1e-5)
    with pytest.raises(FedpaError, match="folded for one domain"):
        merge_for_user(pm.model, 0, user.profile)


def test_the_engine_trains_the_domain_path_as_one_user_training_does_in_float64(world, world_foundation, tmp_path):
    from test_cohort import _one_by_one, _users, _worst_difference

    rt = _domain_runtime(world, world_foundation, tmp_path, batch_size=8, local_epochs=2, use_user_bias=True)
    users = _users(rt, double=True)
    assert any(len(set(rt.model.row_domains(u.train).tolist())) == 2 for u in users)  # mixed-domain batches
    shared0 = rt.model.get_shared()
    reference = _one_by_one(rt, users, shared0)
    moved = [k for k in shared0 if "lora_domain_B" in k]
    assert moved and any(np.abs(r[1][k] - shared0[k]).max() > 0 for r in reference for k in moved)
    assert _worst_difference(rt, users, shared0, reference, max_users=5) < 1e-9  # chunks of users of mixed domains
    # scoring: the engine's per-user scores are the one-user scores
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    engine = CohortEngine(rt.model)
    members = [CohortUser(u.train, u.profile, None, u.user_id) for u in users]
    scores = engine.predict(members, [[u.test] for u in users], shared0, rt.local)
    for u, s in zip(users, scores):
        rt.model.set_private(None)
        assert np.allclose(s[0], rt.model.predict(u.test, u.profile), atol=1e-9)


def test_a_federation_with_domain_adapters_runs_and_refuses_a_one_domain_dataset(world, world_foundation, tmp_path,
                                                                               tiny, tiny_foundation):
    from fed_fixtures import fed_config

    from fedpa.client.personal_store import generate_key_file
    from fedpa.simulations.simulate import simulate

    key = generate_key_file(tmp_path / "store.key")
    cfg = fed_config(world.path, world_foundation, tmp_path / "run", algorithm="fedpa", domain_adapters=True,
                     eval_domains="live", feature_cache=str(tmp_path / "cache"),
                     personal_store=str(tmp_path / "store"), personal_store_key_file=str(key))
    summary = simulate(cfg, cohort_size=6)
    assert summary["rounds"] == 2 and 0 < summary["test"]["auc"] < 1
    # a user's model is exported per domain: the live path folded, checked on the user's live rows
    from fedpa.client.runtime import ClientRuntime
    from fedpa.simulations.export_user import export_user

    rt = ClientRuntime(cfg)
    user = next(rt.user_of(c) for c in range(rt.num_clients)
                if (rt.model.row_domains(rt.user(c).test) == 2).sum() >= 2)
    report = export_user(cfg.run_dir, user, tmp_path / "export", int8=False, domain="live")
    assert report["domain"] == "live" and report["rows_checked"] >= 2
    assert report["fp32"]["max_abs_diff_vs_torch"] <= 1e-4
    with pytest.raises(FedpaError, match="one model per domain"):
        export_user(cfg.run_dir, user, tmp_path / "export2", int8=False)
    with pytest.raises(Exception, match="one domain"):
        simulate(fed_config(tiny, tiny_foundation, tmp_path / "one", algorithm="fedpa", domain_adapters=True),
                 cohort_size=6)


@pytest.mark.slow
def test_short_video_behaviour_helps_live_ranking_through_the_foundation(tmp_path):
    """Moment&Cross's transfer, on a two-surface world whose live taste follows the short-video taste (0.7): a
    foundation pre-trained on both surfaces, reading both in its sequences, ranks the live rows better than one
    that sees live only, for users with short-video history and, through what the dense rows teach it of the
    shared categories and creators, for live-only users too (~45 s)."""
    from fedpa.foundation.model import load_foundation
    from fedpa.recdata.partition import PartitionConfig, make_partition
    from fedpa.simulations.pretraining import metrics_of, pretrain_foundation, score_examples

    ds = Dataset(generate("tiny", tmp_path / "data", seed=0, days=4, n_users=1500, n_items=60_000,
                          second_domain_share=0.3, second_domain_activity=0.3, domain_transfer=0.7,
                          second_domain_only_users=0.1, first_domain_only_users=0.1))
    users = make_partition(ds, PartitionConfig(seed=0)).private_users
    gain = {}
    for view in ("live", ""):
        foundation = tmp_path / f"foundation-{view or 'all'}"
        pretrain_foundation(ds.path, foundation, epochs=2, batch_size=512, domains=view)
        model, lookups = load_foundation(foundation), Lookups.for_foundation(ds, foundation)
        splits = split_users(ds, users, SplitConfig("by-day"), lookups=lookups)
        for segment in ("cross-domain", "single-domain"):
            s = select_domains(ds, splits, eval_domains="live", eval_users=segment, domains=view)
            for split in ("val", "test"):
                m = metrics_of(getattr(s, split), score_examples(model, getattr(s, split)))
                for metric in ("auc", "gauc"):
                    sign = 1 if view == "" else -1
                    gain[segment, metric] = gain.get((segment, metric), 0.0) + sign * m[metric] / 2
    assert gain["cross-domain", "auc"] > 0.005 and gain["cross-domain", "gauc"] > 0.01, gain
    assert gain["single-domain", "auc"] > 0.02 and gain["single-domain", "gauc"] > 0.02, gain


@pytest.mark.slow
def test_the_domain_path_learns_what_the_sparse_surface_has_of_its_own(tmp_path):
    """UniCDR+'s specific part: on a world whose live surface has its own label rate and a taste every user
    shares there only, FedPA's model trained on both surfaces' rows (pooled, as `centralized` does) ranks the
    live rows better with the domain-specific path than without it, where one set of shared paths must serve
    both surfaces (~40 s)."""
    from fedpa.common.config import FederationConfig
    from fedpa.simulations.centralized import run_centralized
    from fedpa.simulations.pretraining import pretrain_foundation

    data = generate("tiny", tmp_path / "data", seed=0, days=4, n_users=1500, n_items=60_000,
                    second_domain_share=0.3, second_domain_activity=0.5, domain_transfer=0.7, second_domain_shift=2.0,
                    second_domain_only_users=0.1, first_domain_only_users=0.1)
    pretrain_foundation(data, tmp_path / "foundation", epochs=1, batch_size=1024)
    auc = {}
    for path in (False, True):
        summary = run_centralized(FederationConfig(
            data_dir=str(data), foundation=str(tmp_path / "foundation"), run_dir=str(tmp_path / f"run-{path}"),
            algorithm="centralized", num_rounds=5, local_epochs=1, lr=0.01, batch_size=32, eval_domains="live",
            domain_adapters=path, feature_cache="none"))
        auc[path] = (summary["val"]["auc"] + summary["test"]["auc"]) / 2
    assert auc[True] > auc[False] + 0.015, auc
