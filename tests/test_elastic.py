"""ELASTIC's user encoder (foundation/elastic.py): the interest experts, the product-key interest memory, linear
cost in the history's length, and a foundation that learns the sequence with it."""

import pytest
import torch

from fedpa.foundation.config import ConfigError
from fedpa.foundation.elastic import ElasticEncoder, InterestMemory
from fedpa.foundation.model import FoundationModel, load_foundation
from fedpa.foundation.pretrain import evaluate, pretrain
from fedpa.foundation.testing import random_batch, small_config


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return FoundationModel(small_config(user_encoder="elastic", **kw))


def test_product_keys_read_the_topk_slots_a_brute_force_search_finds():
    torch.manual_seed(0)
    mem = InterestMemory(16, n_keys=8, topk=3)
    q = torch.randn(5, 16)
    got = mem(q)
    # brute force over all 64 slots: slot (i, j) scores <q1, k1_i> + <q2, k2_j>
    scores = (q[:, :8] @ mem.keys[0].T)[:, :, None] + (q[:, 8:] @ mem.keys[1].T)[:, None, :]
    best, slot = scores.flatten(1).topk(3, dim=-1)
    want = (best.softmax(-1)[..., None] * mem.values.weight[slot]).sum(1)
    torch.testing.assert_close(got, want)


def test_the_encoder_returns_user_and_experts_and_ignores_padding():
    torch.manual_seed(0)
    enc = ElasticEncoder(16, layers=2, heads=2, ff=32, seq_len=40, interests=4, memory_keys=8, topk=2).eval()
    hist = torch.randn(3, 40, 16)
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, :10], mask[1, :40], mask[2, :0] = True, True, True        # 10 views, 40 views, none
    states, out_mask = enc(hist, mask)
    assert states.shape == (3, 5, 16) and out_mask.all() and torch.isfinite(states).all()
    # what sits in the padded positions does not matter
    other = hist.clone()
    other[0, 10:] = torch.randn(30, 16) * 100
    torch.testing.assert_close(enc(other, mask)[0][0], states[0])
    # but the history does
    assert not torch.allclose(enc(hist * 2, mask)[0][1], states[1])


def test_cost_grows_linearly_with_the_history_not_quadratically():
    """Multiply-adds of one forward pass, counted by torch's flop counter: ELASTIC's grow about 4x from 250 to
    1,000 views, BERT's self-attention about 16x in its attention part (and more than ELASTIC's in total)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def flops(user_encoder, length):
        m = FoundationModel(small_config(user_encoder=user_encoder, seq_len=length)).eval()
        b = random_batch(m.config, 1, 0, hist_fill=1.0)
        # the math kernel spells attention as matrix products, which the counter sees
        with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            m.user_encoder(m.item_encoder(b["hist_items"]), b["hist_mask"])
        return fc.get_total_flops()

    e250, e1000 = flops("elastic", 250), flops("elastic", 1000)
    b250, b1000 = flops("bert", 250), flops("bert", 1000)
    assert 3.5 < e1000 / e250 < 4.5
    assert b1000 / b250 > 5.0 and b1000 > 2 * e1000


def test_config_refuses_what_cannot_be_built():
    for bad in (dict(user_encoder="lstm"), dict(user_encoder="elastic", interests=0),
                dict(user_encoder="elastic", d_model=33, n_heads=3)):
        with pytest.raises(ConfigError):
            FoundationModel(small_config(**bad))


def _seen_category_task(cfg, n, seed):
    """Batches whose primary label is whether the candidate's category appears in the user's history: only a
    model that reads the history can predict it."""
    from fedpa.foundation.batch import ITEM_FIELDS

    cat = ITEM_FIELDS.index("category_level_two")
    out = []
    for i in range(n):
        b = random_batch(cfg, 256, seed * 1000 + i, n_users=10_000, hist_fill=0.3)
        seen = ((b["hist_items"][..., cat] == b["item"][:, None, cat]) & b["hist_mask"].bool()).any(1)
        labels = torch.full_like(b["labels"], -1.0)
        labels[:, 0] = seen.float()
        out.append(dict(b, labels=labels))
    return out


def test_an_elastic_foundation_learns_from_the_history_and_round_trips(tmp_path):
    m = build(seq_len=100)
    train, val = _seen_category_task(m.config, 20, 1), _seen_category_task(m.config, 3, 2)
    hist = pretrain(m, lambda e: train, lambda: val, tmp_path, epochs=4, lr=3e-3, seed=0)
    best = load_foundation(tmp_path)
    after = evaluate(best, val)
    assert best.config.user_encoder == "elastic" and after["auc"] == pytest.approx(hist["best_auc"])
    blind = evaluate(best, [dict(b, hist_mask=torch.zeros_like(b["hist_mask"])) for b in val])
    assert after["auc"] > 0.68 and after["auc"] > blind["auc"] + 0.08, (after["auc"], blind["auc"])


def test_an_elastic_foundation_exports_to_onnx_with_parity(tmp_path):
    """The device path: ONNX (top-k retrieval included) scores as PyTorch does, on a batch of another size."""
    import numpy as np

    from fedpa.foundation.export import export_onnx, onnx_probabilities, torch_probabilities

    m = build(seq_len=60).eval()
    m.dedupe_histories = False
    path = export_onnx(m, random_batch(m.config, 32, 0), tmp_path / "m.onnx")
    other = random_batch(m.config, 17, 5)
    assert np.abs(onnx_probabilities(path, other) - torch_probabilities(m, other)).max() <= 1e-5
