"""The sampled-softmax term of local training (`listwise-weight`): its value, its edge cases, and its way from the
configuration into a client's local training."""

import math

import numpy as np
import pytest
import torch

from fedpa.common.config import ConfigValueError, FederationConfig
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.functional import masked_bce, masked_softmax_ce
from fedpa.recmodels.personalization import LocalTraining, local_loss


def _by_hand(logits: np.ndarray, labels: np.ndarray) -> float:
    terms = []
    for t in range(labels.shape[1]):
        negatives = logits[labels[:, t] == 0, t]
        for s in logits[labels[:, t] == 1, t]:
            terms.append(-s + math.log(math.exp(s) + np.exp(negatives).sum()))
    return float(np.mean(terms))


def test_each_positive_against_every_negative_of_its_column():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5], [0.0, -0.2], [3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([[1, 0], [0, 1], [0, -1], [1, 0], [-1, 1]], dtype=torch.float64)   # -1: unobserved
    got = float(masked_softmax_ce(logits, labels))
    assert got == pytest.approx(_by_hand(logits.numpy(), labels.numpy()), rel=1e-12)
    # an unobserved row changes nothing, whatever its logit
    moved = logits.clone()
    moved[2, 1] = 40.0
    moved[4, 0] = -40.0
    assert float(masked_softmax_ce(moved, labels)) == pytest.approx(got, rel=1e-12)


def test_a_hard_negative_weighs_more_than_an_easy_one():
    labels = torch.tensor([[1.0], [0.0], [0.0]])
    logits = torch.tensor([[1.0], [0.9], [-3.0]], requires_grad=True)
    masked_softmax_ce(logits, labels).backward()
    g = logits.grad[:, 0]
    assert g[0] < 0 < g[2] < g[1]            # the positive rises; the hard negative is pushed down hardest
    assert float(g.sum()) == pytest.approx(0.0, abs=1e-6)   # a softmax moves scores against each other


@pytest.mark.parametrize("labels", [[[1.0], [1.0], [-1.0]], [[0.0], [0.0], [-1.0]], [[-1.0], [-1.0], [-1.0]]])
def test_without_positives_or_negatives_it_is_zero_with_a_finite_gradient(labels):
    logits = torch.tensor([[0.3], [-2.0], [5.0]], requires_grad=True)
    loss = masked_softmax_ce(logits, torch.tensor(labels))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().max()) < 1e-6


def test_local_loss_adds_the_weighted_term_to_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 2, generator=gen)
    labels = (torch.rand(64, 2, generator=gen) < 0.3).float()
    labels[::7, 1] = -1
    bce, sm = float(masked_bce(logits, labels)), float(masked_softmax_ce(logits, labels))
    assert sm > 0
    assert float(local_loss(logits, labels)) == pytest.approx(bce)
    assert float(local_loss(logits, labels, 0.5)) == pytest.approx(bce + 0.5 * sm)


def test_the_weight_is_checked_where_it_is_set():
    with pytest.raises(FedpaError, match="listwise weight must be >= 0"):
        LocalTraining(listwise_weight=-0.1)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigValueError, match="listwise-weight"):
            FederationConfig(listwise_weight=bad).validate()
