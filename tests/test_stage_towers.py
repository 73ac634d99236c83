"""Retrieval and pre-ranking two-tower heads (recmodels.stages.towers) on small synthetic worlds."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpa.recmodels.stages.towers import PrerankDSSM, RetrievalTwoTower, recall_ndcg_at_k

DU, DI, DH = 12, 8, 6  # user, item and history-state widths of the shape tests


pytestmark = pytest.mark.usefixtures("one_thread")  # a few hundred tiny steps


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def request_batch(b=5, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(b, DU, generator=g)
    history = torch.randn(b, t, DH, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 2:] = False
    mask[3, 1:] = False
    return user, history, mask


def rank_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC from ranks (continuous scores, so no ties to average)."""
    ranks = scores.argsort().argsort().double() + 1
    positives = labels.bool()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ------------------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("interests", [1, 3])
def test_retrieval_shapes_unit_norm_and_adapter_targets(interests):
    torch.manual_seed(0)
    model = RetrievalTwoTower(DU, DI, DH, dim=16, hidden=24, interests=interests)
    user, history, mask = request_batch()
    items = torch.randn(7, DI)
    user_vecs = model.user_vectors(user, history, mask)
    item_vecs = model.item_vectors(items)
    assert user_vecs.shape == (5, interests, 16) and item_vecs.shape == (7, 16)
    assert torch.allclose(user_vecs.norm(dim=-1), torch.ones(5, interests), atol=1e-6)
    assert torch.allclose(item_vecs.norm(dim=-1), torch.ones(7), atol=1e-6)
    assert model.score(user_vecs, item_vecs).shape == (5, 7)
    assert set(model.adapter_targets) == linear_names(model)
    assert ("interest_fc1" in model.adapter_targets) == (interests > 1)


def test_single_interest_ignores_history():
    torch.manual_seed(0)
    model = RetrievalTwoTower(DU, DI, DH, interests=1)
    user, history, mask = request_batch()
    without = model.user_vectors(user)
    assert torch.equal(model.user_vectors(user, history, mask), without)
    assert torch.equal(model.user_vectors(user, torch.randn_like(history), ~mask), without)


def test_multi_interest_score_is_the_best_interest():
    torch.manual_seed(0)
    model = RetrievalTwoTower(DU, DI, DH, dim=16, hidden=24, interests=3, temperature=0.1)
    user, history, mask = request_batch()
    items = torch.randn(9, DI)
    with torch.no_grad():
        scores = model.score(model.user_vectors(user, history, mask), model.item_vectors(items))
        # explicit ComiRec pooling, one request and one head at a time
        base = model.user_fc2(F.relu(model.user_fc1(user)))
        item_vecs = F.normalize(model.item_fc2(F.relu(model.item_fc1(items))), dim=-1)
        expected = torch.empty(5, 9)
        best_head = torch.empty(5, 9, dtype=torch.long)
        for b in range(5):
            h = history[b][mask[b]]
            per_head = []
            for k in range(3):
                a = torch.softmax(model.interest_fc2(torch.tanh(model.interest_fc1(h)))[:, k], dim=0)
                interest = F.normalize(base[b] + model.interest_proj((a[:, None] * h).sum(0)), dim=0)
                per_head.append(item_vecs @ interest / 0.1)
            per_head = torch.stack(per_head)
            expected[b], best_head[b] = per_head.max(dim=0)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert best_head.unique().numel() > 1  # the max is not always taken by the same interest


def test_multi_interest_reads_only_valid_history():
    torch.manual_seed(0)
    model = RetrievalTwoTower(DU, DI, DH, interests=3)
    user, history, mask = request_batch()
    reference = model.user_vectors(user, history, mask)
    padded_changed = torch.where(mask.unsqueeze(-1), history, torch.randn_like(history) * 100)
    assert torch.equal(model.user_vectors(user, padded_changed, mask), reference)
    valid_changed = history.clone()
    valid_changed[1, 0] += 1.0
    moved = model.user_vectors(user, valid_changed, mask)
    assert not torch.allclose(moved[1], reference[1]) and torch.equal(moved[0], reference[0])
    # a request without any valid position pools nothing: K equal, finite vectors from the user tower
    empty = mask.clone()
    empty[2] = False
    vecs = model.user_vectors(user, history, empty)
    base = model.user_fc2(F.relu(model.user_fc1(user[2])))
    expected = F.normalize(base + model.interest_proj(torch.zeros(DH)), dim=0)
    assert torch.allclose(vecs[2], expected.expand(3, -1), atol=1e-6)
    assert torch.equal(vecs[[0, 1, 3, 4]], reference[[0, 1, 3, 4]])
    with pytest.raises(ValueError, match="history"):
        model.user_vectors(user)


def test_retrieval_loss_is_softmax_over_all_negative_sources():
    torch.manual_seed(0)
    model = RetrievalTwoTower(DU, DI, DH, interests=1, temperature=0.5)
    user, _, _ = request_batch(b=4)
    positives, randoms, hard = torch.randn(4, DI), torch.randn(3, DI), torch.randn(4, 2, DI)
    hard_mask = torch.tensor([[True, True], [True, False], [False, False], [False, True]])
    loss = model.loss(user, None, None, positives, randoms, hard, hard_mask)
    with torch.no_grad():
        u = model.user_vectors(user)[:, 0]
        s_pos = u @ model.item_vectors(positives).T / 0.5
        s_rand = u @ model.item_vectors(randoms).T / 0.5
        s_hard = torch.einsum("bd,bhd->bh", u, model.item_vectors(hard)) / 0.5
        denominator = s_pos.exp().sum(1) + s_rand.exp().sum(1) + (s_hard.exp() * hard_mask).sum(1)
        expected = (denominator.log() - s_pos.diagonal()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_hard_negatives_count_only_where_masked_in():
    torch.manual_seed(0)
    model = RetrievalTwoTower(DU, DI, DH, interests=3)
    user, history, mask = request_batch(b=4)
    positives, randoms, hard = torch.randn(4, DI), torch.randn(5, DI), torch.randn(4, 3, DI)
    hard_mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False], [True, True, True]])

    def loss_and_grad(hard_values, hard_mask_values):
        model.zero_grad()
        loss = model.loss(user, history, mask, positives, randoms, hard_values, hard_mask_values)
        loss.backward()
        return loss.detach(), model.item_fc1.weight.grad.clone()

    loss, grad = loss_and_grad(hard, hard_mask)
    repadded = torch.where(hard_mask.unsqueeze(-1), hard, torch.full_like(hard, float("nan")))
    loss_repadded, grad_repadded = loss_and_grad(repadded, hard_mask)
    assert torch.equal(loss, loss_repadded) and torch.equal(grad, grad_repadded)

    moved = hard.clone()
    moved[0, 1] += 2.0  # a real hard negative
    assert not torch.equal(loss_and_grad(moved, hard_mask)[0], loss)

    without = model.loss(user, history, mask, positives, randoms)
    assert loss.item() > without.item()  # more negatives can only raise a softmax loss
    nothing_valid = model.loss(user, history, mask, positives, randoms, hard, torch.zeros_like(hard_mask))
    assert nothing_valid.item() == pytest.approx(without.item(), rel=1e-6)


def test_retrieval_learns_a_synthetic_world_from_chance():
    """200 items on the unit sphere; a request's user vector is a noisy copy of its positive item,
    so nearest-neighbour search recovers it for ~80% of requests and chance Recall@10 is 0.05."""
    torch.manual_seed(0)
    n_items, width, noise = 200, 16, 0.35
    items = F.normalize(torch.randn(n_items, width), dim=-1)

    def requests(n):
        positive = torch.randint(n_items, (n,))
        return items[positive] + noise * torch.randn(n, width), positive

    train_user, train_pos = requests(4000)
    test_user, test_pos = requests(300)
    relevant = F.one_hot(test_pos, n_items).bool()
    model = RetrievalTwoTower(width, width, width)

    def recall_at_10():
        with torch.no_grad():
            scores = model.score(model.user_vectors(test_user), model.item_vectors(items))
        return recall_ndcg_at_k(scores, relevant, [10])["recall@10"]

    untrained = recall_at_10()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        rows = torch.randint(len(train_user), (64,))
        loss = model.loss(train_user[rows], None, None, items[train_pos[rows]], items[torch.randint(n_items, (64,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    trained = recall_at_10()
    assert untrained < 0.15
    assert trained > 0.5
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]


def test_recall_ndcg_hand_example():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.5],
                           [0.3, 0.2, 0.1, 0.0, 0.4],
                           [0.1, 0.2, 0.3, 0.4, 0.5],
                           [0.5, 0.4, 0.3, 0.2, 0.1]])
    relevant = torch.zeros(4, 5, dtype=torch.bool)
    relevant[0, [1, 3]] = True      # ranked 2nd and 5th
    relevant[2, 4] = True           # ranked 1st
    relevant[3, [0, 2, 4]] = True   # ranked 1st, 3rd and 5th; row 1 has nothing relevant: skipped
    out = recall_ndcg_at_k(scores, relevant, [1, 2, 10])
    d2, d3, d5 = (1 / math.log2(r + 1) for r in (2, 3, 5))  # DCG discount of the 1-based rank r
    assert out["requests"] == 3
    assert out["recall@1"] == pytest.approx((0 + 1 + 1 / 3) / 3)
    assert out["ndcg@1"] == pytest.approx((0 + 1 + 1) / 3)
    assert out["recall@2"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    assert out["ndcg@2"] == pytest.approx((d2 / (1 + d2) + 1 + 1 / (1 + d2)) / 3)
    # K = 10 is clipped to the 5 candidates
    assert out["recall@10"] == pytest.approx(1.0)
    assert out["ndcg@10"] == pytest.approx((d2 + d5) / (1 + d2) / 3 + 1 / 3 + (1 + d3 + d5) / (1 + d2 + d3) / 3)

    empty = recall_ndcg_at_k(scores, torch.zeros_like(relevant), [5])
    assert empty["requests"] == 0 and math.isnan(empty["recall@5"]) and math.isnan(empty["ndcg@5"])


# ------------------------------------------------------------------------------------- pre-ranking


def test_dssm_shapes_and_consistent_scoring():
    torch.manual_seed(0)
    model = PrerankDSSM(DU, DI)
    user, item = torch.randn(6, DU), torch.randn(6, DI)
    logits = model(user, item)
    matrix = model.score_matrix(user, item)
    assert logits.shape == (6,) and matrix.shape == (6, 6)
    assert torch.allclose(matrix.diagonal(), logits, atol=1e-6)
    assert model.logit_scale.item() == 5.0 and logits.abs().max() <= 5.0 + 1e-5  # |cosine| <= 1, bias 0
    assert set(model.adapter_targets) == linear_names(model)


def test_dssm_bce_skips_unobserved_labels():
    torch.manual_seed(0)
    model = PrerankDSSM(DU, DI)
    user, item = torch.randn(6, DU), torch.randn(6, DI)
    labels = torch.tensor([1, 0, -1, 1, -1, 0])
    observed = labels >= 0
    expected = F.binary_cross_entropy_with_logits(model(user, item)[observed], labels[observed].float())
    assert model.loss(user, item, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    none_observed = model.loss(user, item, torch.full((6,), -1))
    assert none_observed.item() == 0.0 and none_observed.requires_grad


def test_dssm_learns_a_separable_task():
    """label = [u · v > 0]: the towers only have to learn a shared rotation of the inputs."""
    torch.manual_seed(0)
    width = 8

    def pairs(n):
        user, item = torch.randn(n, width), torch.randn(n, width)
        return user, item, ((user * item).sum(-1) > 0).float()

    test_user, test_item, test_labels = pairs(2000)
    model = PrerankDSSM(width, width)
    with torch.no_grad():
        untrained = rank_auc(model(test_user, test_item), test_labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss(*pairs(128))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        trained = rank_auc(model(test_user, test_item), test_labels)
    assert 0.35 < untrained < 0.65
    assert trained > 0.85


def test_stage_ranking_loss_pairs_and_padding():
    torch.manual_seed(0)
    model = PrerankDSSM(DU, DI)
    user, items = torch.randn(2, DU), torch.randn(2, 3, DI)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    levels = torch.tensor([[4, 1, 6], [2, 2, 2]])  # one valid ordered pair: (0, 1) of request 0
    loss = model.stage_ranking_loss(user, items, levels, mask)
    with torch.no_grad():
        s = model(user[:1].expand(2, -1), items[0, :2])
    assert loss.item() == pytest.approx(F.softplus(-(s[0] - s[1])).item(), rel=1e-5)

    repadded = items.clone()
    repadded[0, 2] = float("nan")
    assert torch.equal(model.stage_ranking_loss(user, repadded, levels, mask), loss)

    flat = model.stage_ranking_loss(user, items, torch.full_like(levels, 3), torch.ones_like(mask))
    assert flat.item() == 0.0 and flat.requires_grad
    flat.backward()
    assert model.user_fc1.weight.grad is not None and not model.user_fc1.weight.grad.any()


def test_stage_ranking_alone_orders_items_by_level():
    """Each request has 8 stage samples whose funnel level follows the hidden relevance u · v
    (two per level 4, 3, 2, 1); some requests pad their last sample."""
    torch.manual_seed(0)
    width, samples = 8, 8

    def stage_requests(n):
        user, items = torch.randn(n, width), torch.randn(n, samples, width)
        rank = torch.einsum("bd,bsd->bs", user, items).argsort(1, descending=True).argsort(1)
        levels = 4 - rank // 2
        mask = torch.ones(n, samples, dtype=torch.bool)
        mask[: n // 2, -1] = False
        return user, items, levels, mask

    test_user, test_items, test_levels, test_mask = stage_requests(500)
    model = PrerankDSSM(width, width)

    def level_gap():
        with torch.no_grad():
            scores = model(test_user.repeat_interleave(samples, 0), test_items.reshape(-1, width))
        scores = scores.view(-1, samples)
        top, bottom = (test_levels == 4) & test_mask, (test_levels == 1) & test_mask
        return float(scores[top].mean() - scores[bottom].mean())

    untrained = level_gap()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model.stage_ranking_loss(*stage_requests(64))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(untrained) < 1.0
    assert level_gap() > 2.0
