"""The published federated recommenders (recmodels/collaborative.py): their update rules as the official code
has them, their state, and that each learns a small two-taste world through fedpa's own aggregation."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedpa.common.aggregation import apply_sums, client_contribution, spec_from, sum_updates
from fedpa.common.config import FederationConfig, with_recipe
from fedpa.foundation import metrics as M
from fedpa.recmodels.algorithms import get_algorithm
from fedpa.recmodels.collaborative import CFOptions, CollaborativeModel, _normals
from fedpa.recmodels.personalization import LocalTraining, UserTensors

N_ITEMS, N_USERS = 60, 40


def _rows(items: list[int], labels: list[float]) -> UserTensors:
    it = torch.zeros(len(items), 6, dtype=torch.long)
    it[:, 0] = torch.tensor(items)
    lab = torch.full((len(items), 6), -1.0)
    lab[:, 0] = torch.tensor(labels)
    return UserTensors(torch.zeros(len(items), 0), lab, it)


def two_tastes(seed: int = 0):
    """Users 0..19 click items 0..29, users 20..39 items 30..59, the first items of a taste most often
    (popularity 1 / rank); per user 6 training clicks and a held-out one, ranked against 19 items the user never
    clicked."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, 31)
    popularity /= popularity.sum()
    train, test = {}, {}
    for u in range(N_USERS):
        own = np.arange(30) + (30 if u >= 20 else 0)
        clicks = rng.choice(own, 7, replace=False, p=popularity)
        unseen = np.setdiff1d(np.arange(N_ITEMS), clicks)
        train[u] = _rows(clicks[:6].tolist(), [1.0] * 6)
        test[u] = _rows([int(clicks[6]), *rng.choice(unseen, 19, replace=False).tolist()], [1.0] + [0.0] * 19)
    return train, test


def federate(model: CollaborativeModel, train, test, rounds: int, local: LocalTraining) -> float:
    """FedAvg rounds through fedpa's aggregation (client_contribution / apply_sums), every user every round;
    returns the test HR@5."""
    spec = spec_from(model.shared_spec())
    state, private = model.get_shared(), {}
    for r in range(1, rounds + 1):
        contributions = []
        for u in range(N_USERS):
            model.set_shared(state)
            model.set_private(private.get(u))
            model.train_user(train[u], None, LocalTraining(**{**local.__dict__, "round": r}), seed=1000 * r + u,
                             exclude=test[u].items[:1, 0].numpy())
            private[u] = model.get_private()
            delta = {k: v - state[k] for k, v in model.get_shared().items()}
            contributions.append(client_contribution(delta, spec, set(), rows=model.touched_rows(train[u])))
        state = apply_sums(state, sum_updates(contributions, spec), spec)
    scores = []
    for u in range(N_USERS):
        model.set_shared(state)
        model.set_private(private[u])
        scores.append(model.personalized_scores(train[u], [test[u]], None, local, seed=u)[0])
    s = np.array(scores)
    return M.hit_ndcg_at_k(s[:, 0], s[:, 1:], 5)["hr"]


@pytest.mark.parametrize("name, options, local, rounds", [
    ("fedmf", {}, LocalTraining(epochs=5, lr=0.05, batch_size=64), 10),
    ("pfedrec", {}, LocalTraining(epochs=1, lr=0.1, batch_size=256), 20),        # the official settings
    ("fedrap", {"fedrap_item_lr": 10.0, "lr": 0.1}, LocalTraining(epochs=10, lr=0.1, batch_size=2048), 15),
])
def test_each_learns_the_two_tastes(name, options, local, rounds):
    train, test = two_tastes()
    model = CollaborativeModel(get_algorithm(name), N_ITEMS, seed=0, options=CFOptions(dim=8, **options))
    hr = federate(model, train, test, rounds, local)
    assert hr >= 0.55, hr   # random ranking of 20 candidates: HR@5 = 0.25


def test_pfedrec_steps_the_score_function_then_the_items_at_lr_times_items_times_eta():
    model = CollaborativeModel(get_algorithm("pfedrec"), N_ITEMS, seed=0, options=CFOptions(dim=4, pfedrec_eta=2.0))
    before_shared, before_private = model.get_shared(), model.get_private()
    data = _rows([3], [1.0])
    model.o = CFOptions(dim=4, pfedrec_eta=2.0, resample_negatives=False)   # one positive row, no negatives
    model.train_user(data, None, LocalTraining(epochs=1, lr=0.1, batch_size=8), seed=0)
    e0, w0, b0 = (torch.from_numpy(before_shared["cf.item_emb"][3]), torch.from_numpy(before_private["cf.score_w"]),
                  torch.from_numpy(before_private["cf.score_b"]))
    p0 = torch.sigmoid(e0 @ w0 + b0[0])
    w1 = w0 - 0.1 * (p0 - 1) * e0                       # BCE gradient wrt w is (p - y) e
    b1 = b0 - 0.1 * (p0 - 1)
    p1 = torch.sigmoid(e0 @ w1 + b1[0])
    e1 = e0 - 0.1 * N_ITEMS * 2.0 * (p1 - 1) * w1       # then the item, from a fresh forward, at lr * n * eta
    got_shared, got_private = model.get_shared(), model.get_private()
    np.testing.assert_allclose(got_private["cf.score_w"], w1.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_shared["cf.item_emb"][3], e1.numpy(), rtol=1e-5, atol=1e-5)
    untouched = np.delete(np.arange(N_ITEMS), 3)
    assert np.array_equal(got_shared["cf.item_emb"][untouched], before_shared["cf.item_emb"][untouched])


def test_pfedrec_eta_is_a_configuration_key_the_built_model_steps_by(tiny, tiny_foundation, tmp_path):
    """Its official 80 suits catalogues of a few thousand items; `small`'s 100,000 need ~1,000 times less
    (docs/results.md), so it is searched on validation like FedRAP's settings."""
    from fed_fixtures import fed_config

    from fedpa.common.config import ConfigValueError
    from fedpa.common.models import build_personal_model

    assert FederationConfig().pfedrec_eta == 80.0
    model = build_personal_model(fed_config(tiny, tiny_foundation, tmp_path, algorithm="pfedrec", pfedrec_eta=0.5))
    assert model.o.pfedrec_eta == 0.5
    with pytest.raises(ConfigValueError, match="pfedrec-eta must be > 0, got 0"):
        FederationConfig(algorithm="pfedrec", pfedrec_eta=0).validate()


def test_pfedrec_and_fedrap_average_over_the_round_clients_fedmf_over_each_row_readers():
    assert [g for _, _, g in CollaborativeModel(get_algorithm("pfedrec"), N_ITEMS).shared_spec()] == [None]
    assert [g for _, _, g in CollaborativeModel(get_algorithm("fedrap"), N_ITEMS).shared_spec()] == [None]
    fedmf = CollaborativeModel(get_algorithm("fedmf"), N_ITEMS, options=CFOptions(resample_negatives=True))
    assert {g for _, _, g in fedmf.shared_spec()} == {"per-row"}
    fedmf.train_user(_rows([1, 2], [1.0, 1.0]), None, LocalTraining(epochs=1, lr=0.01), seed=3)
    rows = fedmf.touched_rows(_rows([1, 2], [1.0, 1.0]))["cf.item_emb"]
    assert rows[1] == rows[2] == 1 and rows.sum() == 2 + len(np.unique(fedmf._last_negatives))


def test_fedrap_keeps_only_the_trained_personality_rows_and_a_decayed_fixed_init_elsewhere():
    model = CollaborativeModel(get_algorithm("fedrap"), N_ITEMS, seed=5, options=CFOptions(dim=4))
    model.train_user(_rows([7, 9], [1.0, 1.0]), None, LocalTraining(epochs=2, lr=0.1, batch_size=16, round=3),
                     seed=0)
    state = model.get_private()
    trained = state["cf.personal_rows"]
    assert 7 in trained and 9 in trained and len(trained) <= 2 + 8 and (np.diff(trained) > 0).all()
    untouched = np.setdiff1d(np.arange(N_ITEMS), trained)[:3]
    init = _normals(int(state["cf.personal_key"][0]), untouched, 4)
    # two full-batch steps at item lr 200 and 200 * 0.95, weight decay 1e-4 (the official defaults)
    scale = (1 - 200 * 1e-4) * (1 - 200 * 0.95 * 1e-4)
    np.testing.assert_allclose(state["cf.personal_scale"], [scale], rtol=1e-6)
    np.testing.assert_allclose(model._personal_rows(untouched, model.private).numpy(), scale * init, rtol=1e-6)
    # the init is N(0, 1) and a pure function of (key, row)
    big = _normals(1, np.arange(20_000), 8)
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    np.testing.assert_array_equal(_normals(1, np.array([42, 7]), 8), big[[42, 7]])


def test_fedrap_rounds_equal_the_official_dense_training_of_whole_tables():
    """Two rounds of one user against FedRAP's official client written out densely (whole personality and
    commonality tables as parameters of one SGD with weight decay, ExponentialLR per step, the running-loss
    stop): the stored rows, the scale and the shared table equal it everywhere."""
    n, d, lr, item_lr, wd = N_ITEMS, 4, 0.5, 200.0, 1e-4
    model = CollaborativeModel(get_algorithm("fedrap"), n, seed=2,
                               options=CFOptions(dim=d, resample_negatives=False, lr=lr, fedrap_item_lr=item_lr))
    key = int(model.get_private()["cf.personal_key"][0])
    D = torch.from_numpy(_normals(key, np.arange(n), d)).clone().requires_grad_(True)
    C = torch.from_numpy(model.get_shared()["cf.item_common"]).clone().requires_grad_(True)
    w = torch.from_numpy(model.get_private()["cf.score_w"]).clone().requires_grad_(True)
    b = torch.from_numpy(model.get_private()["cf.score_b"]).clone().requires_grad_(True)
    rounds = [([3, 8, 8, 21, 40], [1, 1, 0, 0, 1]), ([8, 11, 40, 59], [0, 1, 1, 0])]
    for r, (items, labels) in enumerate(rounds, start=1):
        round_lr = lr * 0.97 ** (r - 1)
        model.train_user(_rows(items, labels), None,
                         LocalTraining(epochs=10, lr=round_lr, batch_size=2048, round=r + 2), seed=r)
        lam = mu = 0.1 * np.tanh(r / 10)
        opt = torch.optim.SGD([{"params": [w, b], "lr": round_lr},
                               {"params": [D, C], "lr": item_lr * round_lr / lr}], weight_decay=wd)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
        idx, y = torch.tensor(items), torch.tensor(labels, dtype=torch.float32)
        total, count, running = 0.0, 0, None
        for _ in range(10):
            p = torch.sigmoid((C[idx] + D[idx]) @ w + b[0])
            loss = (torch.nn.functional.binary_cross_entropy(p, y) - lam * torch.nn.functional.mse_loss(D[idx], C[idx])
                    + mu * C[idx].abs().mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + float(loss.detach()) * len(items), count + len(items)
            before, running = running, total / count
            if before is not None and abs(running - before) < 1e-4 * abs(before):
                break
    np.testing.assert_allclose(model.get_shared()["cf.item_common"], C.detach().numpy(), rtol=1e-4, atol=1e-6)
    got = model._personal_rows(np.arange(n), model.private).numpy()
    np.testing.assert_allclose(got, D.detach().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.get_private()["cf.score_w"], w.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(got[0], _normals(key, np.array([0]), d)[0])   # an untouched row shrank


def test_personal_state_round_trips_and_a_wrong_one_is_refused():
    model = CollaborativeModel(get_algorithm("fedmf"), N_ITEMS)
    state = model.get_private()
    model.set_private(state)
    assert model.get_private().keys() == state.keys()
    with pytest.raises(Exception, match="lacks 'cf.user_emb'"):
        model.set_private({"cf.score_w": np.zeros(32, np.float32)})
    with pytest.raises(Exception, match="outside the model's 60 items"):
        model.predict(_rows([60], [1.0]))


def test_an_algorithm_recipe_fills_only_what_the_user_did_not_give():
    cfg = FederationConfig(algorithm="pfedrec", lr=0.5)
    got = with_recipe(cfg, given={"lr"})
    assert got.lr == 0.5 and got.batch_size == 256 and got.local_epochs == 1
    assert with_recipe(FederationConfig(algorithm="fedper"), set()) == FederationConfig(algorithm="fedper")


def test_the_recipes_negative_pool_shrinks_to_its_row_budget_on_a_large_dataset(tmp_path):
    """16 (64 sampled negatives per positive) while the pool's rows stay within POOL_MAX_NEGATIVES, counted from the
    dataset's manifest; fewer on a dataset of a million exposures (MovieLens-1M); never below 1; what a user gives
    is kept; an unreadable manifest leaves the recipe's value."""
    import json

    from fedpa.recmodels.algorithms import POOL_MAX_NEGATIVES

    def pool(exposures, given=frozenset()):
        root = tmp_path / str(exposures)
        root.mkdir(exist_ok=True)
        (root / "manifest.json").write_text(json.dumps({"rows": {"exposures": exposures}}))
        return with_recipe(FederationConfig(algorithm="fedpa", split="loo", data_dir=str(root), negative_pool=3),
                           given).negative_pool

    assert pool(100_000) == 16                                   # MovieLens-100K: 6.4 M pooled rows
    assert pool(1_000_000) == POOL_MAX_NEGATIVES // 4_000_000 == 2
    assert pool(100_000_000) == 1
    assert pool(100_000_000, {"negative-pool"}) == 3
    missing = FederationConfig(algorithm="fedpa", split="loo", data_dir=str(tmp_path / "missing"))
    assert with_recipe(missing, set()).negative_pool == 16


def test_fedpa_runs_its_recipe_and_leaves_out_what_a_configuration_cannot_carry():
    got = with_recipe(FederationConfig(algorithm="fedpa"), set())
    assert (got.use_user_bias, got.item_popularity, got.item_bias_fields, got.lr_decay, got.foundation_logit_scale) \
        == (True, True, "video_id,category_level_one,category_level_two,upload_type", 0.8, 0.1)
    assert (got.item_bias_update, got.item_bias_prior, got.negative_pool) == ("newton", 10.0, 16)
    assert with_recipe(FederationConfig(algorithm="fedpa"), {"negative-pool"}).negative_pool == 1
    # where the Newton tables cannot run (central DP; no offset tables) the video-id table learns by Adam, as
    # before (Adam steps on the category tables lost on validation)
    dp = with_recipe(FederationConfig(algorithm="fedpa", dp_noise_multiplier=1.0), set())
    assert dp.item_bias_fields == "video_id" and (dp.item_bias_update, dp.item_bias_prior) == ("adam", 100.0)
    no_tables = with_recipe(FederationConfig(algorithm="fedpa", item_bias_fields=""), {"item-bias-fields"})
    assert no_tables.item_bias_update == "adam" and no_tables.item_popularity
    assert with_recipe(FederationConfig(algorithm="fedpa"), {"item-popularity"}).item_popularity is False
    # local DP sends counts in the clear, robust aggregation needs each update: the item side is left out,
    # the private user offset and the schedule stay
    for kw in (dict(dp_noise_multiplier=1.0, dp_mode="local"), dict(robust_aggregation="median")):
        got = with_recipe(FederationConfig(algorithm="fedpa", **kw), set())
        assert not got.item_tables and got.use_user_bias and got.lr_decay == 0.8, kw
    stage = with_recipe(FederationConfig(algorithm="fedpa", stage="rank", stage_models="runs/funnel"), set())
    assert not stage.item_tables and stage.foundation_logit_scale == 1.0 and stage.use_user_bias


def test_the_recipe_runs_item_embeddings_where_the_video_table_is_small_enough_and_not_under_dp(tmp_path):
    """Since 2026-12-07: width 32 at a constant step 0.03, where the video-id table has at most 20,000 rows (the
    whole table travels every round); not under DP; a width the user gives always stays."""
    from fedpa.common.config import video_rows
    from fedpa.recmodels.algorithms import EMBEDDING_MAX_ROWS

    def foundation(name: str, videos: int, buckets: int = 131072) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"item_vocab": {"video_id": videos}, "video_buckets": buckets}))
        return str(path)

    dense, large = foundation("dense", 1178), foundation("large", 100_000)
    got = with_recipe(FederationConfig(algorithm="fedpa", foundation=dense), set())
    assert (got.item_embedding_dim, got.item_embedding_lr) == (32, 0.03)
    assert with_recipe(FederationConfig(algorithm="fedpa", foundation=large), set()).item_embedding_dim == 0
    # the table's rows are the foundation's (capped by its hash buckets), or item-rows when smaller
    assert video_rows(FederationConfig(foundation=foundation("hashed", 10**6, buckets=16384))) == 16384
    bounded = FederationConfig(algorithm="fedpa", foundation=large, item_rows=EMBEDDING_MAX_ROWS)
    assert video_rows(bounded) == EMBEDDING_MAX_ROWS and with_recipe(bounded, {"item-rows"}).item_embedding_dim == 32
    # unreadable foundation: left out (the run itself then names the missing foundation)
    missing = FederationConfig(algorithm="fedpa", foundation=str(tmp_path / "none"))
    assert with_recipe(missing, set()).item_embedding_dim == 0
    # under DP they were never measured: left out, unless the user asks for them
    dp = FederationConfig(algorithm="fedpa", foundation=dense, dp_noise_multiplier=1.0)
    assert with_recipe(dp, set()).item_embedding_dim == 0
    assert with_recipe(replace(dp, item_embedding_dim=8), {"item-embedding-dim"}).item_embedding_dim == 8


def test_a_published_recommender_runs_a_flower_round(tiny, tiny_foundation, tmp_path):
    """FedMF through Flower's simulation runtime and the nodes' one-by-one training (the path `make demo`'s
    pfedrec takes): a round completes and its shared item embeddings move."""
    from fed_fixtures import fed_config

    from fedpa.server.rundir import RunDir
    from fedpa.simulations.simulate import simulate

    cfg = with_recipe(fed_config(tiny, tiny_foundation, tmp_path / "run", algorithm="fedmf", num_rounds=1,
                                 max_clients=6), {"algorithm"})
    summary = simulate(cfg, cohort_size=3)
    assert summary["rounds"] == 1 and 0 < summary["test"]["auc"] < 1
    _, state, _ = RunDir(cfg.run_dir).load_checkpoint()
    assert any(float(np.abs(v).max()) > 0 for v in state.values())
