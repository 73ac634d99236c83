"""Client-level DP: clipping, the accountant against an independent computation, and a noisy federation."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from fed_fixtures import fed_config
from server.aggregation import SharedTensor
from server.privacy import add_noise, clip_delta, make_accountant, round_event, sensitivity
from simulations.simulate import simulate


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
    ref = _independent_epsilon(1.0, 3, 1 / 12)
    assert abs(eps[-1] - ref) / ref < 0.02
    assert summary["differential_privacy"]["epsilon"] == eps[-1]
    mia = summary["membership_inference"]  # attack on the personalized models, final evaluation only
    assert 0.0 < mia["auc"] < 1.0 and "membership_inference" not in rows[1]["eval"]
    # a budget between the cost of 2 and 3 rounds stops training before round 3
    budget = (eps[1] + eps[2]) / 2
    stopped = simulate(replace(cfg, run_dir=str(tmp_path / "budget"), dp_max_epsilon=budget), cohort_size=4)
    assert stopped["differential_privacy"]["stopped_by_budget_at_round"] == 3
    assert stopped["differential_privacy"]["epsilon"] <= budget
