"""Adam as `torch.optim.Adam(foreach=True)` computes it (no weight decay, no amsgrad), written out once for the two
places that train adapters: a user's model (`PersonalModel`) and the cohort engine's stacked per-user copies.

Why not `torch.optim.Adam` itself: constructing any torch optimizer imports torch's compiler (`torch._dynamo`,
which pulls sympy): ~70 MiB of resident memory on a device whose whole budget is 400 MiB, for nothing it uses.
The cohort engine needs the update term by term anyway (its parameters are stacks of every user's copies, the
steps of a chunk's users in lockstep). The terms are torch's own, in its order; `tests/test_adam.py` holds the
two to the same values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

BETAS = (0.9, 0.999)   # torch.optim.Adam's defaults
EPS = 1e-8


def adam_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avg: Sequence[torch.Tensor],
                exp_avg_sq: Sequence[torch.Tensor], step: int, lr: float | Sequence[float]) -> None:
    """One Adam step (the ``step``-th, from 1) of ``params`` in place, from their ``grads`` and moment estimates
    (updated in place). ``lr``: one learning rate, or one per parameter."""
    if not params:
        return
    beta1, beta2 = BETAS
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
    torch._foreach_add_(denom, EPS)
    correction = 1 - beta1 ** step
    if isinstance(lr, (int, float)):
        torch._foreach_addcdiv_(params, exp_avg, denom, (lr / correction) * -1)
        return
    # parameters at their own rates: one update per rate, each as torch's would be
    for rate in sorted(set(lr)):
        idx = [j for j, r in enumerate(lr) if r == rate]
        torch._foreach_addcdiv_([params[j] for j in idx], [exp_avg[j] for j in idx], [denom[j] for j in idx],
                                (rate / correction) * -1)


class Adam:
    """`torch.optim.Adam(groups, lr, foreach=True)` for the parameter groups a user's model trains: ``groups``
    as torch takes them (dicts with "params" and optionally "lr"). Parameters without a gradient at a step are
    skipped and keep their own step count, as torch's are."""

    def __init__(self, groups: Iterable[dict], lr: float):
        self.params: list[torch.Tensor] = []
        self.lrs: list[float] = []
        for g in groups:
            for p in g["params"]:
                self.params.append(p)
                self.lrs.append(float(g.get("lr", lr)))
        self.state: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [j for j, p in enumerate(self.params) if p.grad is not None]
        by_step: dict[int, list[int]] = {}
        for j in live:
            n, m, v = self.state.get(j) or (0, torch.zeros_like(self.params[j]), torch.zeros_like(self.params[j]))
            self.state[j] = (n + 1, m, v)
            by_step.setdefault(n + 1, []).append(j)
        for step, idx in by_step.items():
            adam_update([self.params[j] for j in idx], [self.params[j].grad for j in idx],
                        [self.state[j][1] for j in idx], [self.state[j][2] for j in idx], step,
                        [self.lrs[j] for j in idx])
