"""Membership inference against what the server sees: one user's shared update, or the round's sum.

The attacker is the server (honest-but-curious) and is given more than it would have: for a target
user it holds candidate examples, the rows the user trained on in the replayed round (members: a
random half of its training rows) and the other half (non-members, same days, so the attack
measures what the update reveals and not the drift between days), and it knows the state it sent. It applies the
observed vector to that state (the user's update alone, or the aggregated step) and scores each
candidate by how much its loss dropped: local training lowers the loss of what it trained on (the
loss-difference attack on model updates). The attack AUC over all thresholds is the attacker's
success (0.5 = nothing learned), pooled over targets and as a per-user mean.

Two views, replayed outside Flower with exactly the client's code path (train, clip, local or
distributed noise as configured):

* ``individual``: one user's update, as the server sees it without secure aggregation;
* ``aggregate``: the sum over a round's cohort, as the server sees it with secure aggregation (in
  ``central`` DP mode the server adds its noise after unmasking, so it sees the sum without noise).

The replayed round starts from a given shared state (the run's final checkpoint) with fresh
private adapters (the state a newly sampled user has); the cohort is drawn with the attack's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedpa.client.runtime import ClientRuntime
from fedpa.client.training import dp_settings
from fedpa.common.aggregation import apply_sums, spec_from
from fedpa.common.config import FederationConfig
from fedpa.common.privacy import add_noise, distributed_share_std, private_contribution
from fedpa.foundation.metrics import auc
from fedpa.recmodels.personalization import UserTensors


@dataclass
class UpdateAttackResult:
    individual_auc: float        # pooled over targets: the server without secure aggregation
    individual_per_user: float   # mean of per-target AUCs
    aggregate_auc: float         # the server with secure aggregation (sum over the cohort)
    aggregate_per_user: float
    targets: int
    cohort: int

    def server_view(self, secagg: bool) -> float:
        return self.aggregate_auc if secagg else self.individual_auc

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _example_losses(rt: ClientRuntime, data, state: dict[str, np.ndarray], rows: torch.Tensor,
                    labels: torch.Tensor) -> np.ndarray:
    """Per-candidate loss of the user's model (fresh private part) with the shared ``state``."""
    pm = rt.model
    pm.set_shared(state)
    pm.set_private(None)
    return pm.example_losses(UserTensors(rows, labels), data.profile)


def _user_update(rt: ClientRuntime, cfg: FederationConfig, data, train: UserTensors, state, spec, cohort: int,
                 seed: int):
    """The user's contribution exactly as the client computes it (train, clip, noise)."""
    pm = rt.model
    pm.set_shared(state)
    pm.set_private(None)
    pm.train_user(train, data.profile, rt.local, seed=seed)
    local = pm.get_shared()
    delta = {k: local[k] - state[k] for k in local}
    dp = dp_settings(cfg, pm, cohort)
    contrib = private_contribution(delta, spec, pm.groups_of(data.profile), **dp)
    if cfg.dp_noise_multiplier > 0 and cfg.dp_mode == "distributed":
        # what the user's node adds in fixed point before masking (client.secagg): its share of the noise, here
        # as the float Gaussian of the same variance (the attack needs its distribution, not its exactness)
        contrib = add_noise(contrib, spec, distributed_share_std(**{k: dp[k] for k in (
            "noise_multiplier", "clip", "n_count_terms", "min_reply_fraction", "cohort")}), clamp=False)
    return contrib


def run_update_attack(cfg: FederationConfig, state: dict[str, np.ndarray], *, targets: int = 32,
                      candidates: int = 64, seed: int = 0, runtime: ClientRuntime | None = None,
                      progress=None) -> UpdateAttackResult:
    """Replay one round from ``state`` for a cohort of the configured size and attack both views."""
    rt = runtime or ClientRuntime(cfg)
    if not rt.algorithm.communicates:
        raise ValueError(f"'{cfg.algorithm}' sends no updates: there is nothing for the server to attack")
    if cfg.item_tables and cfg.algorithm == "fedpa":
        raise ValueError("the update attack replays runs without item-side tables (item-bias-fields, "
                         "item-embedding-dim, item-popularity): their per-row counts and click tally already tell "
                         "a server without secure aggregation which items a user read")
    pm = rt.model
    spec = spec_from(pm.shared_spec())
    rng = np.random.default_rng([seed, 0xA77])
    n = min(cfg.sample_size(rt.num_clients), rt.num_clients)
    cohort = sorted(rng.choice(rt.num_clients, size=n, replace=False).tolist())
    total, updates = None, {}
    # targets: cohort members with both members and non-members to score
    usable = [c for c in cohort if len(rt.user(c).train) >= 4]
    chosen = set(rng.permutation(usable)[:targets].tolist())
    halves = {}
    for i, c in enumerate(cohort):
        data = rt.user(c)
        train = data.train
        if c in chosen:
            # a target trains on a random half of its rows; the other half are non-members drawn from
            # the same days, so the attack measures what the update reveals, not the drift between days
            perm = np.random.default_rng([seed, c]).permutation(len(train))
            halves[c] = (perm[: len(perm) // 2], perm[len(perm) // 2:])
            train = train.rows(halves[c][0])
        contrib = _user_update(rt, cfg, data, train, state, spec, n, seed=int(rng.integers(2**31)))
        total = contrib if total is None else {k: total[k] + contrib[k] for k in total}
        if c in chosen:
            updates[c] = contrib
        if progress:
            progress(i + 1, len(cohort))
    stepped = {"individual": None, "aggregate": apply_sums(state, total, spec)}
    view_auc = {"individual": ([], [], []), "aggregate": ([], [], [])}
    for c in sorted(chosen):
        data = rt.user(c)
        m, o = (h[:candidates] for h in halves[c])
        rows = torch.cat([data.train.features[m], data.train.features[o]])
        labels = torch.cat([data.train.labels[m], data.train.labels[o]])
        is_member = np.r_[np.ones(len(m)), np.zeros(len(o))]
        before = _example_losses(rt, data, state, rows, labels)
        stepped["individual"] = apply_sums(state, updates[c], spec)
        for view, new_state in stepped.items():
            ys, ss, per_user = view_auc[view]
            s = before - _example_losses(rt, data, new_state, rows, labels)
            ys.append(is_member)
            ss.append(s)
            per_user.append(auc(is_member, s))
    out = {}
    for view, (ys, ss, per_user) in view_auc.items():
        out[view] = (auc(np.concatenate(ys), np.concatenate(ss)) if ys else math.nan,
                     float(np.mean(per_user)) if per_user else math.nan)
    return UpdateAttackResult(out["individual"][0], out["individual"][1], out["aggregate"][0],
                              out["aggregate"][1], targets=len(chosen), cohort=n)


__all__ = ["UpdateAttackResult", "run_update_attack"]
