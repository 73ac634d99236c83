"""Robust aggregation of one-user updates: norm bound, trimmed mean, median; refused under SecAgg."""

from dataclasses import replace

import numpy as np
import pytest
from fed_fixtures import faulty_client_app, fed_config

from fedpa.common.aggregation import InvalidUpdate, SharedTensor, apply_sums, client_contribution
from fedpa.common.config import ConfigValueError
from fedpa.foundation.model import load_foundation
from fedpa.recmodels.personalization import PersonalModel, get_algorithm
from fedpa.server.robust import robust_sums
from fedpa.server.rundir import RunDir

SPEC = [SharedTensor("g", (4,)), SharedTensor("a0", (2,), "age=0"), SharedTensor("a1", (2,), "age=1")]


def _update(g, a, group):
    return client_contribution({"g": np.full(4, g, np.float32), "a0": np.full(2, a, np.float32),
                                "a1": np.full(2, a, np.float32)}, SPEC, {group})


def test_median_and_trimmed_mean_ignore_one_poisoned_update_per_group():
    ups = [_update(1.0, 2.0, "age=0"), _update(1.1, 2.1, "age=0"), _update(0.9, 1.9, "age=0"),
           _update(1.0, 5.0, "age=1"), _update(1000.0, 2.0, "age=0")]
    state = {t.name: np.zeros(t.shape, np.float32) for t in SPEC}
    mean = apply_sums(state, robust_sums(ups, SPEC), SPEC)
    assert mean["g"][0] > 100
    med = apply_sums(state, robust_sums(ups, SPEC, method="median"), SPEC)
    assert np.allclose(med["g"], 1.0) and np.allclose(med["a0"], 2.0) and np.allclose(med["a1"], 5.0)
    trimmed = apply_sums(state, robust_sums(ups, SPEC, method="trimmed-mean", trim_fraction=0.2), SPEC)
    assert np.allclose(trimmed["g"], (1.0 + 1.1 + 1.0) / 3, atol=1e-6)  # dropped 0.9 and 1000
    assert np.allclose(trimmed["a1"], 5.0)  # one contributor: nothing to trim


def test_norm_bound_scales_each_users_own_entries():
    ups = [_update(3.0, 4.0, "age=0")]  # own entries: g (4 x 3) and a0 (2 x 4): norm sqrt(36 + 32)
    sums = robust_sums(ups, SPEC, norm_bound=1.0)
    own = np.concatenate([sums["g"], sums["a0"]])
    assert np.isclose(np.linalg.norm(own), 1.0) and sums["count/age=1"][0] == 0 and not sums["a1"].any()


def test_a_node_sum_is_not_a_user_update():
    node_sum = {k: a + b for (k, a), b in zip(_update(1, 1, "age=0").items(), _update(1, 1, "age=0").values())}
    with pytest.raises(InvalidUpdate, match="one user per update"):
        robust_sums([node_sum], SPEC, method="median")


def test_robust_options_are_refused_with_secure_aggregation(tiny, tiny_foundation, tmp_path):
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "r")
    for bad in (dict(robust_aggregation="median"), dict(norm_bound=1.0)):
        with pytest.raises(ConfigValueError, match="secure aggregation"):
            replace(cfg, secagg=True, **bad).validate()
    with pytest.raises(ConfigValueError, match="trim-fraction"):
        replace(cfg, robust_aggregation="trimmed-mean", trim_fraction=0.5).validate()


def test_median_round_survives_a_poisoned_client(tiny, tiny_foundation, tmp_path):
    from test_fed_faults import simulate_with

    from fedpa.common.models import build_personal_model

    def final_state(name, method, faults):
        cfg = fed_config(tiny, tiny_foundation, tmp_path / name, num_rounds=1, max_clients=6,
                         robust_aggregation=method, eval_every=1)
        simulate_with(faulty_client_app(faults), cfg, cohort_size=1)   # one user per node
        return cfg, RunDir(cfg.run_dir).load_checkpoint()[1]

    cfg, poisoned_median = final_state("median", "median", {0: "boost"})
    _, poisoned_mean = final_state("mean", "none", {0: "boost"})
    start = build_personal_model(cfg).get_shared()        # the state the server sent in round 1
    # entries shared by all 6 users (a group adapter with 1-2 members cannot outvote its poisoner)
    pm = PersonalModel(load_foundation(tiny_foundation), get_algorithm("fedpa"), seed=0, r=4, lora_alpha=4)
    shared_by_all = [n for n, _, g in pm.shared_spec() if g is None and n in start]
    moved_median = max(float(np.max(np.abs(start[k] - poisoned_median[k]))) for k in shared_by_all)
    moved_mean = max(float(np.max(np.abs(start[k] - poisoned_mean[k]))) for k in shared_by_all)
    # the median moves them as one honest update does; the mean by the poisoner's boost
    assert 0 < moved_median < 0.05 and moved_mean > 100 * moved_median, (moved_mean, moved_median)
