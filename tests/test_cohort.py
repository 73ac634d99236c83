"""The cohort engine (recmodels/cohort.py): the same local training as one user at a time, vectorized.

Exactness is checked twice: in float64 (where the engine and `PersonalModel.train_user` agree to
rounding, for every algorithm and ragged users over several steps and epochs), and end to end on
Flower's simulation runtime in float32 (cohort-size 1, one user per node, against a vectorized
cohort: shared state after 2 rounds and the per-user metrics within 1e-5).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from fed_fixtures import fed_config

from fedpa.recmodels.cohort import RowDeltas

ADAPTED = ("fedpa", "local", "fedavg-lora", "fedper", "fedper-ft", "ditto")


def _runtime(tiny, tiny_foundation, algorithm: str, tmp_path, **kw):
    from fedpa.client.runtime import ClientRuntime

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", algorithm=algorithm, max_clients=16,
                     feature_cache="none", **kw)
    return ClientRuntime(cfg)


def _users(rt, double: bool):
    users = [rt.user(c) for c in range(rt.num_clients)]
    if double:
        rt.model.model.double()
        if rt.model.item_bias is not None:
            rt.model.item_bias.double()
        for u in users:
            for split in (u.train, u.val, u.test):
                split.features = split.features.double()
                split.labels = split.labels.double()
    return users


def _one_by_one(rt, users, shared0):
    pm, out = rt.model, []
    for u in users:
        pm.set_shared(shared0)
        pm.set_private(None)
        stats = pm.train_user(u.train, u.profile, rt.local, seed=u.user_id)
        out.append((pm.get_private(), pm.get_shared(), stats))
    pm.set_shared(shared0)
    return out


def _worst_difference(rt, users, shared0, reference, max_users: int) -> float:
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    engine = CohortEngine(rt.model, max_users=max_users)
    members = [CohortUser(u.train, u.profile, None, u.user_id) for u in users]
    pm = rt.model
    # item-bias-update newton: the offset tables send statistics, not steps (compared in the newton tests below)
    newton = {"item_bias." + f for f in pm.item_bias.tables} if pm.item_bias_newton else set()
    worst, seen = 0.0, set()
    for chunk in engine.train(members, shared0, rt.local):
        assert chunk.finite.all()
        for k, i in enumerate(chunk.users):
            seen.add(int(i))
            private, shared, stats = reference[i]
            assert set(chunk.private[k]) == set(private)
            for key, v in chunk.private[k].items():
                worst = max(worst, float(np.abs(v - private[key]).max()))
            contributes = {key for key, d in chunk.deltas.items()
                           if k in (d.users if isinstance(d, RowDeltas) else d[0])}
            for key in shared:
                moved = shared[key] - shared0[key]
                if key in newton:
                    assert not moved.any(), key
                elif key in contributes:
                    d = chunk.deltas[key]
                    if isinstance(d, RowDeltas):   # a per-row entry: the user's own rows, sparse
                        got = d.dense(list(d.users).index(k), moved.shape)
                    else:
                        got = d[1][list(d[0]).index(k)]
                    worst = max(worst, float(np.abs(got - moved).max()))
                else:  # another group's row: the one-user path leaves it exactly as it was
                    assert not moved.any(), key
            if stats["n"]:
                worst = max(worst, abs(float(chunk.loss[k]) - stats["loss"]))
            else:
                assert np.isnan(chunk.loss[k]) and chunk.n[k] == 0
    assert seen == set(range(len(users)))
    return worst


@pytest.mark.parametrize("algorithm", ADAPTED + ("fedpa+shift", "fedpa+bias", "fedpa+items", "fedpa+emb", "fedpa+pop",
                                                 "fedpa+newton-emb", "fedpa+listwise", "ditto+listwise"))
def test_engine_matches_one_user_training_in_float64(tiny, tiny_foundation, tmp_path, algorithm):
    # small batches and 2 epochs: ragged users with 0 .. many steps, padding and masked steps
    # (+bias: fresh users' logit offsets are calibrated on their rows first, in both engines;
    # +items: with them, shared item-side tables that each user reads by its rows' items;
    # +emb: shared item embeddings and each user's private vector; +pop: the click tally and its weights,
    # with the steps; +newton-emb: offset tables stepped by the server, while the embeddings still train locally;
    # +listwise: the sampled-softmax term beside cross-entropy, over each step's rows of one user)
    name, _, option = algorithm.partition("+")
    emb = option in ("emb", "newton-emb")
    rt = _runtime(tiny, tiny_foundation, name, tmp_path, batch_size=8, local_epochs=2,
                  use_user_shift=option == "shift", use_user_bias=option in ("bias", "items", "newton-emb", "listwise"),
                  item_bias_fields="category_level_one,upload_type,video_id" if option == "items" or emb else "",
                  item_embedding_dim=4 if emb else 0, item_popularity=option == "pop",
                  item_popularity_steps=option == "pop",
                  item_bias_update="newton" if option == "newton-emb" else "adam")
    if option in ("items", "emb", "pop", "newton-emb"):  # the tables step at their own learning rate
        rt.local = replace(rt.local, item_bias_lr=0.05)
    if option == "newton-emb":   # and the embeddings and user vectors at theirs (item-embedding-lr)
        rt.local = replace(rt.local, embedding_lr=0.02)
    if option == "listwise":
        rt.local = replace(rt.local, listwise_weight=0.7)
    users = _users(rt, double=True)
    sizes = [len(u.train) for u in users]
    assert min(sizes) == 0 or max(sizes) > 3 * 8  # the population really is ragged
    shared0 = rt.model.get_shared()
    reference = _one_by_one(rt, users, shared0)
    for max_users in (1, 5, 64):  # chunking never changes a result
        assert _worst_difference(rt, users, shared0, reference, max_users) < 1e-9


def test_per_user_table_copies_hold_just_the_rows_each_user_reads(tiny, tiny_foundation, tmp_path):
    """The engine copies an item-side table per user only over the rows that user's items read (a video-id
    table has far more rows than a user reads); positions into them read the same rows as the item features."""
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    rt = _runtime(tiny, tiny_foundation, "fedpa", tmp_path, use_user_bias=True,
                  item_bias_fields="category_level_one,video_id", item_embedding_dim=4)
    users = _users(rt, double=False)[:5]
    engine = CohortEngine(rt.model)
    chunk_rows = engine._chunk_rows([[u.train] for u in users])
    table = rt.model.item_bias
    zero = table.rows(torch.zeros(1, users[0].train.items.shape[1], dtype=torch.long))
    for k, u in enumerate(users):
        for j, key in enumerate(chunk_rows.keys):
            mine = chunk_rows.rows[key][k]
            read = set(table.rows(u.train.items)[j].tolist()) | {int(zero[j][0])}
            assert set(mine.tolist()) == read and int(mine[0]) == int(zero[j][0])   # the padding row first
            local = chunk_rows.local(u.train.items, k)[:, j]
            assert torch.equal(mine[local], table.rows(u.train.items)[j])
    # several users' rows at once (how the engine asks): the same positions as one user at a time
    together = chunk_rows.local_many([u.train.items for u in users], list(range(len(users))))
    assert torch.equal(together, torch.cat([chunk_rows.local(u.train.items, k) for k, u in enumerate(users)]))
    # items the chunk was not made from are found afresh, not from the chunk's own
    other = users[1].train.items.clone()
    assert torch.equal(chunk_rows.read(other)[0], table.rows(other)[0])
    assert len(chunk_rows.rows["video_id"][0]) < table.tables["video_id"].shape[0] // 10
    members = [CohortUser(u.train, u.profile, None, 0) for u in users]
    params = engine._stack(members, engine._group_rows(members), chunk_rows)
    width = max(len(r) for r in chunk_rows.rows["video_id"])
    assert params["item_bias.tables.video_id"].shape == (5, width, table.tables["video_id"].shape[1])
    assert params["item_bias.embedding"].shape == (5, max(len(r) for r in chunk_rows.rows["video"]), 4)
    assert params["item_bias.user"].shape == (5, 1, 4)


def test_engine_matches_one_user_training_in_float32_defaults(tiny, tiny_foundation, tmp_path):
    rt = _runtime(tiny, tiny_foundation, "fedpa", tmp_path)
    users = _users(rt, double=False)
    shared0 = rt.model.get_shared()
    # float32: different matrix kernels (bmm over users vs mm) round differently, and Adam turns the
    # relative error of near-zero gradient entries into absolute steps; measured 2.1e-5 here
    assert _worst_difference(rt, users, shared0, _one_by_one(rt, users, shared0), 64) < 1e-4


@pytest.mark.parametrize("algorithm", ["fedpa", "fedper-ft", "ditto", "fedpa+items", "fedpa+emb", "fedpa+pop"])
def test_scores_match_personalized_scores(tiny, tiny_foundation, tmp_path, algorithm):
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    name, _, option = algorithm.partition("+")
    rt = _runtime(tiny, tiny_foundation, name, tmp_path, batch_size=16,
                  item_bias_fields="category_level_one,upload_type,video_id" if option else "",
                  item_embedding_dim=4 if option == "emb" else 0, item_popularity=option == "pop",
                  item_popularity_steps=option == "pop")
    users = _users(rt, double=True)
    pm = rt.model
    shared0 = pm.get_shared()
    rng = np.random.default_rng(1)
    for key in shared0:  # item-side offsets as after some rounds (they start at zero)
        if key.startswith("item_bias."):
            shared0[key] = rng.normal(0, 0.3, shared0[key].shape)
    # give every user a distinct private state, as after some rounds
    rng = np.random.default_rng(0)
    privates = [{k: v + rng.normal(0, 0.05, v.shape) for k, v in pm.initial_private.items()} for _ in users]
    members = [CohortUser(u.train, u.profile, p, u.user_id) for u, p in zip(users, privates)]
    scores = CohortEngine(pm, max_users=6).predict(members, [[u.val, u.test] for u in users], shared0, rt.local)
    for u, p, got in zip(users, privates, scores):
        pm.set_shared(shared0)
        pm.set_private(p)
        want = pm.personalized_scores(u.train, [u.val, u.test], u.profile, rt.local, seed=u.user_id)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            if len(a):
                assert np.abs(a - b).max() < 1e-9


def test_engine_reports_a_bad_private_state(tiny, tiny_foundation, tmp_path):
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    rt = _runtime(tiny, tiny_foundation, "fedpa", tmp_path)
    users = _users(rt, double=False)[:3]
    pm = rt.model
    bad = {k: np.zeros((v.shape[0] + 1,) + v.shape[1:], np.float32) for k, v in pm.initial_private.items()}
    members = [CohortUser(u.train, u.profile, bad if i == 1 else None, u.user_id, user_id=u.user_id)
               for i, u in enumerate(users)]
    from fedpa.foundation.errors import FedpaError

    with pytest.raises(FedpaError, match="personal state .* of user .* has shape"):
        list(CohortEngine(pm).train(members, None, rt.local))


def test_engine_looks_for_tied_weights_only_where_a_tensor_has_two_names(tiny, tiny_foundation, tmp_path):
    """functional_call's tied-weight search walks every module at every step: the engine skips it unless the
    scorer holds one tensor under two names, where skipping it would train one name and not the other."""
    from fedpa.recmodels.cohort import CohortEngine

    rt = _runtime(tiny, tiny_foundation, "fedpa", tmp_path)
    pm = rt.model
    assert CohortEngine(pm)._tied is False
    pm.tower.register_parameter("alias_of_a_weight", next(pm.tower.parameters()))
    assert CohortEngine(pm)._tied is True


def test_engine_flags_users_whose_training_diverged(tiny, tiny_foundation, tmp_path):
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    rt = _runtime(tiny, tiny_foundation, "fedpa", tmp_path)
    users = [u for u in _users(rt, double=False) if len(u.train)][:4]
    pm = rt.model
    poisoned = {k: np.full_like(v, np.nan) for k, v in pm.initial_private.items()}
    members = [CohortUser(u.train, u.profile, poisoned if i == 2 else None, u.user_id) for i, u in enumerate(users)]
    (chunk,) = list(CohortEngine(pm).train(members, None, rt.local))
    finite = {int(i): bool(f) for i, f in zip(chunk.users, chunk.finite)}
    assert finite == {0: True, 1: True, 2: False, 3: True}


def test_cohort_contribution_is_the_sum_of_user_contributions():
    from fedpa.common.aggregation import SharedTensor, client_contribution
    from fedpa.common.privacy import cohort_contribution, private_contribution, sensitivity

    spec = [SharedTensor("g", (3,)), SharedTensor("a0", (2,), "age=0"), SharedTensor("a1", (2,), "age=1"),
            SharedTensor("t", (4, 2), "per-row")]
    rng = np.random.default_rng(1)
    groups = [{"age=0"}, {"age=1"}, {"age=0"}, {"age=1"}]
    reads = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]], np.float32)  # user 2 read nothing
    per_user = [{"g": rng.normal(size=3).astype(np.float32), "a0": rng.normal(size=2).astype(np.float32),
                 "a1": rng.normal(size=2).astype(np.float32),
                 "t": (rng.normal(size=(4, 2)) * r[:, None]).astype(np.float32)} for r in reads]
    held = [np.nonzero(r)[0] for r in reads]   # per-row entries travel sparse: each user's own rows
    stacked = {"g": (np.arange(4), np.stack([d["g"] for d in per_user])),
               "t": RowDeltas(np.arange(4), held, [d["t"][h] for d, h in zip(per_user, held)])}
    for key, group in (("a0", "age=0"), ("a1", "age=1")):
        pos = np.array([i for i, g in enumerate(groups) if group in g])
        stacked[key] = (pos, np.stack([per_user[i][key] for i in pos]))
    keep = np.array([True, True, False, True])
    dp = dict(mode="central", n_count_terms=2, min_reply_fraction=0.5, cohort=4)
    for z, clip in ((0.0, 1.0), (1.0, 0.5)):  # without DP, and clipped (central noise is the server's)
        got = cohort_contribution(stacked, 4, spec, keep=keep, noise_multiplier=z, clip=clip, rows={"t": held}, **dp)
        want = None
        for i in np.nonzero(keep)[0]:
            c = (private_contribution(per_user[i], spec, groups[i], noise_multiplier=z, clip=clip,
                                      rows={"t": reads[i]}, **dp)
                 if z else client_contribution(per_user[i], spec, groups[i], rows={"t": reads[i]}))
            if z:  # one user moves the released sums by at most the sensitivity (age: G = 1, one table: P = 1)
                assert np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in c.values())) \
                    <= sensitivity(clip, 2) + 1e-6
            want = c if want is None else {k: want[k] + c[k] for k in want}
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-6)
    assert got["count/age=0"][0] == 1 and got["count/age=1"][0] == 2 and got["count/global"][0] == 3
    # under DP each user's per-row counts have norm 1: 1/sqrt(rows read) in each row it read
    np.testing.assert_allclose(got["count/rows:t"], [1 / np.sqrt(2) + 1 / np.sqrt(2), 1 / np.sqrt(2) + 1 / np.sqrt(3),
                                                     1 / np.sqrt(3), 1 / np.sqrt(3) + 1 / np.sqrt(2)], rtol=1e-6)


def test_cohort_contribution_sums_rows_in_one_pass_to_the_same_float32_bits():
    """The per-row entries, their Newton curvature counts and the click tally are summed for all users in one
    `np.add.at` each: the same additions in the same order as user by user, so the same float32 bits."""
    from fedpa.common.aggregation import TALLY, SharedTensor
    from fedpa.common.privacy import cohort_contribution

    rows_n, users = 50, 7
    spec = [SharedTensor("t", (rows_n, 3), "per-row"), SharedTensor("clicks", (rows_n,), TALLY)]
    rng = np.random.default_rng(3)
    held = [np.sort(rng.choice(rows_n, size=k, replace=False)) for k in (5, 0, 12, 1, 30, 7, 9)]
    values = [rng.normal(size=(len(r), 3)).astype(np.float32) * 1e3 for r in held]
    curvature = [rng.uniform(0.01, 5.0, size=len(r)).astype(np.float32) for r in held]
    clicked = [r[: len(r) // 2] for r in held]
    keep = np.array([True, True, False, True, True, True, True])
    got = cohort_contribution({"t": RowDeltas(np.arange(users), held, values, weights=curvature)}, users, spec,
                              keep=keep, noise_multiplier=0.0, clip=1.0, rows={"t": held, "clicks": clicked},
                              mode="central", n_count_terms=1, min_reply_fraction=0.5, cohort=users)
    total, counts, tally = (np.zeros((rows_n, 3), np.float32), np.zeros(rows_n, np.float32),
                            np.zeros(rows_n, np.float32))
    for u in np.nonzero(keep)[0]:
        np.add.at(counts, held[u], curvature[u] * np.float32(1.0))
        np.add.at(total, held[u], values[u] * np.float32(1.0))
        np.add.at(tally, clicked[u], np.float32(1.0))
    np.testing.assert_array_equal(got["t"], total)
    np.testing.assert_array_equal(got["count/rows:t"], counts)
    np.testing.assert_array_equal(got["clicks"], tally)


def test_cohort_contribution_noise_has_the_per_user_variance():
    from fedpa.common.aggregation import SharedTensor
    from fedpa.common.privacy import cohort_contribution

    spec = [SharedTensor("g", (20000,))]
    deltas = {"g": (np.arange(9), np.zeros((9, 20000), np.float32))}
    common = dict(noise_multiplier=1.0, clip=1.0, n_count_terms=0, min_reply_fraction=0.5, cohort=9)
    local = cohort_contribution(deltas, 9, spec, mode="local", **common)
    assert np.std(local["g"]) == pytest.approx(3.0, rel=0.03)  # 9 users, each N(0, (zC)^2)
    # distributed: no float noise here; the node's SecAgg+ client adds its users' share in fixed point
    dist = cohort_contribution(deltas, 9, spec, mode="distributed", **common)
    assert not dist["g"].any() and dist["count/global"][0] == 9


def _final_state(run_dir):
    from fedpa.server.rundir import RunDir

    _, arrays, _ = RunDir(run_dir).load_checkpoint()
    return arrays


def test_vectorized_cohorts_match_one_user_per_node_on_flower(tiny, tiny_foundation, tmp_path):
    """2 rounds on Flower's simulation runtime: 12 nodes of one user vs 3 nodes of 4 vectorized users."""
    from fedpa.simulations.simulate import simulate

    base = fed_config(tiny, tiny_foundation, tmp_path / "one", algorithm="fedpa", num_rounds=2)
    one = simulate(base, cohort_size=1)
    vec = simulate(replace(base, run_dir=str(tmp_path / "vec")), cohort_size=4)
    assert one["cohorts"]["secagg_participant"] == "user" and one["cohorts"]["nodes"] == 12
    assert vec["cohorts"]["engine"] == "vectorized" and vec["cohorts"]["nodes"] == 3
    a, b = _final_state(tmp_path / "one"), _final_state(tmp_path / "vec")
    assert set(a) == set(b)
    moved = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert moved <= 1e-5
    start = _final_state_round0(tiny_foundation)
    assert max(float(np.abs(a[k] - start[k]).max()) for k in a) > 1e-3  # the state really was trained
    ma = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "vec" / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        for split in ("val", "test"):
            for key in ("auc", "gauc", "logloss"):  # aggregated from the per-user metric sums
                assert abs(ra["eval"][split][key] - rb["eval"][split][key]) <= 1e-5, (ra["round"], split, key)
        if ra["round"]:
            assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-5


def _final_state_round0(foundation):
    """The shared state every run starts from (the model's initialisation for seed 0)."""
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.personalization import PersonalModel, get_algorithm

    torch.manual_seed(0)
    return PersonalModel(load_foundation(foundation), get_algorithm("fedpa"), seed=0, r=4, lora_alpha=4).get_shared()


def test_calibrated_bias_is_the_users_base_rate_shrunk_by_its_prior():
    from fedpa.recmodels.personalization import calibrated_bias

    n = 400
    logits = torch.full((n, 2), -1.0)
    labels = torch.zeros(n, 2)
    labels[:300, 0] = 1.0                 # task 0: rate 0.75
    labels[:, 1] = -1.0                   # task 1: never observed
    b = calibrated_bias(logits, labels, prior_var=1e6)
    assert b[0].item() == pytest.approx(np.log(0.75 / 0.25) + 1.0, abs=1e-4)  # logit(rate) - model logit
    assert b[1].item() == 0.0
    few = calibrated_bias(logits[:8], torch.tensor([[1.0, -1.0]] * 6 + [[0.0, -1.0]] * 2), prior_var=1.0)
    assert 0 < few[0].item() < b[0].item()  # the same rate from 8 rows is believed less

    # several users solved at once (the cohort engine's fresh users): each equals its own solve
    gen = torch.Generator().manual_seed(0)
    sizes = [5, 1, 40, 17]
    z = torch.randn(sum(sizes), 2, generator=gen, dtype=torch.float64)
    y = (torch.rand(sum(sizes), 2, generator=gen) < 0.4).double()
    y[torch.rand(sum(sizes), generator=gen) < 0.3, 1] = -1.0
    owner = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    together = calibrated_bias(z, y, users=owner, n_users=len(sizes))
    alone = torch.stack([calibrated_bias(z[owner == k], y[owner == k]) for k in range(len(sizes))])
    assert together.shape == (4, 2) and torch.allclose(together, alone, rtol=0, atol=1e-12)
    assert len(set(together[:, 0].tolist())) == 4

def test_a_fresh_user_starts_from_its_calibrated_offsets_once(tiny, tiny_foundation, tmp_path):
    from fedpa.recmodels.personalization import LocalTraining, calibrated_bias

    rt = _runtime(tiny, tiny_foundation, "fedpa", tmp_path, use_user_bias=True)
    pm = rt.model
    user = next(u for u in (rt.user(c) for c in range(rt.num_clients)) if len(u.train) > 20)
    pm.set_private(None)
    with torch.no_grad(), pm._route(user.train, torch.as_tensor(user.profile[pm.group_columns]), 0):
        want = calibrated_bias(pm.tower(user.train.features), user.train.labels[:, pm.task_columns])
    assert want.abs().max() > 0.05
    still = LocalTraining(epochs=1, lr=1e-9)  # the steps move nothing: what remains is the calibration
    pm.train_user(user.train, user.profile, still, seed=0)
    got = torch.from_numpy(pm.get_private()[pm.user_bias_key])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    half = type(user.train)(user.train.features[:10], user.train.labels[:10])
    pm.train_user(half, user.profile, still, seed=1)  # a returning user keeps (and trains) its offsets
    torch.testing.assert_close(torch.from_numpy(pm.get_private()[pm.user_bias_key]), want, atol=1e-6, rtol=0)


def test_newton_item_statistics_match_one_user_training_in_float64(tiny, tiny_foundation, tmp_path):
    """item-bias-update newton: for every table and user, the engine sends the rows the user read, -Σ(p - y) and
    Σ p(1 - p) at the round's start (fresh users' offsets calibrated first), as `PersonalModel.train_user`
    computes them, and the tables never train locally."""
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    rt = _runtime(tiny, tiny_foundation, "fedpa", tmp_path, batch_size=8, use_user_bias=True,
                  item_bias_fields="category_level_one,video_id", item_bias_update="newton", item_bias_prior=10.0)
    users = _users(rt, double=True)
    pm = rt.model
    shared0 = pm.get_shared()
    reference = []
    for u in users:
        pm.set_shared(shared0)
        pm.set_private(None)
        pm.train_user(u.train, u.profile, rt.local, seed=u.user_id)
        reference.append({k: tuple(np.copy(x) for x in v) for k, v in pm.item_statistics.items()} if len(u.train)
                         else None)
        for name in ("item_bias.category_level_one", "item_bias.video_id"):
            assert np.array_equal(pm.get_shared()[name], shared0[name])     # not trained locally
    pm.set_shared(shared0)
    engine = CohortEngine(pm, max_users=5)
    checked = 0
    for chunk in engine.train([CohortUser(u.train, u.profile, None, u.user_id) for u in users], shared0, rt.local):
        for name in ("item_bias.category_level_one", "item_bias.video_id"):
            d = chunk.deltas[name]
            for k, i in enumerate(chunk.users):
                if reference[i] is None:
                    assert len(d.rows[k]) == 0
                    continue
                rows, g, h = reference[i][name]
                assert np.array_equal(d.rows[k], rows) and np.array_equal(chunk.rows[name][k], rows)
                assert np.abs(d.values[k] - g).max() < 1e-6 and np.abs(d.weights[k] - h).max() < 1e-6
                assert np.abs(g).max() > 0 and h.min() > 0
                checked += 1
    assert checked >= 2 * sum(r is not None for r in reference)


def test_newton_item_offsets_are_the_same_with_either_engine_on_flower(tiny, tiny_foundation, tmp_path):
    """item-bias-update newton through Flower's runtime: nodes training their users one by one (the path a
    deployed node takes) and vectorized end a round with the same offset tables, and the tables moved."""
    from fedpa.simulations.simulate import simulate

    base = fed_config(tiny, tiny_foundation, tmp_path / "loop", algorithm="fedpa", num_rounds=1, max_clients=8,
                      use_user_bias=True, item_bias_fields="category_level_one,video_id", item_bias_update="newton",
                      item_bias_prior=10.0, cohort_engine="loop")
    simulate(base, cohort_size=4)
    simulate(replace(base, run_dir=str(tmp_path / "vec"), cohort_engine="vectorized"), cohort_size=4)
    a, b = _final_state(tmp_path / "loop"), _final_state(tmp_path / "vec")
    for name in ("item_bias.category_level_one", "item_bias.video_id"):
        assert float(np.abs(a[name]).max()) > 1e-2
        assert float(np.abs(a[name] - b[name]).max()) <= 1e-5
