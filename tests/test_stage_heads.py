"""The ranking head (HoME, recmodels/stages/ranking.py) and the re-ranking stage (MMR + CDM, rerank.py).

HoME: the two-level hierarchy mask is checked exactly (perturbing one category's experts leaves
every other category's logits bit-identical), the feature gates start at exactly 1, unobserved
labels carry no loss, and a short training run learns two tasks driven by different features.
Re-ranking: greedy MMR against hand-worked cases, the batched teacher against the single-request
one, the diversity metrics against closed-form values, CDM's padding invariance, and a short CDM
training run that imitates the teacher and makes the served top-10 measurably more diverse.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpa.foundation.batch import TASKS
from fedpa.foundation.metrics import auc
from fedpa.recmodels.stages.ranking import HoMERanker
from fedpa.recmodels.stages.rerank import (
    CDMReranker,
    category_coverage,
    intra_list_distance,
    mmr_select,
    mmr_select_batch,
)

IN_DIM = 12
WATCH = ("effective_view", "long_view")
INTERACTION = ("like", "follow", "forward", "comment")


@pytest.fixture(autouse=True)
def single_thread():
    """These models are tiny: intra-op threads only contend with each other on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _column(task: str) -> int:
    return TASKS.index(task)


# ---------------------------------------------------------------------------------------- HoME


def test_home_shapes_and_adapter_targets_cover_every_linear():
    torch.manual_seed(0)
    model = HoMERanker(IN_DIM, n_shared=2, n_category=2, n_task=1, expert_dim=16, gate_rank=4)
    logits = model(torch.randn(5, IN_DIM))
    assert logits.shape == (5, len(TASKS)) and logits.dtype == torch.float32

    # 2 shared + 2 * 2 category + 6 task experts, each proj + fgate_down + fgate_up,
    # plus per category one gate and per task a gate, a self-gate and a tower.
    assert len(model.experts) == 2 + 4 + 6
    targets = model.adapter_targets
    assert len(targets) == 12 * 3 + 2 + 6 * 3
    assert {"experts.3.proj", "experts.0.fgate_down", "experts.11.fgate_up", "category_gates.1",
            "task_gates.5", "self_gates.2", "towers.4"} <= set(targets)
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in targets)
    # Everything trainable outside the targets is a LayerNorm (adapters need not reach it).
    outside = {name for name, _ in model.named_parameters()
               if name.rsplit(".", 1)[0] not in set(targets)}
    assert outside and all(".norm." in name for name in outside)


def test_home_rejects_categories_that_do_not_partition_the_tasks():
    with pytest.raises(ValueError, match="in no category"):
        HoMERanker(IN_DIM, categories={"watch": WATCH, "interaction": ("like", "follow")})
    with pytest.raises(ValueError, match="in several categories"):
        HoMERanker(IN_DIM, categories={"watch": WATCH + ("like",), "interaction": INTERACTION})


def test_home_feature_gates_start_at_exactly_one_and_then_learn():
    torch.manual_seed(0)
    model = HoMERanker(IN_DIM, expert_dim=16)
    for expert in model.experts:
        x = 3.0 * torch.randn(7, expert.proj.in_features)
        assert torch.equal(expert.feature_gate(x), torch.ones_like(x))

    pair = torch.randn(64, IN_DIM)
    labels = (torch.rand(64, len(TASKS)) < 0.5).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.loss(pair, labels).backward()
    optimizer.step()
    gate = model.experts[0].feature_gate(pair)
    assert not torch.equal(gate, torch.ones_like(gate))


def _perturb(modules: list[nn.Module]) -> None:
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn_like(p))


@pytest.mark.parametrize("category, other", [("watch", INTERACTION), ("interaction", WATCH)])
def test_home_hierarchy_mask_isolates_categories_exactly(category, other):
    torch.manual_seed(0)
    model = HoMERanker(IN_DIM, n_shared=2, n_category=2, n_task=2, expert_dim=16)
    pair = torch.randn(32, IN_DIM)
    with torch.no_grad():
        before = model(pair)
    owned = model.category_experts[category] + [i for t in model.categories[category] for i in model.task_experts[t]]
    gate = model.category_gates[list(model.categories).index(category)]
    _perturb([model.experts[i] for i in owned] + [gate])
    with torch.no_grad():
        after = model(pair)

    other_cols = [_column(t) for t in other]
    own_cols = [_column(t) for t in model.categories[category]]
    assert torch.equal(after[:, other_cols], before[:, other_cols])
    assert (after[:, own_cols] - before[:, own_cols]).abs().min() > 0


def test_home_task_experts_are_private_and_shared_experts_reach_every_task():
    torch.manual_seed(0)
    model = HoMERanker(IN_DIM, expert_dim=16)
    pair = torch.randn(32, IN_DIM)
    with torch.no_grad():
        before = model(pair)
        _perturb([model.experts[i] for i in model.task_experts["long_view"]])
        after_task = model(pair)
        _perturb([model.experts[i] for i in model.shared_experts])
        after_shared = model(pair)

    changed = (after_task != before).any(dim=0)
    assert changed.tolist() == [t == "long_view" for t in TASKS]
    assert (after_shared != after_task).all()


def test_home_unobserved_labels_carry_no_loss():
    torch.manual_seed(0)
    model = HoMERanker(IN_DIM, expert_dim=16)
    pair = torch.randn(40, IN_DIM)
    labels = (torch.rand(40, len(TASKS)) < 0.3).float()
    labels[torch.rand(40, len(TASKS)) < 0.4] = -1.0
    labels[:, _column("comment")] = -1.0          # a task nobody observed in this batch

    loss = model.loss(pair, labels)
    observed = labels >= 0
    expected = F.binary_cross_entropy_with_logits(model(pair)[observed], labels[observed])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    loss.backward()
    comment_tower, like_tower = model.towers[_column("comment")], model.towers[_column("like")]
    assert torch.count_nonzero(comment_tower.weight.grad) == 0
    assert torch.count_nonzero(like_tower.weight.grad) > 0

    with torch.no_grad():  # only the comment logits move, by a lot
        comment_tower.bias.add_(5.0)
        assert model.loss(pair, labels).item() == loss.item()


def _two_feature_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """effective_view follows x0, long_view needs x0 and x2, like follows x1; the rest unobserved."""
    x = torch.randn(n, IN_DIM, generator=generator)
    noise = 0.5 * torch.randn(n, 2, generator=generator)
    labels = torch.full((n, len(TASKS)), -1.0)
    effective = (x[:, 0] + noise[:, 0] > 0).float()
    labels[:, _column("effective_view")] = effective
    labels[:, _column("long_view")] = effective * (x[:, 2] > 0).float()
    labels[:, _column("like")] = (x[:, 1] + noise[:, 1] > 0.5).float()
    return x, labels


def test_home_learns_tasks_driven_by_different_features():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    test_x, test_y = _two_feature_task(2048, generator)
    model = HoMERanker(IN_DIM, expert_dim=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    with torch.no_grad():
        initial = model.loss(test_x, test_y).item()
    for _ in range(200):  # a fresh mini-batch per step: a stream of requests, no memorising
        loss = model.loss(*_two_feature_task(256, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        assert model.loss(test_x, test_y).item() < 0.5 * initial
        scores = model(test_x)
    for task in ("effective_view", "long_view", "like"):
        col = _column(task)
        assert auc(test_y[:, col].numpy(), scores[:, col].numpy()) > 0.85, task
    # Each task ranks by its own feature: effective_view's scores say nothing about like.
    assert auc(test_y[:, _column("like")].numpy(), scores[:, _column("effective_view")].numpy()) < 0.6


# ---------------------------------------------------------------------------------------- MMR


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Best item 2; item 3 duplicates it, item 1 is orthogonal to both, item 0 sits halfway (cos 0.707)."""
    items = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    scores = torch.tensor([0.5, 0.1, 1.0, 0.9])
    return scores, items


def test_mmr_with_lambda_one_is_top_k_by_score():
    torch.manual_seed(0)
    scores, items = torch.randn(15), torch.randn(15, 6)
    assert mmr_select(scores, items, k=6, lam=1.0).tolist() == scores.topk(6).indices.tolist()


def test_mmr_trades_relevance_for_novelty():
    scores, items = _hand_case()
    # lam = 0: first the best-scored item 2, then always the one least similar to the picks:
    # 1 (cos 0), then 0 (max cos 0.707 beats the duplicate's 1.0), then the duplicate 3.
    assert mmr_select(scores, items, k=4, lam=0.0).tolist() == [2, 1, 0, 3]
    # lam = 0.7, second pick: 0.63 - 0.3 = 0.33 (duplicate) > 0.35 - 0.212 = 0.138 (0) > 0.07 (1);
    # third: 0.138 (0) > 0.07 (1).
    assert mmr_select(scores, items, k=4, lam=0.7).tolist() == [2, 3, 0, 1]


def test_mmr_respects_mask_and_short_lists():
    scores, items = _hand_case()
    mask = torch.tensor([True, True, False, True])
    assert mmr_select(scores, items, k=10, lam=0.0, mask=mask).tolist() == [3, 1, 0]
    assert mmr_select(scores, items, k=2, lam=0.0, mask=torch.zeros(4, dtype=torch.bool)).tolist() == []


def test_mmr_batch_equals_single_request_per_row():
    torch.manual_seed(0)
    batch, n, k = 7, 12, 5
    scores, items = torch.randn(batch, n), torch.randn(batch, n, 4)
    n_valid = torch.tensor([12, 9, 5, 3, 1, 0, 7])
    mask = torch.arange(n)[None] < n_valid[:, None]
    mask[0, 4] = False                                   # a hole, not only right padding
    scores[~mask] = 100.0                                # padding must lose despite a huge score

    labels = mmr_select_batch(scores, items, k, lam=0.6, mask=mask)
    assert labels.dtype == torch.float32 and labels.shape == (batch, n)
    for row in range(batch):
        picks = mmr_select(scores[row], items[row], k, lam=0.6, mask=mask[row])
        expected = torch.zeros(n)
        expected[picks] = 1.0
        assert torch.equal(labels[row], expected), row
    assert labels.sum(dim=1).tolist() == [5, 5, 5, 3, 1, 0, 5]
    assert labels[~mask].sum() == 0


def test_intra_list_distance_and_coverage_closed_forms():
    assert intra_list_distance(torch.tensor([[0.3, -1.2, 2.0]] * 4)) == pytest.approx(0.0, abs=1e-12)
    assert intra_list_distance(3.0 * torch.eye(5)) == pytest.approx(1.0)
    # pairs (0, 1), (0, 2), (1, 2): distances 0, 1, 1
    assert intra_list_distance(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])) == pytest.approx(2 / 3)
    assert intra_list_distance(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])) == pytest.approx(2.0)
    assert intra_list_distance(torch.ones(1, 3)) == 0.0

    assert category_coverage(torch.tensor([0, 0, 1, 2]), 10) == pytest.approx(3 / 4)
    assert category_coverage(torch.tensor([0, 1, 2, 0, 1]), 3) == pytest.approx(1.0)
    assert category_coverage(torch.tensor([5, 5, 5]), 10) == pytest.approx(1 / 3)
    assert category_coverage(torch.tensor([], dtype=torch.long), 4) == 0.0


# ---------------------------------------------------------------------------------------- CDM


def _requests(generator: torch.Generator, batch: int = 32, n: int = 20, dim: int = 16, clusters: int = 6):
    """Clustered candidates whose ranking scores favour one cluster, so top-k by score is redundant.

    About 60% of a request's candidates are near-duplicates from its favoured cluster and score
    0.6 higher; MMR (lam 0.5) keeps a few of them and fills the list from the other clusters.
    """
    centres = F.normalize(torch.randn(batch, clusters, dim, generator=generator), dim=-1)
    favoured = torch.rand(batch, n, generator=generator) < 0.6
    cluster = torch.where(favoured, 0, torch.randint(1, clusters, (batch, n), generator=generator))
    items = centres.gather(1, cluster[..., None].expand(batch, n, dim))
    items = items + 0.2 * torch.randn(batch, n, dim, generator=generator) / math.sqrt(dim)
    scores = 0.6 * favoured.float() + 0.3 * torch.randn(batch, n, generator=generator)
    n_valid = torch.randint(14, n + 1, (batch, 1), generator=generator)
    mask = torch.arange(n)[None] < n_valid
    return items, scores, mask


def test_cdm_ignores_padded_candidates_exactly():
    torch.manual_seed(0)
    model = CDMReranker(16)
    items, scores, mask = _requests(torch.Generator().manual_seed(3), batch=8)
    assert (~mask).any()
    with torch.no_grad():
        logits = model(items, scores, mask)
        final = model.final_scores(items, scores, mask, weight=1.0)
        loss = model.loss(items, scores, mask, k=10, lam=0.5)
        garbage_items, garbage_scores = items.clone(), scores.clone()
        garbage_items[~mask] = float("nan")
        garbage_scores[~mask] = 1e6
        assert torch.equal(model(garbage_items, garbage_scores, mask), logits)
        assert torch.equal(model.final_scores(garbage_items, garbage_scores, mask, weight=1.0), final)
        assert model.loss(garbage_items, garbage_scores, mask, k=10, lam=0.5).item() == loss.item()
    assert torch.isinf(final[~mask]).all() and (final[~mask] < 0).all()
    assert torch.isfinite(final[mask]).all()


def test_cdm_outputs_do_not_depend_on_the_padding_length():
    torch.manual_seed(0)
    model = CDMReranker(16)
    items, scores, _ = _requests(torch.Generator().manual_seed(5), batch=4, n=20)
    n_valid = 13
    short_mask = torch.ones(4, n_valid, dtype=torch.bool)
    long_mask = torch.arange(20)[None].expand(4, 20) < n_valid
    with torch.no_grad():
        short = model(items[:, :n_valid], scores[:, :n_valid], short_mask)
        padded = model(items, scores, long_mask)
    torch.testing.assert_close(padded[:, :n_valid], short, rtol=0, atol=1e-6)
    assert torch.equal(padded[:, n_valid:], torch.zeros(4, 20 - n_valid))


def test_cdm_loss_is_finite_for_lonely_and_empty_requests():
    torch.manual_seed(0)
    model = CDMReranker(16)
    items, scores, mask = _requests(torch.Generator().manual_seed(4), batch=3)
    mask[0] = False
    mask[1, 1:] = False                                   # one candidate: no context, no InfoNCE term
    loss = model.loss(items, scores, mask, k=10, lam=0.5)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert set(model.adapter_targets) == {"query", "key", "value", "student_hidden", "student_out"}


def test_cdm_contrastive_loss_teaches_attention_to_find_similar_candidates():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = CDMReranker(16)
    items, scores, mask = _requests(torch.Generator().manual_seed(99), batch=64)
    unit = F.normalize(items, dim=-1)
    similar = (unit @ unit.transpose(-1, -2) > 0.8) & ~torch.eye(20, dtype=torch.bool)  # same cluster
    similar &= mask[:, :, None] & mask[:, None, :]
    anchors = similar.any(dim=-1)

    def mass_on_similar() -> float:
        with torch.no_grad():
            weights = model.context_weights(items, scores, mask)
        return float((weights * similar).sum(dim=-1)[anchors].mean())

    chance = float((similar.sum(-1) / (mask.sum(-1, keepdim=True) - 1))[anchors].mean())
    assert mass_on_similar() == pytest.approx(chance, abs=0.02)   # at init attention is near uniform
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        initial = model.contrastive_loss(items, scores, mask).item()
    for _ in range(100):
        loss = model.contrastive_loss(*_requests(generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert model.contrastive_loss(items, scores, mask).item() < initial - 0.8
    assert mass_on_similar() > chance + 0.15


def _top_k_diversity(items: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, k: int) -> float:
    per_request = [intra_list_distance(items[b, scores[b].masked_fill(~mask[b], float("-inf")).topk(k).indices])
                   for b in range(items.shape[0])]
    return sum(per_request) / len(per_request)


def test_cdm_student_imitates_mmr_and_diversifies_the_served_list():
    torch.manual_seed(0)
    train, k, lam = torch.Generator().manual_seed(1), 10, 0.5
    model = CDMReranker(16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model.loss(*_requests(train), k=k, lam=lam)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    items, scores, mask = _requests(torch.Generator().manual_seed(99), batch=64)
    with torch.no_grad():
        teacher = mmr_select_batch(scores, items, k, lam, mask)
        student_auc = auc(teacher[mask].numpy(), model(items, scores, mask)[mask].numpy())
        final = model.final_scores(items, scores, mask, weight=1.0)
    score_only_auc = auc(teacher[mask].numpy(), scores[mask].numpy())
    assert student_auc > 0.85
    assert student_auc > score_only_auc + 0.04       # it learned redundancy, not just the score

    ranked_diversity = _top_k_diversity(items, scores, mask, k)
    served_diversity = _top_k_diversity(items, final, mask, k)
    teacher_diversity = _top_k_diversity(items, teacher + 1e-3 * scores, mask, k)
    assert ranked_diversity < 0.35 < teacher_diversity
    assert served_diversity > ranked_diversity + 0.08
