"""A negative pool (split loo): the training negatives are drawn once, `negative-pool` times as many, and each
round trains on every positive and a fresh 4 negatives per positive of them, in a federated round (one user or
the cohort engine) and in the centralized baseline alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fed_fixtures import fed_config


def test_each_round_trains_every_positive_and_a_fresh_share_of_the_pool(tiny, tiny_foundation, tmp_path):
    from fedpa.client.runtime import ClientRuntime

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=4, feature_cache="none", split="loo",
                     negatives=19, negative_pool=3)
    rt = ClientRuntime(cfg)
    data = rt.user(0)
    labels = data.train.labels[:, 0]
    assert int((labels == 0).sum()) == 12 * int((labels == 1).sum()) > 0
    rounds = [rt.round_train(data, r) for r in (1, 2)]
    for train in rounds:
        y = train.labels[:, 0]
        assert int((y == 1).sum()) == int((labels == 1).sum())
        assert int((y == 0).sum()) == 4 * int((y == 1).sum())
    negatives = [set(t.items[t.labels[:, 0] == 0, 0].tolist()) for t in rounds]
    assert negatives[0] != negatives[1]
    assert torch.equal(rt.round_train(data, 2).features, rounds[1].features)
    # without a pool (or off leave-one-out) every row trains, every round
    plain = ClientRuntime(fed_config(tiny, tiny_foundation, tmp_path / "plain", max_clients=4, feature_cache="none",
                                     split="loo", negatives=19))
    d = plain.user(0)
    assert plain.round_train(d, 3) is d.train
    assert np.array_equal(d.val.items.numpy(), data.val.items.numpy())   # the same ranking cases either way


def test_the_centralized_baseline_trains_each_users_round_share(tiny, tiny_foundation, tmp_path):
    from fedpa.client.runtime import ClientRuntime, user_splits
    from fedpa.simulations.centralized import _round_rows

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=4, feature_cache="none", split="loo",
                     negatives=19, negative_pool=3)
    rt = ClientRuntime(cfg)
    users = rt.partition.clients
    ex = user_splits(cfg, rt.dataset, users, rt.lookups).train
    rows = _round_rows(cfg, ex, 2)
    for i, uid in enumerate(users):
        mine = rows[ex.user_id[rows] == uid]
        alone = rt.round_train(rt.user(i), 2)
        assert len(mine) == len(alone)
        assert np.array_equal(ex.video_id[mine], alone.items[:, 0].numpy())


@pytest.mark.slow   # three simulations (~80 s); the rows each engine reads are `round_train`'s, tested above
def test_a_pooled_federation_on_flower_trains_the_same_rows_with_either_engine(tiny, tiny_foundation, tmp_path):
    """fedpa's recipe under leave-one-out (its negative pool) through Flower's runtime, 2 rounds: nodes training
    their users one by one (a deployed node's path) and vectorized end with the same shared state, so both
    read each round's share of the pool; without the pool the state differs."""
    from dataclasses import replace

    from safetensors.numpy import load_file

    from fedpa.common.config import with_recipe
    from fedpa.simulations.simulate import simulate

    base = with_recipe(fed_config(tiny, tiny_foundation, tmp_path / "loop", algorithm="fedpa", split="loo",
                                  negatives=19, max_clients=8, cohort_engine="loop"), set())
    assert base.negative_pool == 16
    runs = {"loop": base, "vec": replace(base, run_dir=str(tmp_path / "vec"), cohort_engine="vectorized"),
            "fixed": replace(base, run_dir=str(tmp_path / "fixed"), cohort_engine="vectorized", negative_pool=1)}
    state = {}
    for name, cfg in runs.items():
        simulate(cfg, cohort_size=4)
        state[name] = load_file(str(sorted((tmp_path / name / "checkpoints").glob("round-*.safetensors"))[-1]))
    # float32 over 2 rounds of Adam: the engines agree to rounding (~1e-5 on a group adapter few users train);
    # a different choice of rows moves the same tensors by up to 0.5
    assert max(float(np.abs(state["loop"][k] - state["vec"][k]).max()) for k in state["loop"]) <= 1e-4
    assert max(float(np.abs(state["fixed"][k] - state["vec"][k]).max()) for k in state["vec"]) > 1e-2
