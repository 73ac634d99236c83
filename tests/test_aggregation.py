"""Aggregation as sums (`common.aggregation`): what a client contributes, what the server derives,
and which replies it refuses. Pure numpy, no Flower."""

from __future__ import annotations

import numpy as np
import pytest

from fedpa.common.aggregation import (
    COUNT_PREFIX,
    InvalidUpdate,
    SharedTensor,
    apply_sums,
    client_contribution,
    count_keys,
    expected_shapes,
    spec_from,
    sum_updates,
    validate_update,
)

# two global entries, age groups 0..3 (A and B rows), gender groups 0..1
SPEC = spec_from(
    [("gate.w", (3, 2), None), ("head.b", (4,), None)]
    + [(f"grp_A.age={v}", (2, 3), f"age={v}") for v in range(4)]
    + [(f"grp_B.age={v}", (3,), f"age={v}") for v in range(4)]
    + [(f"grp_A.gender={v}", (2,), f"gender={v}") for v in range(2)]
)
# client -> its groups; nobody has age=3
GROUPS = [{"age=0", "gender=1"}, {"age=1", "gender=1"}, {"age=0", "gender=0"}, {"age=2", "gender=1"}]


def random_state(rng) -> dict[str, np.ndarray]:
    return {t.name: rng.normal(size=t.shape).astype(np.float32) for t in SPEC}


def aggregate(state, deltas, groups, weights=None):
    weights = weights or [1.0] * len(deltas)
    contribs = [client_contribution(d, SPEC, g, w) for d, g, w in zip(deltas, groups, weights)]
    for c in contribs:
        validate_update(c, SPEC)  # what a client sends is what the server accepts
    return apply_sums(state, sum_updates(contribs, SPEC), SPEC), contribs


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    state = random_state(rng)
    deltas = [random_state(rng) for _ in GROUPS]
    return state, deltas


def test_count_keys_one_per_group():
    assert set(count_keys(SPEC)) == {COUNT_PREFIX + g for g in
                                     ["global", "age=0", "age=1", "age=2", "age=3", "gender=0", "gender=1"]}
    assert all(s == (1,) for s in count_keys(SPEC).values())
    assert set(expected_shapes(SPEC)) == {t.name for t in SPEC} | set(count_keys(SPEC))


def test_global_entries_are_the_unweighted_mean(setup):
    state, deltas = setup
    new, _ = aggregate(state, deltas, GROUPS)
    for name in ("gate.w", "head.b"):
        want = state[name] + np.mean([d[name] for d in deltas], axis=0)
        np.testing.assert_allclose(new[name], want, rtol=1e-6, atol=1e-6)
        assert new[name].dtype == np.float32


def test_group_entries_are_the_mean_over_their_holders(setup):
    state, deltas = setup
    new, _ = aggregate(state, deltas, GROUPS)
    for t in SPEC:
        if t.group is None:
            continue
        holders = [i for i, g in enumerate(GROUPS) if t.group in g]
        if not holders:
            continue
        want = state[t.name] + np.mean([deltas[i][t.name] for i in holders], axis=0)
        np.testing.assert_allclose(new[t.name], want, rtol=1e-6, atol=1e-6, err_msg=t.name)
    # spot checks: age=0 held by clients 0 and 2, gender=1 by 0, 1 and 3
    np.testing.assert_allclose(new["grp_A.age=0"],
                               state["grp_A.age=0"] + (deltas[0]["grp_A.age=0"] + deltas[2]["grp_A.age=0"]) / 2,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new["grp_A.gender=1"],
                               state["grp_A.gender=1"] + sum(deltas[i]["grp_A.gender=1"] for i in (0, 1, 3)) / 3,
                               rtol=1e-6, atol=1e-6)


def test_entries_nobody_contributed_to_stay_exactly(setup):
    state, deltas = setup
    new, contribs = aggregate(state, deltas, GROUPS)
    for name in ("grp_A.age=3", "grp_B.age=3"):
        assert np.array_equal(new[name], state[name])
    # and a client's message carries zeros (not its private delta) for groups it does not hold
    for c, g in zip(contribs, GROUPS):
        for t in SPEC:
            if t.group is not None and t.group not in g:
                assert not c[t.name].any(), (t.name, g)
                assert c[t.count_key][0] == 0, (t.count_key, g)


def test_weights_give_the_weighted_mean(setup):
    state, deltas = setup
    w = [1.0, 3.0, 2.0, 0.5]
    new, contribs = aggregate(state, deltas, GROUPS, w)
    want = state["head.b"] + sum(wi * d["head.b"] for wi, d in zip(w, deltas)) / sum(w)
    np.testing.assert_allclose(new["head.b"], want, rtol=1e-5, atol=1e-6)
    want = state["grp_B.age=0"] + (w[0] * deltas[0]["grp_B.age=0"] + w[2] * deltas[2]["grp_B.age=0"]) / (w[0] + w[2])
    np.testing.assert_allclose(new["grp_B.age=0"], want, rtol=1e-5, atol=1e-6)
    assert contribs[1][COUNT_PREFIX + "global"][0] == 3.0 and contribs[1][COUNT_PREFIX + "age=1"][0] == 3.0


def test_summing_per_node_first_gives_the_same_result(setup):
    """A node sums its users' contributions before replying (client/app.py): same result as one per user."""
    state, deltas = setup
    contribs = [client_contribution(d, SPEC, g) for d, g in zip(deltas, GROUPS)]
    node_a = {k: contribs[0][k] + contribs[1][k] for k in contribs[0]}
    node_b = {k: contribs[2][k] + contribs[3][k] for k in contribs[0]}
    validate_update(node_a, SPEC)
    a = apply_sums(state, sum_updates([node_a, node_b], SPEC), SPEC)
    b = apply_sums(state, sum_updates(contribs, SPEC), SPEC)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_no_update_changes_nothing(setup):
    state, _ = setup
    empty = {k: np.zeros(s, np.float32) for k, s in count_keys(SPEC).items()}
    empty.update({t.name: np.zeros(t.shape, np.float32) for t in SPEC})
    new = apply_sums(state, sum_updates([empty], SPEC), SPEC)
    assert all(np.array_equal(new[k], state[k]) for k in state)


# ----------------------------------------------------------------------------- validate_update


def good_update():
    rng = np.random.default_rng(1)
    return client_contribution(random_state(rng), SPEC, {"age=1", "gender=0"})


def test_a_good_update_passes():
    validate_update(good_update(), SPEC)


@pytest.mark.parametrize("fault, key, words", [
    ("missing", "head.b", "missing"),
    ("missing", "count/age=2", "missing"),
    ("unexpected", "lora_user_A", "unexpected"),
    ("shape", "gate.w", "shape"),
    ("float64", "grp_A.age=1", "float64"),
    ("nan", "grp_B.age=0", "nan"),
    ("inf", "head.b", "inf"),
    ("negative", "count/age=1", "negative"),
    ("negative", "count/global", "negative"),
])
def test_validate_update_rejects_and_names_the_key(fault, key, words):
    u = good_update()
    if fault == "missing":
        del u[key]
    elif fault == "unexpected":
        u[key] = np.zeros(3, np.float32)
    elif fault == "shape":
        u[key] = np.zeros((2, 3), np.float32)
    elif fault == "float64":
        u[key] = u[key].astype(np.float64)
    elif fault == "nan":
        u[key] = u[key].copy()
        u[key].flat[0] = np.nan
    elif fault == "inf":
        u[key] = u[key].copy()
        u[key].flat[-1] = -np.inf
    elif fault == "negative":
        u[key] = np.array([-1.0], np.float32)
    with pytest.raises(InvalidUpdate) as e:
        validate_update(u, SPEC)
    msg = str(e.value)
    assert key in msg, msg
    assert words in msg.lower(), msg


def test_validate_update_rejects_non_arrays():
    u = good_update()
    u["head.b"] = u["head.b"].tolist()
    with pytest.raises(InvalidUpdate, match="head.b"):
        validate_update(u, SPEC)


def test_shared_tensor_count_key():
    assert SharedTensor("x", (1,)).count_key == "count/global"
    assert SharedTensor("x", (1,), "age=2").count_key == "count/age=2"


# ---------------------------------------------------------------- per-row entries (item-side tables)

ROW_SPEC = spec_from([("head.b", (2,), None), ("item_bias.category", (5, 2), "per-row")])


def test_per_row_entries_are_averaged_over_the_clients_that_read_each_row():
    rng = np.random.default_rng(3)
    state = {t.name: rng.normal(size=t.shape).astype(np.float32) for t in ROW_SPEC}
    reads = [np.array([1, 1, 0, 0, 0], np.float32), np.array([0, 1, 1, 0, 0], np.float32),
             np.array([0, 1, 0, 0, 0], np.float32)]  # nobody read rows 3 and 4
    deltas = [{"head.b": rng.normal(size=2).astype(np.float32),
               "item_bias.category": (rng.normal(size=(5, 2)) * r[:, None]).astype(np.float32)} for r in reads]
    contribs = [client_contribution(d, ROW_SPEC, set(), rows={"item_bias.category": r}) for d, r in zip(deltas, reads)]
    for c in contribs:
        validate_update(c, ROW_SPEC)
        assert c["count/rows:item_bias.category"].shape == (5,)
    new = apply_sums(state, sum_updates(contribs, ROW_SPEC), ROW_SPEC)
    table, before = new["item_bias.category"], state["item_bias.category"]
    np.testing.assert_allclose(table[0], before[0] + deltas[0]["item_bias.category"][0], rtol=1e-6)
    np.testing.assert_allclose(table[1], before[1] + np.mean([d["item_bias.category"][1] for d in deltas], axis=0),
                               rtol=1e-5)
    np.testing.assert_allclose(table[2], before[2] + deltas[1]["item_bias.category"][2], rtol=1e-6)
    np.testing.assert_array_equal(table[3:], before[3:])  # rows nobody read stay exactly
    # a global entry still averages over every client
    np.testing.assert_allclose(new["head.b"], state["head.b"] + np.mean([d["head.b"] for d in deltas], axis=0),
                               rtol=1e-5)


def test_row_prior_shrinks_rarely_read_rows_and_leaves_global_entries_alone():
    rng = np.random.default_rng(4)
    state = {t.name: rng.normal(size=t.shape).astype(np.float32) for t in ROW_SPEC}
    reads = [np.array([1, 1, 0, 0, 0], np.float32)] + [np.array([0, 1, 0, 0, 0], np.float32)] * 8
    deltas = [{"head.b": rng.normal(size=2).astype(np.float32),
               "item_bias.category": (rng.normal(size=(5, 2)) * r[:, None]).astype(np.float32)} for r in reads]
    sums = sum_updates([client_contribution(d, ROW_SPEC, set(), rows={"item_bias.category": r})
                        for d, r in zip(deltas, reads)], ROW_SPEC)
    plain = apply_sums(state, sums, ROW_SPEC)
    shrunk = apply_sums(state, sums, ROW_SPEC, row_prior=2.0)
    before = state["item_bias.category"]
    # row 0: one reader + 2 phantom readers -> a third of its delta; row 1: 9 readers -> 9/11 of their mean
    np.testing.assert_allclose(shrunk["item_bias.category"][0] - before[0],
                               deltas[0]["item_bias.category"][0] / 3, rtol=1e-5)
    np.testing.assert_allclose(shrunk["item_bias.category"][1] - before[1],
                               (plain["item_bias.category"][1] - before[1]) * 9 / 11, rtol=1e-5)
    np.testing.assert_array_equal(shrunk["item_bias.category"][2:], before[2:])
    np.testing.assert_array_equal(shrunk["head.b"], plain["head.b"])


def test_per_row_contributions_need_the_rows_read_and_a_count_per_row():
    from fedpa.server.robust import robust_sums

    delta = {"head.b": np.zeros(2, np.float32), "item_bias.category": np.zeros((5, 2), np.float32)}
    with pytest.raises(ValueError, match="item_bias.category"):
        client_contribution(delta, ROW_SPEC, set())
    good = client_contribution(delta, ROW_SPEC, set(), rows={"item_bias.category": np.ones(5, np.float32)})
    bad = dict(good, **{"count/rows:item_bias.category": np.ones(1, np.float32)})
    with pytest.raises(InvalidUpdate, match="count/rows:item_bias.category"):
        validate_update(bad, ROW_SPEC)
    with pytest.raises(ValueError, match="per-row"):
        robust_sums([good], ROW_SPEC, method="median")


def test_newton_rows_take_one_map_step_from_the_sums_of_gradient_and_curvature():
    """item-bias-update newton: the clients send -Σ(p - y) per row as the delta and Σ p(1 - p) as the count;
    the server sets b + (ΣΔ - λ b) / (Σh + λ) on rows someone read (λ = item-bias-prior), and, for one logistic
    offset, iterating that step from 0 reaches the MAP estimate that calibrated_bias finds."""
    import torch

    from fedpa.recmodels.personalization import calibrated_bias

    spec = [SharedTensor("item_bias.category", (3, 1), "per-row")]
    rng = np.random.default_rng(0)
    z = [rng.normal(size=n) for n in (30, 50)]           # two clients' model logits on rows of item row 1
    y = [(rng.random(n) < 0.7).astype(float) for n in (30, 50)]
    b = np.zeros((3, 1), np.float32)
    for _ in range(30):
        contribs = []
        for zi, yi in zip(z, y):
            p = 1 / (1 + np.exp(-(zi + b[1, 0])))
            delta = np.zeros((3, 1), np.float32)
            delta[1, 0] = -(p - yi).sum()
            rows = np.zeros(3, np.float32)
            rows[1] = (p * (1 - p)).sum()
            contribs.append(client_contribution({"item_bias.category": delta}, spec, set(),
                                                rows={"item_bias.category": rows}))
        b = apply_sums({"item_bias.category": b}, sum_updates(contribs, spec), spec, row_prior=1.0,
                       newton=True)["item_bias.category"]
    want = calibrated_bias(torch.tensor(np.concatenate(z))[:, None], torch.tensor(np.concatenate(y))[:, None],
                           prior_var=1.0, steps=30)
    assert float(b[1, 0]) == pytest.approx(float(want[0]), abs=1e-5)
    assert b[0, 0] == 0 and b[2, 0] == 0                   # rows nobody read stay
    plain = apply_sums({"item_bias.category": np.ones((3, 1), np.float32)}, sum_updates(contribs, spec), spec,
                       row_prior=1.0)["item_bias.category"]
    assert plain[1, 0] != pytest.approx(float(b[1, 0]))     # the averaging rule is another one
