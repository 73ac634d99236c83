import numpy as np

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
