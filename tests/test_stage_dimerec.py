"""DimeRec's generative retrieval head (recmodels.stages.dimerec): the walk on the sphere, generation, training."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpa.recmodels.stages.dimerec import DimeRecRetrieval, slerp, tangent_step
from fedpa.recmodels.stages.towers import RetrievalTwoTower

DU, DI, DH = 12, 8, 6


pytestmark = pytest.mark.usefixtures("one_thread")  # a few hundred tiny steps


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.acos((a * b).sum(-1).clamp(-1, 1))


def test_the_forward_walk_stays_on_the_sphere_and_its_angle_grows_linearly():
    torch.manual_seed(0)
    model = DimeRecRetrieval(DU, DI, DH, dim=32, interests=2, steps=10)
    x0 = F.normalize(torch.randn(4000, 32), dim=-1)
    means = []
    for t in (1, 5, 10):
        xt = model.diffuse(x0, torch.full((4000,), t))
        assert torch.allclose(xt.norm(dim=-1), torch.ones(4000), atol=1e-5)
        means.append(float(angle(x0, xt).mean()))
    # the expected angle is max_angle · t / T (a chi distribution's mean is a little under √(d-1)·std)
    for t, m in zip((1, 5, 10), means):
        assert m == pytest.approx(math.pi / 2 * t / 10, rel=0.05)
    # the step is tangent: with no noise along x0, the walk moves exactly by the tangent's norm
    noise = torch.zeros(1, 32)
    noise[0, 1] = 0.3
    e0 = torch.zeros(1, 32)
    e0[0, 0] = 1.0
    moved = tangent_step(e0, noise, torch.ones(1))
    assert float(angle(e0, moved)) == pytest.approx(0.3, abs=1e-6)


def test_slerp_follows_the_great_circle():
    a = F.normalize(torch.randn(6, 5), dim=-1)
    b = F.normalize(torch.randn(6, 5), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.25)
    assert torch.allclose(angle(a, mid), 0.25 * angle(a, b), atol=1e-5)
    assert torch.allclose(slerp(a, a, 0.5), a, atol=1e-6)  # the same point: no division by sin(0)


def test_shapes_determinism_and_adapter_targets():
    torch.manual_seed(0)
    model = DimeRecRetrieval(DU, DI, DH, dim=16, hidden=24, interests=3, steps=5)
    user, history = torch.randn(5, DU), torch.randn(5, 4, DH)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[2, 1:] = False
    vecs = model.user_vectors(user, history, mask)
    assert vecs.shape == (5, 1, 16) and torch.allclose(vecs.norm(dim=-1), torch.ones(5, 1), atol=1e-6)
    assert torch.equal(model.user_vectors(user, history, mask), vecs)  # a request always retrieves the same
    assert model.guidance(user, history, mask).shape == (5, 3, 16)
    assert set(model.adapter_targets) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    loss = model.loss(user, history, mask, torch.randn(5, DI), torch.randn(7, DI))
    loss.backward()
    assert torch.isfinite(loss) and model.dam_fc1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="interests must be >= 2"):
        DimeRecRetrieval(DU, DI, DH, interests=1)


def clustered_world(n: int, seed: int, clusters: int = 6):
    """Users whose history is items of one cluster (as history states) and whose next item is
    another item of that cluster; the catalogue has 20 items per cluster."""
    g = torch.Generator().manual_seed(100)
    centres = torch.randn(clusters, DI, generator=g) * 2
    catalogue = (centres.repeat_interleave(20, 0) + 0.3 * torch.randn(clusters * 20, DI, generator=g))
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(clusters, (n,), generator=g)
    hist_items = c[:, None] * 20 + torch.randint(20, (n, 5), generator=g)
    history = catalogue[hist_items][..., :DH]
    positive = catalogue[c * 20 + torch.randint(20, (n,), generator=g)]
    user = torch.randn(n, DU, generator=g) * 0.1  # the profile says nothing: the history must
    return user, history, torch.ones(n, 5, dtype=torch.bool), positive, catalogue, c


def test_the_generated_query_learns_to_retrieve_the_users_cluster():
    torch.manual_seed(0)
    model = DimeRecRetrieval(DU, DI, DH, dim=16, hidden=48, interests=3, steps=8, temperature=0.1)
    user, history, mask, positive, catalogue, _ = clustered_world(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        b = torch.randint(512, (64,))
        loss = model.loss(user[b], history[b], mask[b], positive[b], catalogue[torch.randint(120, (32,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    user, history, mask, positive, catalogue, c = clustered_world(200, seed=2)
    with torch.no_grad():
        scores = model.score(model.user_vectors(user, history, mask), model.item_vectors(catalogue))  # [200, 120]
        own = torch.arange(120)[None, :] // 20 == c[:, None]
        top = scores.topk(20, dim=1).indices
        precision = own.gather(1, top).float().mean()
        # the denoiser does the work: the generated query is closer to the positives than where it starts
        guidance = model.guidance(user, history, mask)
        start = F.normalize(guidance.mean(1), dim=-1)
        target = model.item_vectors(positive)
        generated = model.generate(guidance)
    assert precision > 0.9
    assert float((generated * target).sum(-1).mean()) > float((start * target).sum(-1).mean()) + 0.05


def test_an_untrained_two_tower_and_dimerec_share_the_guidance():
    torch.manual_seed(3)
    two_tower = RetrievalTwoTower(DU, DI, DH, dim=16, hidden=24, interests=3)
    torch.manual_seed(3)
    dimerec = DimeRecRetrieval(DU, DI, DH, dim=16, hidden=24, interests=3)
    user, history = torch.randn(4, DU), torch.randn(4, 3, DH)
    mask = torch.ones(4, 3, dtype=torch.bool)
    assert torch.equal(dimerec.guidance(user, history, mask), two_tower.user_vectors(user, history, mask))
