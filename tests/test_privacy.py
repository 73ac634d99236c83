"""Client-level DP: clipping, the accountant against an independent computation, and a noisy federation."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fed_fixtures import fed_config

from fedpa.common.aggregation import SharedTensor
from fedpa.common.config import ConfigValueError, FederationConfig
from fedpa.common.models import model_options
from fedpa.common.privacy import add_local_noise, add_noise, clip_delta, distributed_share_std, quorum, sensitivity
from fedpa.foundation.model import load_foundation
from fedpa.recmodels.personalization import PersonalModel, get_algorithm
from fedpa.server.accounting import event_multiplier, make_accountant, round_event
from fedpa.server.rundir import RunDir
from fedpa.simulations.simulate import simulate


def test_clip_bounds_only_the_entries_a_user_contributes():
    spec = [SharedTensor("g", (3,)), SharedTensor("a1", (2,), "age=1"), SharedTensor("a2", (2,), "age=2")]
    delta = {"g": np.full(3, 3.0, np.float32), "a1": np.full(2, 4.0, np.float32), "a2": np.full(2, 9.0, np.float32)}
    out, norm = clip_delta(delta, spec, {"age=1"}, clip=1.0)
    assert abs(norm - math.sqrt(27 + 32)) < 1e-9
    mine = np.concatenate([out["g"], out["a1"]])
    assert abs(np.linalg.norm(mine) - 1.0) < 1e-6
    assert np.array_equal(out["a2"], delta["a2"])  # not this user's group: untouched (sent as zeros anyway)
    small, _ = clip_delta({k: v / 100 for k, v in delta.items()}, spec, {"age=1"}, clip=1.0)
    assert np.array_equal(small["g"], delta["g"] / 100)


def test_noise_scale_and_counts_stay_positive():
    spec = [SharedTensor("g", (20000,))]
    sums = {"g": np.zeros(20000), "count/global": np.array([5.0])}
    std = 2.0 * sensitivity(1.0, 2)
    noisy = add_noise(sums, spec, std, np.random.default_rng(0))
    assert abs(noisy["g"].std() - std) / std < 0.03
    assert noisy["count/global"][0] >= 1.0


def _independent_epsilon(z: float, rounds: int, delta: float) -> float:
    # RDP of the Gaussian mechanism: alpha / (2 z^2) per round, composed additively; converted to
    # (eps, delta) with the bound of Canonne, Kamath & Steinke (2020), minimised over a dense grid.
    alphas = np.concatenate([np.linspace(1.01, 10, 2000), np.linspace(10, 512, 4000)])
    rdp = rounds * alphas / (2 * z * z)
    eps = rdp + np.log((alphas - 1) / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(eps.min())


def test_accountant_matches_an_independent_computation():
    for z, rounds in ((0.8, 10), (1.5, 30), (4.0, 100)):
        acc = make_accountant(population=1000, delta=1e-3)
        acc.compose(round_event(z, 100, 1000), count=rounds)
        got = acc.get_epsilon(1e-3)
        ref = _independent_epsilon(z, rounds, 1e-3)
        assert abs(got - ref) / ref < 0.02, (z, rounds, got, ref)
        classic = min(rounds * a / (2 * z * z) + math.log(1e3) / (a - 1) for a in np.linspace(1.01, 512, 20000))
        assert got <= classic + 1e-9  # the tighter conversion never reports more than the classic one


def test_noisy_federation_logs_epsilon_and_respects_the_budget(tiny, tiny_foundation, tmp_path):
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "dp", num_rounds=3, max_clients=12,
                     dp_noise_multiplier=1.0, dp_clip=0.5)
    summary = simulate(cfg, cohort_size=4)
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows if "epsilon" in r]
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
    delta = rows[-1]["delta"]
    assert delta == min(12 ** -1.1, 1e-5)          # δ well below 1/N by default
    ref = _independent_epsilon(1.0, 3, delta)
    assert abs(eps[-1] - ref) / ref < 0.02
    assert summary["differential_privacy"]["epsilon"] == eps[-1]
    mia = summary["membership_inference"]  # attack on the personalized models, final evaluation only
    assert 0.0 < mia["auc"] < 1.0 and "membership_inference" not in rows[1]["eval"]
    # a budget between the cost of 2 and 3 rounds stops training before round 3
    budget = (eps[1] + eps[2]) / 2
    stopped = simulate(replace(cfg, run_dir=str(tmp_path / "budget"), dp_max_epsilon=budget), cohort_size=4)
    assert stopped["differential_privacy"]["stopped_by_budget_at_round"] == 3
    assert stopped["differential_privacy"]["epsilon"] <= budget


def test_distributed_shares_of_the_quorum_add_up_to_the_central_noise():
    z, clip, groups, frac, cohort = 1.3, 0.5, 2, 0.5, 40
    share = distributed_share_std(z, clip, groups, frac, cohort)
    m = quorum(frac, cohort)
    assert m == 20
    central = z * sensitivity(clip, groups)
    assert math.isclose(share * math.sqrt(m), central, rel_tol=1e-12)
    rng = np.random.default_rng(0)
    summed = rng.normal(0.0, share, size=(20_000, m)).sum(axis=1)  # exactly the quorum survives
    assert abs(summed.std() / central - 1) < 0.03


def test_local_noise_touches_only_the_users_own_entries_and_event_halves_z():
    spec = [SharedTensor("g", (200,), None), SharedTensor("a0", (200,), "age=0"), SharedTensor("a1", (200,), "age=1")]
    delta = {k: np.zeros(200, np.float32) for k in ("g", "a0", "a1")}
    noisy = add_local_noise(delta, spec, {"age=0"}, std=2.0)
    assert noisy["a1"].dtype == np.float32 and not noisy["a1"].any()
    assert 1.6 < noisy["g"].std() < 2.4 and 1.6 < noisy["a0"].std() < 2.4
    # two users' local reports differ by up to 2C: multiplier z/2 under add-or-remove-one
    assert event_multiplier("local", 3.0) == 1.5 and event_multiplier("distributed", 3.0) == 3.0


def test_dp_noise_is_not_predictable_from_the_seed():
    spec = [SharedTensor("g", (50,), None)]
    sums = {"g": np.zeros(50), "count/global": np.array([10.0])}
    a, b = add_noise(sums, spec, 1.0), add_noise(sums, spec, 1.0)
    assert not np.allclose(a["g"], b["g"])
    from randomgen import ChaCha

    from fedpa.common.privacy import noise_rng

    rng = noise_rng()
    assert isinstance(rng.bit_generator, ChaCha)                 # a cryptographically secure stream
    draws = rng.normal(0.0, 2.0, 200_000)
    assert abs(draws.mean()) < 0.03 and abs(draws.std() - 2.0) < 0.02


@pytest.mark.parametrize("mode", ["central", "distributed", "local"])
def test_noise_in_the_aggregate_has_the_stated_scale(mode, tiny, tiny_foundation, tmp_path):
    """One round, every client: with a tiny clip the change of the global shared entries is the noise
    alone, and its spread matches what each mode promises for the released sum. (z small enough that
    the noise on the count, which divides every coordinate, stays within a few percent of n = 12.)"""
    z = 0.2
    clip = 1.0 if mode == "local" else 1e-3
    cfg = fed_config(tiny, tiny_foundation, tmp_path / mode, num_rounds=1, max_clients=12, dp_mode=mode,
                     dp_noise_multiplier=z, dp_clip=clip, secagg=(mode == "distributed"))
    summary = simulate(cfg, cohort_size=3)
    assert summary["differential_privacy"]["mode"] == mode
    before = PersonalModel(load_foundation(cfg.foundation), get_algorithm("fedpa"), seed=cfg.seed,
                           **model_options(cfg))
    spec = before.shared_spec()
    start = before.get_shared()
    _, after, _ = RunDir(cfg.run_dir).load_checkpoint()
    change = np.concatenate([(after[n] - start[n]).ravel() for n, _, g in spec if g is None])
    n = 12
    if mode == "central":
        expected = z * sensitivity(clip, 2) / n
    elif mode == "distributed":  # all 12 survive, the quorum is 6: twice the promised variance
        expected = z * sensitivity(clip, 2) * math.sqrt(n / quorum(cfg.min_reply_fraction, n)) / n
    else:
        expected = z * clip * math.sqrt(n) / n
    assert change.size > 500
    assert 0.8 < change.std() / expected < 1.25, (mode, change.std(), expected)
    # under DP only the noised sums leave a node: no training loss or example count reached the server
    rows = RunDir(cfg.run_dir).read_metrics()
    # with SecAgg the users counted are the sum's own count, which distributed noise perturbs (std ≈ 0.5 here)
    assert rows[1]["train_loss"] is None and (rows[1]["clients_ok"] == 12 if mode != "distributed"
                                              else 10 <= rows[1]["clients_ok"] <= 12)
    assert 0 < rows[1]["eval"]["test"]["auc"] < 1    # evaluation still reports (securely summed with SecAgg)


def test_distributed_noise_without_secure_aggregation_is_refused():
    with pytest.raises(ConfigValueError, match="distributed.*secagg"):
        FederationConfig(dp_mode="distributed", dp_noise_multiplier=1.0).validate()
    with pytest.raises(ConfigValueError, match="dp-mode"):
        FederationConfig(dp_mode="shuffle").validate()


def test_discrete_gaussian_draws_integers_with_the_asked_variance():
    from fedpa.common.discrete_noise import discrete_gaussian, discrete_noise_sigma, integer_sensitivity

    for sigma in (4.0, 1234.5):
        x = discrete_gaussian(sigma, 40_000)
        assert x.dtype == np.int64 and abs(x.std() / sigma - 1) < 0.02 and abs(x.mean()) < 4 * sigma / 200
    small = discrete_gaussian(4.0, 40_000)
    # the discrete Gaussian's probabilities: P(0) = 1 / sum_k exp(-k^2 / 2 sigma^2) (about 0.0997 at sigma 4)
    p0 = 1 / sum(math.exp(-k * k / 32) for k in range(-60, 61))
    assert abs((small == 0).mean() - p0) < 0.006
    # rounding to the fixed point adds sqrt(dim) units to the sensitivity; below the scale where sums of
    # discrete Gaussians stay close to one, the noise is refused
    assert integer_sensitivity(1.0, 24, 10_000) == 2 ** 24 + 100
    with pytest.raises(ValueError, match="below 4"):
        discrete_noise_sigma(1e-9, 1.0, 24, 100)
    with pytest.raises(ValueError, match="positive"):
        discrete_gaussian(float("nan"), 3)


def test_central_noise_is_discrete_on_the_fixed_point_with_the_calibrated_scale():
    from fedpa.common.aggregation import count_keys
    from fedpa.common.discrete_noise import integer_sensitivity
    from fedpa.common.privacy import add_discrete_noise

    spec = [SharedTensor("g", (30_000,))]
    sums = {"g": np.full(30_000, 0.5, np.float32), **{k: np.full(s, 100.0, np.float32)
                                                       for k, s in count_keys(spec).items()}}
    out = add_discrete_noise(sums, spec, 0.5, sensitivity(2.0, 0), frac_bits=12)
    units = (out["g"].astype(np.float64) - 0.5) * 2 ** 12
    assert np.allclose(units, np.rint(units))                     # whole fixed-point units: a discrete noise
    expected = 0.5 * integer_sensitivity(sensitivity(2.0, 0), 12, 30_001)
    assert abs(units.std() / expected - 1) < 0.03
    assert out["g"].dtype == np.float32 and np.all(out["count/global"] >= 1)
