import numpy as np
import pytest

from fedpa.foundation import metrics as M
from fedpa.recmodels.evaluation import MetricSums


def test_sums_reproduce_exact_metrics():
    rng = np.random.default_rng(0)
    users = [(rng.integers(0, 2, n), rng.random(n)) for n in rng.integers(5, 80, 40)]
    total = MetricSums()
    for y, p in users:
        part = MetricSums()
        part.add_user(y, p)
        total += part  # clients' vectors add up on the server
    y = np.concatenate([u[0] for u in users])
    p = np.concatenate([u[1] for u in users])
    uid = np.concatenate([np.full(len(u[0]), i) for i, u in enumerate(users)])
    got = total.finalize()
    assert abs(got["auc"] - M.auc(y, p)) < 2e-3  # histogram AUC: only pairs within one bin are approximated
    g = M.gauc(uid, y, p)
    assert abs(got["gauc"] - g.value) < 1e-12 and got["gauc_users"] == g.users
    assert abs(got["logloss"] - M.logloss(y, p)) < 1e-9
    prf = M.precision_recall_f1(y, p)
    for k in ("precision", "recall", "f1"):
        assert abs(got[k] - prf[k]) < 1e-12


def test_unobserved_labels_are_ignored_and_ranking_cases():
    s = MetricSums()
    s.add_user(np.array([1, -1, 0]), np.array([0.9, 0.5, 0.1]))
    assert s.finalize()["n"] == 2 and s.finalize()["auc"] == 1.0
    r = MetricSums()
    # two cases of (target, 3 negatives): target ranked first, then ranked last
    r.add_user(np.array([1, 0, 0, 0, 1, 0, 0, 0]), np.array([.9, .1, .2, .3, .05, .1, .2, .3]), group_size=4)
    out = r.finalize()
    assert out["cases"] == 2 and out["hr@10"] == 1.0
    assert abs(out["ndcg@10"] - (1 + 1 / np.log2(5)) / 2) < 1e-12


def test_membership_attack_scores_confidence_in_the_true_label():
    from fedpa.recmodels.evaluation import membership_attack

    # an overfitted model: confident on its training rows, unsure on held-out rows
    is_member, score = membership_attack(np.array([1, 0, -1]), np.array([0.99, 0.02, 0.5]),
                                         np.array([1, 0]), np.array([0.6, 0.45]))
    assert is_member.tolist() == [1, 1, 0, 0]  # the unlabelled training row is left out
    assert np.allclose(score, [0.99, 0.98, 0.6, 0.55])
    s = MetricSums()
    s.add_user(is_member, score)
    assert s.finalize()["auc"] == 1.0


def test_ranking_metrics_for_several_k_with_ties_counted_against_the_target():
    from fedpa.recmodels.evaluation import RANK_KS

    s = MetricSums()
    # case 1: target first; case 2: three negatives above, one tied (counts above: rank 4); case 3: rank 12
    cases = [[.9] + [.1] * 19, [.5, .6, .7, .8, .5] + [.1] * 15, [.3] + [.9] * 12 + [.1] * 7]
    probs = np.concatenate(cases)
    s.add_user(np.tile([1] + [0] * 19, 3), probs, group_size=20)
    out = s.finalize()
    ranks = np.array([0, 4, 12])
    for k in RANK_KS:
        hit = ranks < k
        assert out[f"hr@{k}"] == pytest.approx(hit.mean())
        assert out[f"ndcg@{k}"] == pytest.approx(np.where(hit, 1 / np.log2(ranks + 2), 0).mean())
        assert out[f"mrr@{k}"] == pytest.approx(np.where(hit, 1 / (ranks + 1), 0).mean())


def test_per_user_spread_and_change_against_a_reference():
    users = MetricSums()
    rng = np.random.default_rng(0)
    own, ref = [], []
    for _ in range(200):
        y = np.r_[np.ones(5, np.int64), np.zeros(15, np.int64)]
        p = rng.random(20)
        r = rng.random(20)
        users.add_user(y, p, reference=r)
        own.append(M.auc(y, p))
        ref.append(M.auc(y, r))
    spread = users.finalize()["per_user"]
    own, change = np.array(own), np.array(own) - np.array(ref)
    for q in (10, 50, 90):
        assert abs(spread[f"p{q}"] - np.quantile(own, q / 100)) < 0.02           # histogram bins of 0.01
        assert abs(spread[f"change_p{q}"] - np.quantile(change, q / 100)) < 0.03
    assert spread["share_worse"] == pytest.approx((change < 0).mean())
    assert spread["share_better"] == pytest.approx((change > 0).mean())
    assert spread["change_mean"] == pytest.approx(change.mean())
    assert spread["users"] == 200


def test_the_change_by_activity_group_is_each_groups_own_and_adds_up_over_nodes():
    from fedpa.recmodels.evaluation import ACTIVITY_GROUPS, activity_group

    rng = np.random.default_rng(1)
    nodes = [MetricSums(), MetricSums()]
    truth: dict[str, list[float]] = {}
    for u in range(300):
        rows = int(rng.choice([3, 9, 10, 49, 50, 120, 199, 200, 900]))
        y = np.r_[np.ones(4, np.int64), np.zeros(12, np.int64)]
        p, r = rng.random(16), rng.random(16)
        # the active users (200+) are made to gain: their own scores rank every positive first
        if rows >= 200:
            p = np.r_[np.full(4, 0.99), rng.random(12) * 0.5]
        nodes[u % 2].add_user(y, p, reference=r, training_rows=rows)
        truth.setdefault(ACTIVITY_GROUPS[activity_group(rows)], []).append(M.auc(y, p) - M.auc(y, r))
    total = MetricSums(nodes[0].v + nodes[1].v)
    groups = {g["group"]: g for g in total.finalize()["per_user"]["by_activity"]}
    assert list(groups) == list(ACTIVITY_GROUPS)                     # 3 and 9 -> "1-9", 10 and 49 -> "10-49", ...
    assert sum(g["users"] for g in groups.values()) == 300
    for name, change in truth.items():
        change = np.array(change)
        g = groups[name]
        assert g["users"] == len(change)
        assert g["change_mean"] == pytest.approx(change.mean())
        assert g["share_worse"] == pytest.approx((change < -1e-12).mean())
        assert g["share_better"] == pytest.approx((change > 1e-12).mean())
        assert abs(g["change_p50"] - np.quantile(change, 0.5)) < 0.03
    assert groups["200+"]["share_worse"] < 0.2 < groups["1-9"]["share_worse"]


def test_without_training_rows_there_is_no_group_view():
    s = MetricSums()
    s.add_user(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2]), reference=np.array([0.1, 0.9, 0.2]))
    assert "by_activity" not in s.finalize()["per_user"]
