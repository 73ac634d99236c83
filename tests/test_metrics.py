"""foundation.metrics against hand-computed cases and brute-force definitions."""

import itertools
import math

import numpy as np
import pytest

from fedpa.foundation import metrics as M


def brute_auc(y, s):
    pos = [b for a, b in zip(y, s) if a]
    neg = [b for a, b in zip(y, s) if not a]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


def test_auc_hand_cases():
    assert M.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts 1/2
    assert M.auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)
    assert M.auc([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert M.auc([1, 1, 0], [0.1, 0.2, 0.9]) == pytest.approx(0.0)
    assert math.isnan(M.auc([1, 1], [0.1, 0.2]))


def test_auc_matches_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 7, 300) / 7.0  # heavy ties
    assert M.auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_gauc_hand_case():
    users = ["a", "a", "b", "b", "b", "c", "c"]
    labels = [0, 1, 1, 0, 0, 1, 1]          # user c has one class only: skipped
    scores = [0.1, 0.9, 0.2, 0.5, 0.1, 0.3, 0.4]
    g = M.gauc(users, labels, scores)
    # a: 1.0; b: positive 0.2 beats 0.1 but not 0.5 -> 0.5
    assert g.value == pytest.approx(0.75)
    assert g.users == 2
    assert g.weighted == pytest.approx((2 * 1.0 + 3 * 0.5) / 5)


def test_gauc_matches_per_user_loop():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 30, 2000)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000), 1)  # ties within users
    per = [M.auc(y[u == k], s[u == k]) for k in np.unique(u)]
    per = [p for p in per if not math.isnan(p)]
    g = M.gauc(u, y, s)
    assert g.users == len(per)
    assert g.value == pytest.approx(np.mean(per), abs=1e-12)


def test_gauc_no_counted_user():
    g = M.gauc([1, 1, 2], [1, 1, 0], [0.3, 0.2, 0.1])
    assert g.users == 0 and math.isnan(g.value)


def test_logloss_hand_case_and_clipping():
    assert M.logloss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert math.isfinite(M.logloss([1, 0], [0.0, 1.0]))  # clipped, not inf
    assert M.logloss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_precision_recall_f1_weighted_like_sklearn():
    y = [1, 1, 0, 0, 1]
    p = [0.9, 0.2, 0.6, 0.1, 0.7]  # predictions 1, 0, 1, 0, 1
    r = M.precision_recall_f1(y, p)
    # class 1: P = R = F1 = 2/3 (support 3); class 0: P = R = F1 = 1/2 (support 2)
    for k in ("precision", "recall", "f1"):
        assert r[k] == pytest.approx((3 * 2 / 3 + 2 * 0.5) / 5)
    # a class never predicted has precision 0 (sklearn's zero_division=0)
    r = M.precision_recall_f1([1, 0, 0, 0], [0.9, 0.8, 0.7, 0.6])
    assert r["precision"] == pytest.approx(0.25 * 0.25 + 0.75 * 0.0)
    assert r["recall"] == pytest.approx(0.25 * 1.0 + 0.75 * 0.0)


def test_hit_ndcg_hand_cases():
    r = M.hit_ndcg_at_k([0.5], [[0.1, 0.6, 0.7]], k=3)  # rank 2
    assert r["hr"] == 1.0 and r["ndcg"] == pytest.approx(1 / math.log2(4))
    assert M.hit_ndcg_at_k([0.5], [[0.1, 0.6, 0.7]], k=2)["hr"] == 0.0
    r = M.hit_ndcg_at_k([0.9, 0.1], [[0.1, 0.2], [0.5, 0.6]], k=1)  # rank 0 and rank 2
    assert r["hr"] == 0.5 and r["ndcg"] == pytest.approx(0.5)
    # ties count against the target: a constant scorer never hits
    assert M.hit_ndcg_at_k([0.3] * 4, np.full((4, 99), 0.3), k=10)["hr"] == 0.0
    with pytest.raises(ValueError):
        M.hit_ndcg_at_k([0.3, 0.2], [[0.1]], k=1)
