import numpy as np
import pytest
from toy_data import assert_sequences_precede_requests, write_toy_dataset

from fedpa.recdata.examples import Lookups
from fedpa.recdata.partition import (
    Partition,
    PartitionConfig,
    SplitConfig,
    make_partition,
    round_training_rows,
    split_users,
)
from fedpa.recdata.store import Dataset, DatasetError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return Dataset(write_toy_dataset(tmp_path_factory.mktemp("d") / "ds", n_users=20, n_days=5,
                                     with_history=True))


def test_fedpa_open_rule_and_determinism(ds):
    cfg = PartitionConfig(seed=3)
    p = make_partition(ds, cfg)
    assert len(np.intersect1d(p.open_users, p.private_users)) == 0
    assert len(p.open_users) + len(p.private_users) == 20
    # 80% of the 4 most active + 20% of the other 16 = 3 + 3 open users
    assert len(p.open_users) == round(0.8 * 4) + round(0.2 * 16)
    q = make_partition(ds, cfg)
    assert np.array_equal(p.private_users, q.private_users)
    assert p.user_of(0) == p.private_users[0]
    with pytest.raises(DatasetError, match="out of range"):
        p.user_of(p.num_clients)


def test_partition_save_load(ds, tmp_path):
    p = make_partition(ds, PartitionConfig(seed=1, max_clients=5))
    assert p.num_clients == 5
    p.save(tmp_path / "p.json")
    q = Partition.load(tmp_path / "p.json")
    assert np.array_equal(q.private_users, p.private_users) and q.config == p.config


def test_activity_attribute_rule(ds):
    p = make_partition(ds, PartitionConfig(activity_attribute="age", active_values=(1,),
                                           open_active_fraction=1.0, open_rest_fraction=0.0))
    ages = dict(zip(ds.users().column("user_id").to_pylist(), ds.users().column("age").to_pylist()))
    assert all(ages[u] == 1 for u in p.open_users)
    with pytest.raises(DatasetError, match="unknown activity attribute"):
        make_partition(ds, PartitionConfig(activity_attribute="shoe_size"))


def test_by_day_split_and_sequences_never_see_the_future(ds):
    s = split_users(ds, np.array([2, 5]), SplitConfig("by-day"))
    day = lambda ex: ex.request_timestamp // 86_400_000  # noqa: E731
    assert day(s.train).max() < day(s.val).min() <= day(s.val).max() < day(s.test).min()
    for ex in (s.train, s.val, s.test):
        assert_sequences_precede_requests(ex)
    # the first request of user 2 sees exactly its 3 history views
    first = s.train.batch(np.array([0]))
    assert int(first["hist_mask"].sum()) == 3


def test_chrono_split_fractions(ds):
    s = split_users(ds, np.array([4]), SplitConfig("chrono"))
    n = len(s.train) + len(s.val) + len(s.test)
    assert n == 5 * 3 * 2
    assert (len(s.train), len(s.val), len(s.test)) == (18, 6, 6)
    assert s.train.request_timestamp.max() <= s.val.request_timestamp.min()


def test_leave_one_out_with_negatives(ds):
    s = split_users(ds, np.array([1, 7]), SplitConfig("loo", negatives=9), seed=0)
    assert s.group_size == 10
    assert len(s.test) == 2 * 10
    lab = s.test.labels[:, 0].reshape(-1, 10)
    assert (lab[:, 0] == 1).all() and (lab[:, 1:] == 0).all()
    # negatives are items the user never interacted with
    for case in range(2):
        rows = slice(case * 10, case * 10 + 10)
        u = s.test.user_id[rows][0]
        seen = set(ds.user_rows("exposures", int(u)).column("video_id").to_pylist())
        assert not seen & set(s.test.video_id[rows][1:].tolist())
    # training: every positive but the last two, each with 4 unseen negatives
    tr = s.train.labels[:, 0]
    assert (tr == 0).sum() == 4 * (tr == 1).sum() > 0
    for u in (1, 7):
        seen = set(ds.user_rows("exposures", u).column("video_id").to_pylist())
        negs = s.train.video_id[(s.train.user_id == u) & (tr == 0)]
        assert not seen & set(negs.tolist())
    again = split_users(ds, np.array([1, 7]), SplitConfig("loo", negatives=9), seed=0)
    assert np.array_equal(again.test.video_id, s.test.video_id)


def test_shuffled_leave_one_out_batches_keep_a_positive_with_its_negatives(ds):
    """Leave-one-out rows carry no request id; a positive and its sampled negatives share (user, time), hence
    one behaviour sequence, and pre-training's batches keep them together so the encoder runs once for them
    (about 5 times fewer sequences than rows shuffled one by one)."""
    import torch

    train = split_users(ds, np.array([1, 7, 11]), SplitConfig("loo", negatives=9), seed=0).train
    assert train.request_id is None and len(train) >= 40
    order = train.row_order(shuffle=True, seed=3, by_request=True)
    assert sorted(order.tolist()) == list(range(len(train)))
    where = np.empty(len(train), int)
    where[order] = np.arange(len(train))
    groups: dict[tuple[int, int], list[int]] = {}
    for k, key in enumerate(zip(train.user_id.tolist(), train.request_timestamp.tolist())):
        groups.setdefault(key, []).append(k)
    assert min(len(m) for m in groups.values()) == 5          # a positive and its 4 negatives at least
    for members in groups.values():                           # each group's rows come one after another
        assert (np.diff(np.sort(where[members])) == 1).all()
    assert not np.array_equal(train.row_order(shuffle=True, seed=4, by_request=True), order)
    assert not np.array_equal(order, np.arange(len(train)))
    # a batch of 10 rows spans at most 3 groups, so at most 3 distinct sequences to encode
    b = next(train.iter_batches(10, shuffle=True, seed=3, by_request=True))
    key = torch.cat([b["hist_items"].reshape(10, -1), b["hist_mask"].long()], 1)
    assert len(torch.unique(key, dim=0)) <= 3
    np.testing.assert_array_equal(b["user_id"].numpy(), train.user_id[order[:10]])


def test_a_negative_pool_draws_more_negatives_once_and_each_round_trains_a_fresh_share(ds):
    base = split_users(ds, np.array([1, 7]), SplitConfig("loo", negatives=9), seed=0)
    pooled = split_users(ds, np.array([1, 7]), SplitConfig("loo", negatives=9, negative_pool=3), seed=0)
    # the ranking cases do not depend on the pool: every run is scored on the same candidates
    for name in ("val", "test"):
        assert np.array_equal(getattr(base, name).video_id, getattr(pooled, name).video_id)
    tr = pooled.train.labels[:, 0]
    assert (tr == 0).sum() == 12 * (tr == 1).sum() > 0
    assert np.array_equal(pooled.train.video_id[tr == 1], base.train.video_id[base.train.labels[:, 0] == 1])
    labels = tr[pooled.train.user_id == 7]
    picks = [round_training_rows(labels, 3, seed=0, user=7, round_=r) for r in (1, 2, 3)]
    for rows in picks:
        kept = labels[rows]
        assert (kept == 1).sum() == (labels == 1).sum()          # every positive, every round
        assert (kept == 0).sum() == 4 * (kept == 1).sum()        # 4 negatives per positive, as without a pool
        assert np.all(np.diff(rows) > 0)                          # in row order
    assert not np.array_equal(picks[0], picks[1])                # a fresh share each round ...
    assert np.array_equal(picks[1], round_training_rows(labels, 3, seed=0, user=7, round_=2))   # ... reproducibly
    assert round_training_rows(labels, 1, seed=0, user=7, round_=5) is None
    with pytest.raises(DatasetError, match="negative_pool"):
        SplitConfig("loo", negative_pool=0)


def test_last_split(ds):
    s = split_users(ds, np.array([3]), SplitConfig("last"))
    assert len(s.val) == len(s.test) == 1
    assert s.val.request_timestamp[0] <= s.test.request_timestamp[0]


def test_bulk_and_single_user_loading_agree(ds):
    lk = Lookups.build(ds)
    many = split_users(ds, np.arange(20), SplitConfig("by-day"), lookups=lk)
    one = split_users(ds, np.array([6]), SplitConfig("by-day"), lookups=lk)
    rows = many.test.user_id == 6
    a, b = many.test.subset(np.nonzero(rows)[0]).batch(), one.test.batch()
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_bad_split_config():
    with pytest.raises(DatasetError, match="unknown split"):
        SplitConfig("random")
    with pytest.raises(DatasetError, match="sum to 1"):
        SplitConfig("chrono", fractions=(0.5, 0.2, 0.2))


def test_open_users_can_join_the_federation_as_clients(ds, tmp_path):
    base = make_partition(ds, PartitionConfig(seed=3))
    p = make_partition(ds, PartitionConfig(seed=3, federate_open_users=True))
    # who is open (pre-training material) does not change; the open users are clients as well
    assert np.array_equal(p.open_users, base.open_users) and np.array_equal(p.private_users, base.private_users)
    assert np.array_equal(base.clients, base.private_users) and base.num_clients == 14
    assert p.num_clients == 20 and np.array_equal(p.clients, np.sort(np.concatenate([p.open_users, p.private_users])))
    assert [p.user_of(i) for i in range(p.num_clients)] == p.clients.tolist()
    with pytest.raises(DatasetError, match=r"out of range \(0..19\)"):
        p.user_of(20)
    p.save(tmp_path / "p.json")
    q = Partition.load(tmp_path / "p.json")
    assert q.config.federate_open_users and np.array_equal(q.clients, p.clients)


def test_an_open_client_trains_on_its_own_earlier_rows_and_is_scored_on_its_held_out_ones(tiny, tiny_foundation,
                                                                                          tmp_path):
    """MRFF's protocol with open users federated: an open user's client holds exactly its rows of the
    split, and the rows it is scored on are not among those the foundation was pre-trained on."""
    from fed_fixtures import fed_config

    from fedpa.client.runtime import ClientRuntime, partition_config

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", split="last", max_clients=4, feature_cache="none",
                     federate_open_users=True)
    rt = ClientRuntime(cfg)
    part = make_partition(Dataset(tiny), partition_config(cfg))
    assert rt.num_clients == 4 + len(part.open_users) and len(part.open_users) > 0
    uid = int(part.open_users[0])
    index = int(np.searchsorted(part.clients, uid))
    user = rt.user(index)
    assert user.user_id == uid
    pretrained_on = split_users(Dataset(tiny), part.open_users, SplitConfig("last"))  # what `fedpa pretrain` reads
    mine = split_users(Dataset(tiny), np.array([uid]), SplitConfig("last"))
    assert (len(user.train), len(user.val), len(user.test)) == (len(mine.train), 1, 1)
    seen = pretrained_on.train.user_id == uid
    pretrained_rows = set(zip(pretrained_on.train.request_timestamp[seen].tolist(),
                              pretrained_on.train.video_id[seen].tolist()))
    assert len(pretrained_rows) == len(mine.train)
    for held_out in (mine.val, mine.test):
        assert (int(held_out.request_timestamp[0]), int(held_out.video_id[0])) not in pretrained_rows


def test_sampled_negatives_are_uniform_over_the_unseen_items():
    """A regression: the distinct draw used to keep the smallest ids of each batch of candidates, so negatives
    favoured low ids (in an import renumbered by original id, the oldest and most popular items)."""
    from fedpa.recdata.partition import sample_unseen

    rng = np.random.default_rng(0)
    seen = np.array([3, 500, 9_000])
    draws = np.concatenate([sample_unseen(10_000, seen, 99, rng) for _ in range(300)])
    assert not np.isin(draws, seen).any()
    assert abs(draws.mean() - 5_000) < 150                 # uniform over [0, 10,000): mean 5,000, s.e. ~ 17
    assert abs((draws < 5_000).mean() - 0.5) < 0.02
    case = sample_unseen(10_000, seen, 99, np.random.default_rng(1))
    assert len(np.unique(case)) == 99 and not (np.diff(case) > 0).all()   # distinct, in the order drawn
