"""Recommendation metrics in plain numpy (no torch, no sklearn), vectorised for millions of rows.

Public API::

    auc(labels, scores) -> float                                  # pooled ROC AUC; nan if one class only
    gauc(user_ids, labels, scores) -> GAUC(value, users, weighted)
    logloss(labels, probs, eps=1e-7) -> float
    precision_recall_f1(labels, probs, threshold=0.5) -> dict(precision, recall, f1)   # sklearn 'weighted'
    hit_ndcg_at_k(target_scores, negative_scores, k) -> dict(hr, ndcg)                 # leave-one-out ranking

Conventions:

* AUC is the Mann-Whitney statistic with average ranks, so tied scores count
  1/2 per (positive, negative) pair, exactly like sklearn's roc_auc_score.
* GAUC = mean of per-user AUCs over users that have both a positive and a
  negative (others are skipped; ``users`` says how many counted); ``weighted``
  is the impression-weighted mean (weights = the user's number of rows).
* LogLoss clips probabilities to [eps, 1-eps].
* precision/recall/F1 treat ``prob >= threshold`` as a positive prediction and
  average the per-class (0 and 1) values weighted by class support, as
  sklearn's ``average='weighted'`` does (a class never predicted has precision 0).
* HR@K / NDCG@K: the target's 0-based rank is the number of sampled negatives
  scoring **at least** as high as it (ties count against the target, so a
  constant scorer gets HR = 0 rather than an optimistic value);
  HR = [rank < K], NDCG = [rank < K] / log2(rank + 2).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class GAUC(NamedTuple):
    value: float      # mean of per-user AUCs (nan if no user counted)
    users: int        # users with both classes
    weighted: float   # impression-weighted mean of the same per-user AUCs


def _as_1d(x, dtype=None) -> np.ndarray:
    a = np.asarray(x, dtype=dtype).reshape(-1)
    return a


def _average_ranks(sorted_values: np.ndarray) -> np.ndarray:
    """1-based average ranks of an already sorted array (ties share their mean rank)."""
    n = len(sorted_values)
    if n == 0:
        return np.zeros(0)
    # np.concatenate, not np.r_: called once per user and split, where np.r_'s parsing cost more than the ranks
    starts = np.concatenate(([0], np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1))
    ends = np.concatenate((starts[1:], [n]))
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    return np.repeat(avg, ends - starts)


def auc(labels, scores) -> float:
    """Pooled ROC AUC (ties handled); nan when only one class is present."""
    y = _as_1d(labels).astype(bool)
    s = _as_1d(scores, np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = _average_ranks(s[order])
    pos_rank_sum = ranks[y[order]].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(user_ids, labels, scores) -> GAUC:
    """Per-user AUC averaged over users with both classes (plain and impression-weighted)."""
    u = _as_1d(user_ids)
    y = _as_1d(labels).astype(bool)
    s = _as_1d(scores, np.float64)
    if not (u.shape == y.shape == s.shape):
        raise ValueError("user_ids, labels and scores must have the same length")
    if u.size == 0:
        return GAUC(float("nan"), 0, float("nan"))
    _, uidx = np.unique(u, return_inverse=True)
    order = np.lexsort((s, uidx))           # by user, then score
    uo, so, yo = uidx[order], s[order], y[order]
    n = uo.size
    user_start = np.r_[0, np.flatnonzero(uo[1:] != uo[:-1]) + 1]
    # tie groups: same user and same score
    g_start = np.r_[0, np.flatnonzero((uo[1:] != uo[:-1]) | (so[1:] != so[:-1])) + 1]
    g_end = np.r_[g_start[1:], n]
    first_of_user = np.repeat(user_start, np.diff(np.r_[user_start, n]))
    # 1-based rank within the user, averaged over ties
    group_avg_pos = (g_start + g_end + 1) / 2.0
    ranks = np.repeat(group_avg_pos, g_end - g_start) - first_of_user
    n_users = user_start.size
    cnt = np.bincount(uo, minlength=n_users).astype(np.float64)
    n_pos = np.bincount(uo, weights=yo.astype(np.float64), minlength=n_users)
    pos_rank = np.bincount(uo, weights=ranks * yo, minlength=n_users)
    n_neg = cnt - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return GAUC(float("nan"), 0, float("nan"))
    per_user = (pos_rank[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (n_pos[valid] * n_neg[valid])
    w = cnt[valid]
    return GAUC(float(per_user.mean()), int(valid.sum()), float((per_user * w).sum() / w.sum()))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1-eps]."""
    y = _as_1d(labels, np.float64)
    p = np.clip(_as_1d(probs, np.float64), eps, 1.0 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def precision_recall_f1(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """Support-weighted precision, recall and F1 over classes {0, 1} (sklearn ``average='weighted'``)."""
    y = _as_1d(labels).astype(bool)
    pred = _as_1d(probs, np.float64) >= threshold
    if y.size == 0:
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    out = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    for cls in (True, False):
        support = int((y == cls).sum())
        if support == 0:
            continue
        tp = int(((pred == cls) & (y == cls)).sum())
        predicted = int((pred == cls).sum())
        p = tp / predicted if predicted else 0.0
        r = tp / support
        f = 2 * p * r / (p + r) if p + r else 0.0
        w = support / y.size
        out["precision"] += w * p
        out["recall"] += w * r
        out["f1"] += w * f
    return out


def hit_ndcg_at_k(target_scores, negative_scores, k: int = 10) -> dict[str, float]:
    """HR@K and NDCG@K of a held-out target against its sampled negatives ([N] vs [N, M])."""
    t = _as_1d(target_scores, np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if neg.ndim != 2 or neg.shape[0] != t.size:
        raise ValueError(f"negative_scores must be [N, M] with N = {t.size}, got {list(neg.shape)}")
    if t.size == 0:
        return {"hr": float("nan"), "ndcg": float("nan")}
    rank = (neg >= t[:, None]).sum(axis=1)
    hit = rank < k
    return {"hr": float(hit.mean()), "ndcg": float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())}
