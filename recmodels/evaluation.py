"""Evaluation as sums, so that clients report numbers and the server only adds them.

A client scores its own rows and turns them into a fixed-length vector of
sums (`MetricSums`); the server adds the vectors of all clients and derives:

- pooled AUC from score histograms (8,192 bins uniform in logit space over
  [-16, 16]; pairs that fall in the same bin count 1/2, so the AUC differs from
  the exact rank statistic only by pairs closer than 0.004 in logit),
- GAUC: mean of per-user AUCs (exact, computed by each client) over users with
  both classes, and the impression-weighted variant,
- LogLoss, precision/recall/F1 at 0.5 (sklearn 'weighted', from the confusion counts),
- HR@K / NDCG@K / MRR@K for K in `RANK_KS`, for leave-one-out ranking cases (exact, per case; a negative
  scored equal to the held-out item ranks above it, as PFedRec's scorer counts ties),
- the spread over users: a histogram of each user's own metric (AUC, or NDCG@10 for ranking cases) and,
  when the client passes the frozen foundation's scores as a reference, of each user's change against it
  (quantiles and the share of users who lose or gain), overall and by activity group (how many training
  rows the user has: personalization should help the active users and must not hurt the sparse ones).

No score or label leaves a client individually: only counts and sums.
"""

from __future__ import annotations

import numpy as np

from fedpa.foundation import metrics as M

BINS = 8192
LOGIT_RANGE = 16.0
EPS = 1e-7
RANK_KS = (5, 10, 20)
USER_BINS = 100    # per-user metric in [0, 1]
DELTA_BINS = 200   # per-user change against the reference in [-1, 1]
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# activity groups by the user's number of training rows: fixed edges, because the server only adds vectors
ACTIVITY_EDGES = (10, 50, 200)
ACTIVITY_GROUPS = ("1-9", "10-49", "50-199", "200+")
_GROUP_SCALARS = ("users", "value_sum", "referenced", "worse", "better", "delta_sum")
_GROUP_SIZE = len(_GROUP_SCALARS) + DELTA_BINS
_SCALARS = ("n", "logloss_sum", "gauc_sum", "gauc_users", "gauc_wsum", "gauc_weight",
            "tp", "fp", "fn", "tn", "cases",
            *(f"{m}@{k}_sum" for k in RANK_KS for m in ("hr", "ndcg", "mrr")),
            "users_ranked", "users_referenced", "users_worse", "users_better", "delta_sum")
_USERS = 2 * BINS + len(_SCALARS)            # histogram of per-user metric
_DELTAS = _USERS + USER_BINS                 # histogram of per-user change against the reference
_GROUPS = _DELTAS + DELTA_BINS               # per activity group: scalars, then its histogram of changes
SIZE = _GROUPS + len(ACTIVITY_GROUPS) * _GROUP_SIZE
_AT = {name: 2 * BINS + i for i, name in enumerate(_SCALARS)}   # a node adds ~15 scalars per user: no list search
_GROUP_AT = {name: i for i, name in enumerate(_GROUP_SCALARS)}


def activity_group(training_rows: int) -> int:
    """The index into ACTIVITY_GROUPS of a user with this many training rows."""
    return int(np.searchsorted(ACTIVITY_EDGES, training_rows, side="right"))


def _bin(logit: np.ndarray) -> np.ndarray:
    idx = np.floor((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * BINS).astype(np.int64)
    return np.clip(idx, 0, BINS - 1)


class MetricSums:
    def __init__(self, vector: np.ndarray | None = None):
        self.v = np.zeros(SIZE, np.float64) if vector is None else np.asarray(vector, np.float64).copy()
        if self.v.shape != (SIZE,):
            raise ValueError(f"metric vector has shape {self.v.shape}, expected ({SIZE},)")

    def _add(self, name: str, x: float) -> None:
        self.v[_AT[name]] += x

    def get(self, name: str) -> float:
        return float(self.v[_AT[name]])

    def __iadd__(self, other: MetricSums) -> MetricSums:
        self.v += other.v
        return self

    def add_user(self, labels: np.ndarray, probs: np.ndarray, group_size: int = 1,
                 reference: np.ndarray | None = None, training_rows: int | None = None) -> None:
        """One user's rows: binary labels (rows with label < 0 are ignored) and predicted probabilities.
        ``group_size`` > 1: rows come in ranking cases of one target followed by sampled negatives.
        ``reference``: the same rows scored by a reference model (the frozen foundation), for the
        distribution of per-user changes. ``training_rows``: how many rows the user trained on, for the
        spread by activity group."""
        labels = np.asarray(labels)
        probs = np.asarray(probs, np.float64)
        if group_size > 1 and len(probs):
            cases = probs.reshape(-1, group_size)
            ranks = (cases[:, 1:] >= cases[:, :1]).sum(axis=1)
            self._add("cases", len(cases))
            for k in RANK_KS:
                hit = ranks < k
                self._add(f"hr@{k}_sum", float(hit.sum()))
                self._add(f"ndcg@{k}_sum", float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).sum()))
                self._add(f"mrr@{k}_sum", float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).sum()))
            mine = _user_ranking(probs, group_size)
            self._add_user_value(mine, None if reference is None else _user_ranking(reference, group_size),
                                 training_rows)
        seen = labels >= 0
        y, p = labels[seen].astype(np.int64), probs[seen]
        if not len(y):
            return
        # few numpy calls per user: a node adds thousands of users a round, each a few rows
        pc = np.clip(p, EPS, 1 - EPS)
        log_p, log_q = np.log(pc), np.log1p(-pc)
        # the positives' histogram, then the negatives', in one count
        self.v[:2 * BINS] += np.bincount(_bin(log_p - log_q) + BINS * (1 - y), minlength=2 * BINS)
        self._add("n", len(y))
        self._add("logloss_sum", float(-(y * log_p + (1 - y) * log_q).sum()))
        if 0 < y.sum() < len(y):
            a = M.auc(y, p)
            self._add("gauc_sum", a)
            self._add("gauc_users", 1)
            self._add("gauc_wsum", a * len(y))
            self._add("gauc_weight", len(y))
            if group_size <= 1:
                ref = None if reference is None else M.auc(y, np.asarray(reference, np.float64)[seen])
                self._add_user_value(a, ref, training_rows)
        tn, fp, fn, tp = np.bincount(2 * y + (p >= 0.5), minlength=4)   # (label, prediction) pairs
        self._add("tp", float(tp))
        self._add("fp", float(fp))
        self._add("fn", float(fn))
        self._add("tn", float(tn))

    def _add_user_value(self, value: float, reference: float | None, training_rows: int | None) -> None:
        self._add("users_ranked", 1)
        self.v[_USERS + min(int(value * USER_BINS), USER_BINS - 1)] += 1
        g = None
        if training_rows is not None:
            g = _GROUPS + activity_group(training_rows) * _GROUP_SIZE
            self.v[g + _GROUP_AT["users"]] += 1
            self.v[g + _GROUP_AT["value_sum"]] += value
        if reference is not None:
            d = value - reference
            delta_bin = min(int((d + 1.0) / 2.0 * DELTA_BINS), DELTA_BINS - 1)
            self._add("users_referenced", 1)
            self._add("delta_sum", d)
            self._add("users_worse", float(d < -1e-12))
            self._add("users_better", float(d > 1e-12))
            self.v[_DELTAS + delta_bin] += 1
            if g is not None:
                for name, x in (("referenced", 1.0), ("worse", float(d < -1e-12)), ("better", float(d > 1e-12)),
                                ("delta_sum", d)):
                    self.v[g + _GROUP_AT[name]] += x
                self.v[g + len(_GROUP_SCALARS) + delta_bin] += 1

    def by_activity(self) -> list[dict]:
        """Per activity group with users: its size, mean metric and, against the reference, the share of its
        users who gain or lose and the quantiles of their change."""
        out = []
        for j, name in enumerate(ACTIVITY_GROUPS):
            g = self.v[_GROUPS + j * _GROUP_SIZE:_GROUPS + (j + 1) * _GROUP_SIZE]
            val = dict(zip(_GROUP_SCALARS, map(float, g[:len(_GROUP_SCALARS)])))
            if not val["users"]:
                continue
            row = {"group": name, "users": val["users"], "metric_mean": val["value_sum"] / val["users"]}
            if val["referenced"]:
                row.update(_change_summary(val["referenced"], val["worse"], val["better"], val["delta_sum"],
                                           g[len(_GROUP_SCALARS):], (0.1, 0.5, 0.9)))
            out.append(row)
        return out

    def per_user(self) -> dict[str, float]:
        """The spread over users: quantiles of each user's own metric and of its change against the
        reference (from histograms: exact to the bin width, 0.01), the share of users who lose or gain."""
        out: dict[str, float] = {}
        n = self.get("users_ranked")
        if n:
            hist = self.v[_USERS:_USERS + USER_BINS]
            out.update({f"p{round(q * 100)}": _quantile(hist, q, 0.0, 1.0) for q in QUANTILES})
            out["users"] = n
        m = self.get("users_referenced")
        if m:
            hist = self.v[_DELTAS:_DELTAS + DELTA_BINS]
            out.update(_change_summary(m, self.get("users_worse"), self.get("users_better"), self.get("delta_sum"),
                                       hist, QUANTILES))
            # the whole distribution (counts per 0.01 of change over [-1, 1]): what a report draws
            out["change_hist"] = [int(c) for c in hist]
        groups = self.by_activity()
        if groups:
            out["by_activity"] = groups
        return out

    def finalize(self) -> dict[str, float]:
        pos, neg = self.v[:BINS], self.v[BINS:2 * BINS]
        n_pos, n_neg = pos.sum(), neg.sum()
        out: dict[str, float] = {"n": self.get("n")}
        if n_pos > 0 and n_neg > 0:
            neg_below = np.cumsum(neg) - neg
            out["auc"] = float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))
        else:
            out["auc"] = float("nan")
        users = self.get("gauc_users")
        out["gauc"] = self.get("gauc_sum") / users if users else float("nan")
        out["gauc_weighted"] = self.get("gauc_wsum") / self.get("gauc_weight") if users else float("nan")
        out["gauc_users"] = users
        out["logloss"] = self.get("logloss_sum") / out["n"] if out["n"] else float("nan")
        tp, fp, fn, tn = (self.get(k) for k in ("tp", "fp", "fn", "tn"))
        prf = _weighted_prf(tp, fp, fn, tn)
        out.update(prf)
        cases = self.get("cases")
        if cases:
            for k in RANK_KS:
                for m in ("hr", "ndcg", "mrr"):
                    out[f"{m}@{k}"] = self.get(f"{m}@{k}_sum") / cases
            out["cases"] = cases
        spread = self.per_user()
        if spread:
            out["per_user"] = spread
        return out


def _change_summary(users: float, worse: float, better: float, delta_sum: float, hist: np.ndarray,
                    quantiles) -> dict[str, float]:
    """Of ``users`` users' changes against the reference: quantiles (from their histogram), mean, shares."""
    return {**{f"change_p{round(q * 100)}": _quantile(hist, q, -1.0, 1.0) for q in quantiles},
            "change_mean": delta_sum / users, "share_worse": worse / users, "share_better": better / users}


def _user_ranking(probs: np.ndarray, group_size: int) -> float:
    """A user's NDCG@10 over its ranking cases (the per-user metric of leave-one-out)."""
    cases = np.asarray(probs, np.float64).reshape(-1, group_size)
    ranks = (cases[:, 1:] >= cases[:, :1]).sum(axis=1)
    return float(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean())


def _quantile(hist: np.ndarray, q: float, lo: float, hi: float) -> float:
    """The q-quantile of values binned uniformly over [lo, hi], interpolated linearly within its bin."""
    total = hist.sum()
    if not total:
        return float("nan")
    cum = np.cumsum(hist)
    target = q * total
    b = int(np.searchsorted(cum, target, side="left"))
    before = cum[b - 1] if b else 0.0
    frac = (target - before) / hist[b] if hist[b] else 0.0
    width = (hi - lo) / len(hist)
    return float(lo + (b + frac) * width)


def _weighted_prf(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """sklearn's average='weighted' over classes 1 and 0, from confusion counts."""
    def prf(t, f_pos, f_neg):
        p = t / (t + f_pos) if t + f_pos else 0.0
        r = t / (t + f_neg) if t + f_neg else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return p, r, f
    s1, s0 = tp + fn, tn + fp
    total = s1 + s0
    if not total:
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    p1, r1, f1 = prf(tp, fp, fn)
    p0, r0, f0 = prf(tn, fn, fp)
    w1, w0 = s1 / total, s0 / total
    return {"precision": w1 * p1 + w0 * p0, "recall": w1 * r1 + w0 * r0, "f1": w1 * f1 + w0 * f0}


def membership_attack(train_labels: np.ndarray, train_probs: np.ndarray, test_labels: np.ndarray,
                      test_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A confidence-threshold membership-inference attack on one user's personalized model.

    Members are the user's training rows, non-members its held-out test rows; the attack's score is
    the model's probability of the true label (overfitted models are more confident on members).
    Returns (is_member, score) for `MetricSums.add_user`: its AUC is the attack's success over all
    thresholds (0.5 = the attacker learns nothing), its GAUC the mean per-user attack AUC."""
    def confidence(y, p):
        seen = y >= 0
        return np.where(y[seen] == 1, p[seen], 1 - p[seen])
    members, others = confidence(train_labels, train_probs), confidence(test_labels, test_probs)
    return (np.concatenate([np.ones(len(members), np.int64), np.zeros(len(others), np.int64)]),
            np.concatenate([members, others]))
