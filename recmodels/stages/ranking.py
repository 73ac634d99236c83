"""The ranking stage: HoME, Kuaishou's hierarchy of multi-gate experts (arXiv 2408.05430).

HoME scores one (request, candidate) pair for every task of `foundation.batch.TASKS` from the
foundation's tower input ``pair`` [B, Dp]. It is an MMoE that fixes the three failures Kuaishou
reports for MMoE/PLE at scale:

* **Expert collapse** (a few experts with huge activations take every gate): every expert is
  ``Swish(LayerNorm(Linear(x)))``, so all expert outputs live on the same scale.
* **Expert degradation** (shared experts end up serving one task only): experts are arranged in a
  two-level hierarchy. Level 1 holds shared *meta* experts plus experts per task *category*
  (watch time vs. interactions); level 2 holds experts per task that read their category's level-1
  output. A task's gate only ever sees the shared experts, its category and its own experts, so a
  category with dense labels (watch) cannot take over the experts of one with sparse labels
  (interactions), and vice versa.
* **Expert underfitting** (sparse tasks ignore their own experts): a per-expert *feature gate*
  gives every expert its own view of the input, and a *self-gate* adds the task's own experts
  back as a gated residual, so a task's experts keep a gradient path even when its gate prefers
  the shared ones.

Every trainable layer is an ``nn.Linear`` listed in `HoMERanker.adapter_targets`, so FedPA adapters
can be injected into the head exactly as into the foundation's tower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedpa.foundation.batch import TASKS
from fedpa.foundation.model import masked_bce

DEFAULT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "watch": ("effective_view", "long_view"),
    "interaction": ("like", "follow", "forward", "comment"),
}
"""HoME's split of Kuaishou's tasks: dense watch-time signals vs. sparse explicit interactions."""


class GatedExpert(nn.Module):
    """One HoME expert: a low-rank feature gate on its input, then ``Swish(LayerNorm(proj(x)))``.

    The feature gate ``2 * sigmoid(fgate_up(fgate_down(x)))`` rescales each input feature per
    expert, so experts that read the same input can still specialise. ``fgate_up`` starts at zero,
    so the gate starts at exactly 1 and a freshly built expert behaves like a plain one; the factor 2
    lets the gate both amplify and suppress features around that neutral point.
    """

    def __init__(self, in_dim: int, out_dim: int, gate_rank: int):
        super().__init__()
        self.fgate_down = nn.Linear(in_dim, gate_rank, bias=False)
        self.fgate_up = nn.Linear(gate_rank, in_dim, bias=False)
        nn.init.zeros_(self.fgate_up.weight)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def feature_gate(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.fgate_up(self.fgate_down(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.proj(x * self.feature_gate(x))))


def _gated_mix(gate: nn.Linear, gate_input: torch.Tensor, expert_outputs: list[torch.Tensor]) -> torch.Tensor:
    """Softmax-weighted sum of ``expert_outputs`` (each [B, D]) with weights from ``gate``."""
    weights = torch.softmax(gate(gate_input), dim=-1)                    # [B, E]
    return torch.einsum("be,bed->bd", weights, torch.stack(expert_outputs, dim=1))


class HoMERanker(nn.Module):
    """Multi-task ranking head: ``pair`` [B, in_dim] -> one logit per task, [B, len(tasks)].

    All experts live in one ``experts`` ModuleList (so adapter targets read ``experts.<i>.proj``);
    ``shared_experts``, ``category_experts`` and ``task_experts`` say which indices belong where.
    ``category_gates.<c>`` and ``task_gates`` / ``self_gates`` / ``towers.<t>`` are indexed by the
    position of the category in ``categories`` and of the task in ``tasks``.
    Gates read the raw pair: the routing decision is about the request and candidate, while the
    experts' inputs differ per level.
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[str] = TASKS,
        categories: Mapping[str, Sequence[str]] | None = None,
        n_shared: int = 1,
        n_category: int = 1,
        n_task: int = 1,
        expert_dim: int = 64,
        gate_rank: int = 8,
    ):
        super().__init__()
        categories = DEFAULT_CATEGORIES if categories is None else categories
        self.tasks = tuple(tasks)
        self.categories = {name: tuple(members) for name, members in categories.items()}
        _check_partition(self.tasks, self.categories)
        if min(n_shared, n_category, n_task) < 1:
            raise ValueError("HoME needs at least one shared, one category and one task expert per slot "
                             f"(got n_shared={n_shared}, n_category={n_category}, n_task={n_task})")
        self.category_of = {task: cat for cat, members in self.categories.items() for task in members}

        experts: list[GatedExpert] = []

        def allocate(count: int, expert_in: int) -> list[int]:
            experts.extend(GatedExpert(expert_in, expert_dim, gate_rank) for _ in range(count))
            return list(range(len(experts) - count, len(experts)))

        self.shared_experts = allocate(n_shared, in_dim)
        self.category_experts = {cat: allocate(n_category, in_dim) for cat in self.categories}
        # Level-2 experts read their category's level-1 output, not the raw pair.
        self.task_experts = {task: allocate(n_task, expert_dim) for task in self.tasks}
        self.experts = nn.ModuleList(experts)

        # Per-category and per-task layers are ModuleLists in the order of ``categories`` / ``tasks``
        # (a ModuleDict cannot hold the task "forward": its keys become attributes).
        self.category_gates = nn.ModuleList(nn.Linear(in_dim, n_shared + n_category) for _ in self.categories)
        # A task mixes the shared meta experts, its category's level-1 output and its own experts.
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, n_shared + 1 + n_task) for _ in self.tasks)
        self.self_gates = nn.ModuleList(nn.Linear(expert_dim, expert_dim) for _ in self.tasks)
        self.towers = nn.ModuleList(nn.Linear(expert_dim, 1) for _ in self.tasks)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        shared = [self.experts[i](pair) for i in self.shared_experts]
        category_out = {
            cat: _gated_mix(gate, pair, shared + [self.experts[i](pair) for i in self.category_experts[cat]])
            for cat, gate in zip(self.categories, self.category_gates)
        }
        logits = []
        for t, task in enumerate(self.tasks):
            level1 = category_out[self.category_of[task]]
            own = [self.experts[i](level1) for i in self.task_experts[task]]
            mixed = _gated_mix(self.task_gates[t], pair, shared + [level1] + own)
            own_mean = torch.stack(own, dim=0).mean(dim=0)
            mixed = mixed + torch.sigmoid(self.self_gates[t](own_mean)) * own_mean
            logits.append(self.towers[t](mixed))
        return torch.cat(logits, dim=-1)

    def loss(self, pair: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean BCE over the observed labels (``labels`` [B, T] in ``tasks`` order, -1 = unobserved)."""
        return masked_bce(self(pair), labels)

    @property
    def adapter_targets(self) -> list[str]:
        return [name for name, module in self.named_modules() if isinstance(module, nn.Linear)]


def _check_partition(tasks: tuple[str, ...], categories: dict[str, tuple[str, ...]]) -> None:
    """Every task must sit in exactly one category, or the hierarchy mask would be ill-defined."""
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {tasks}")
    placed = [task for members in categories.values() for task in members]
    duplicated = sorted({t for t in placed if placed.count(t) > 1})
    missing = sorted(set(tasks) - set(placed))
    unknown = sorted(set(placed) - set(tasks))
    empty = sorted(cat for cat, members in categories.items() if not members)
    problems = [f"{what}: {names}" for what, names in
                (("in several categories", duplicated), ("in no category", missing),
                 ("not a task", unknown), ("empty categories", empty)) if names]
    if problems:
        raise ValueError("categories must partition the tasks; " + "; ".join(problems))
