"""FedPA's item popularity (``item-popularity``): a click tally the server keeps from the round's sums, read as
w·log(1 + clicks) with a shared learned w."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fed_fixtures import fed_config

from fedpa.common.aggregation import SharedTensor, apply_sums, client_contribution, sum_updates
from fedpa.common.privacy import cohort_contribution, private_contribution, sensitivity

SPEC = [SharedTensor("g", (2,)), SharedTensor("item_bias.clicks", (6,), "tally")]


def test_the_tally_is_the_rounds_sum_scaled_to_the_population():
    clicked = [[0, 2], [2, 3], [2]]
    contributions = []
    for rows in clicked:
        indicator = np.zeros(6, np.float32)
        indicator[rows] = 1
        contributions.append(client_contribution({"g": np.ones(2, np.float32), "item_bias.clicks": indicator}, SPEC,
                                                 set(), rows={"item_bias.clicks": indicator}))
    sums = sum_updates(contributions, SPEC)
    state = {"g": np.zeros(2, np.float32), "item_bias.clicks": np.full(6, 9.0, np.float32)}   # last round's tally
    assert apply_sums(state, sums, SPEC)["item_bias.clicks"].tolist() == [1, 0, 3, 1, 0, 0]       # replaced, not added
    # three sampled clients of a population of six: the whole population's estimate doubles it
    assert apply_sums(state, sums, SPEC, population=6)["item_bias.clicks"].tolist() == [2, 0, 6, 2, 0, 0]
    assert apply_sums(state, sums, SPEC)["g"].tolist() == [1, 1]                                   # g: the mean


def test_under_dp_a_users_clicks_weigh_one_unit_and_are_not_clipped_with_its_delta():
    indicator = np.zeros(6, np.float32)
    indicator[[1, 4, 5, 0]] = 1
    delta = {"g": np.array([3.0, 4.0], np.float32), "item_bias.clicks": indicator}
    dp = dict(noise_multiplier=1.0, clip=1.0, mode="central", n_count_terms=1, min_reply_fraction=0.5, cohort=1)
    c = private_contribution(delta, SPEC, set(), rows={"item_bias.clicks": indicator}, **dp)
    np.testing.assert_allclose(np.linalg.norm(c["g"]), 1.0, rtol=1e-6)                  # the delta clipped to C
    np.testing.assert_allclose(c["item_bias.clicks"], indicator / 2, rtol=1e-6)          # 4 clicks: 1/sqrt(4) each
    total = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in c.values()))
    assert total <= sensitivity(1.0, 1) + 1e-6
    # the cohort engine's sums: the same weights, from the rows each user clicked
    got = cohort_contribution({"g": (np.arange(1), delta["g"][None])}, 1, SPEC,
                              rows={"item_bias.clicks": [np.array([0, 1, 4, 5])]}, **dp)
    np.testing.assert_allclose(got["item_bias.clicks"], c["item_bias.clicks"], rtol=1e-6)


def test_a_user_contributes_its_clicks_and_learns_the_weight(tiny, tiny_foundation, tmp_path):
    from fedpa.client.runtime import ClientRuntime

    rt = ClientRuntime(fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=4, feature_cache="none",
                                  item_popularity=True, item_bias_lr=0.05))
    pm = rt.model
    assert ("item_bias.clicks", (pm.item_bias.emb_size,), "tally") in pm.shared_spec()
    data = rt.user(0)
    start = pm.get_shared()
    state = dict(start)
    state["item_bias.clicks"] = np.random.default_rng(0).integers(0, 20, pm.item_bias.emb_size).astype(np.float32)
    pm.set_shared(state)
    private = pm.get_private()
    before = pm.predict(data.test, data.profile)
    pm.train_user(data.train, data.profile, rt.local, seed=0)
    after = pm.get_shared()
    clicked = pm.item_bias.click_rows(data.train.items, data.train.labels)
    # the tally is read, never changed: the user's contribution is its click rows
    np.testing.assert_array_equal(after["item_bias.clicks"], state["item_bias.clicks"])
    contribution = pm.touched_rows(data.train)["item_bias.clicks"]
    assert set(np.nonzero(contribution)[0]) == set(clicked.tolist()) and np.all(contribution[clicked] == 1)
    assert np.abs(after["item_bias.popularity"]).max() > 0                 # the weight learned from zero
    pm.set_shared(state)
    pm.set_private(private)
    np.testing.assert_allclose(pm.predict(data.test, data.profile), before)   # w = 0: the tally changes nothing yet
    from fedpa.recmodels.item_bias import POPULARITY_SCALE

    weighted = dict(state, **{"item_bias.popularity": np.full_like(state["item_bias.popularity"],
                                                                   1 / POPULARITY_SCALE)})   # w = 1
    pm.set_shared(weighted)
    rows = pm.item_bias.rows(data.test.items)[-1]
    logit = torch.logit(torch.from_numpy(before).double())
    want = torch.sigmoid(logit + torch.log1p(torch.from_numpy(state["item_bias.clicks"][rows.numpy()]).double()))
    np.testing.assert_allclose(pm.predict(data.test, data.profile), want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, words", [
    (dict(item_popularity=True, dp_noise_multiplier=1.0, dp_mode="local"), "local DP"),
    (dict(item_popularity=True, robust_aggregation="median"), "robust aggregation"),
    (dict(item_popularity_steps=True), "needs item-popularity"),
])
def test_the_configuration_refuses_what_the_tally_cannot_do(change, words):
    from fedpa.common.config import ConfigValueError, FederationConfig

    with pytest.raises(ConfigValueError, match=words):
        FederationConfig(**change).validate()


def test_a_user_trains_against_the_others_clicks_not_its_own(tiny, tiny_foundation, tmp_path):
    """Its own earlier clicks are in the tally; while it trains they are left out, so that "I clicked it" does
    not teach the weight that clicked rows are popular."""
    from fedpa.client.runtime import ClientRuntime

    rt = ClientRuntime(fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=4, feature_cache="none",
                                  item_popularity=True))
    pm = rt.model
    data = rt.user(0)
    clicked = torch.from_numpy(pm.item_bias.click_rows(data.train.items, data.train.labels))
    state = pm.get_shared()
    state["item_bias.clicks"][clicked.numpy()] = 1.0          # only this user ever clicked them
    pm.set_shared(state)
    with pm._others_clicks(data.train):
        assert float(pm.item_bias.clicks[clicked].abs().max()) == 0.0
    assert float(pm.item_bias.clicks[clicked].min()) == 1.0


def test_the_steps_give_the_tally_any_shape_of_the_count():
    """item-popularity-steps: w0*log(1+c) + Σ_k w_k [c >= c_k] per task; with only the log weight it is the
    log-linear score, and a shape that falls then rises (few others' clicks and many both score high) is
    representable, which the log-linear term alone cannot be."""
    from fedpa.recmodels.item_bias import POPULARITY_SCALE, POPULARITY_STEPS, popularity_term

    clicks = torch.tensor([0.0, 1.0, 1.5, 3.0, 200.0, -0.2])
    linear = torch.tensor([0.01, -0.02])
    steps = torch.zeros(1 + len(POPULARITY_STEPS), 2)
    steps[0] = linear
    np.testing.assert_allclose(popularity_term(clicks, steps).numpy(), popularity_term(clicks, linear).numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(popularity_term(clicks, linear)[:, 0].numpy(),
                               (POPULARITY_SCALE * 0.01 * torch.log1p(clicks.clamp(min=0))).numpy(), rtol=1e-6)
    shape = torch.zeros(1 + len(POPULARITY_STEPS), 1)
    shape[1, 0] = -1.0 / POPULARITY_SCALE          # from 1 click on: -1
    shape[1 + POPULARITY_STEPS.index(128.0), 0] = 2.0 / POPULARITY_SCALE   # from 128 on: +1
    got = popularity_term(clicks, shape)[:, 0].tolist()
    assert got == pytest.approx([0.0, -1.0, -1.0, -1.0, 1.0, 0.0])
    assert popularity_term(clicks[None].expand(3, -1), shape).shape == (3, 6, 1)   # leading dims kept
