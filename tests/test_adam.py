"""fedpa's Adam (recmodels/adam.py) is torch.optim.Adam's update, to the bit: two learning rates, parameters that
miss steps keep their own step count, and the cohort engine's stacked form agrees."""

from __future__ import annotations

import torch

from fedpa.recmodels.adam import Adam, adam_update


def test_adam_equals_torchs_bit_for_bit():
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True),
            torch.randn(2, 2, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    a = Adam([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.3}], lr=0.01)
    b = torch.optim.Adam([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.3}], lr=0.01, foreach=True)
    for step in range(7):
        grads = [torch.randn_like(p) for p in ours]
        for opt, params in ((a, ours), (b, theirs)):
            opt.zero_grad(set_to_none=True)
            for j, p in enumerate(params):
                if not (j == 1 and step in (2, 3)):   # no gradient at these steps: skipped, its count stays
                    p.grad = grads[j].clone()
            opt.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), step


def test_the_stacked_update_is_each_users_own():
    """The cohort engine steps every user's copy at once: the same as stepping each alone."""
    torch.manual_seed(1)
    stacked = torch.randn(3, 4, 2)
    grads = [torch.randn(3, 4, 2) for _ in range(4)]
    m, v = torch.zeros_like(stacked), torch.zeros_like(stacked)
    alone = [stacked[k].clone() for k in range(3)]
    ms, vs = [torch.zeros(4, 2) for _ in range(3)], [torch.zeros(4, 2) for _ in range(3)]
    for s, g in enumerate(grads, start=1):
        adam_update([stacked], [g], [m], [v], s, 0.05)
        for k in range(3):
            adam_update([alone[k]], [g[k]], [ms[k]], [vs[k]], s, 0.05)
    for k in range(3):
        assert torch.equal(stacked[k], alone[k])
