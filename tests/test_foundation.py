"""The foundation model: config, shapes, determinism, checkpoint I/O and errors, pre-training, resume, int8."""

import json
import math
import shutil

import pytest
import torch

from fedpa.foundation.batch import TASKS
from fedpa.foundation.config import ConfigError, FoundationConfig
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import (
    CheckpointError,
    FoundationModel,
    count_parameters,
    freeze,
    hash_ids,
    load_foundation,
    pin_foundation,
)
from fedpa.foundation.pretrain import evaluate, pretrain
from fedpa.foundation.quantize import quantize_for_inference
from fedpa.foundation.testing import batch_iter, random_batch, small_config


def build(arch="transformer", seed=0, **kw):
    torch.manual_seed(seed)
    return FoundationModel(small_config(arch, **kw))


# ---------------------------------------------------------------- config


def test_config_from_dataset_vocab_and_json_round_trip(tmp_path):
    cfg = small_config()
    assert cfg.user_fields == ["age", "gender", "province"]
    assert cfg.item_vocab["video_id"] == 2000 and cfg.tasks == list(TASKS)
    cfg.save_pretrained(tmp_path)
    again = FoundationConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="upload_type"):
        FoundationConfig.from_dataset_vocab({"video_id": 3, "author_id": 3, "category_level_one": 3,
                                             "category_level_two": 3}, [])
    assert issubclass(ConfigError, FedpaError)


def test_default_size_fits_budget_with_recflow_scale_vocab():
    vocab = {"video_id": 9_000_000, "author_id": 3_000_000, "category_level_one": 50, "category_level_two": 500,
             "upload_type": 10, "age": 8, "gender": 3, "province": 40}
    cfg = FoundationConfig.from_dataset_vocab(vocab, ["age", "gender", "province"])
    with torch.device("meta"):
        model = FoundationModel(cfg)
    n = count_parameters(model)
    assert 3_000_000 < n <= 10_000_000
    assert model.item_encoder.fields["video_id"].table.num_embeddings == 1 << 17


def test_hash_is_bounded_and_known_ids_are_exact():
    ids = torch.tensor([0, 5, 1999, 2000, 10**12, -3, 2**40 + 7])
    h = hash_ids(ids, 131)
    assert ((h >= 0) & (h < 131)).all()
    emb = build().item_encoder.fields["video_id"]
    rows = emb.rows(ids)
    assert rows[:3].tolist() == [0, 5, 1999]           # vocab fits: known ids map to themselves
    assert ((rows >= 0) & (rows < 2000)).all()          # unknown ids are hashed into the table


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("arch", ["transformer", "mlp"])
def test_shapes_loss_and_determinism(arch):
    m1, m2 = build(arch).eval(), build(arch).eval()
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    b = random_batch(m1.config, 16, 0)
    out = m1(**b)
    assert out.logits.shape == (16, len(m1.config.tasks))
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    assert torch.equal(out.logits, m2(**b).logits)
    assert torch.equal(m1(**{k: v for k, v in b.items() if k != "labels"}).logits, out.logits)
    assert m1(**{k: v for k, v in b.items() if k != "labels"}).loss is None


def test_scale_logits_multiplies_every_logit_and_refuses_non_positive_factors():
    m = build().eval()
    b = random_batch(m.config, 8, 2)
    before = m(**b).logits
    m.scale_logits(0.25)
    torch.testing.assert_close(m(**b).logits, 0.25 * before, rtol=1e-5, atol=1e-6)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="logit scale"):
            m.scale_logits(bad)


def test_masked_loss_ignores_unobserved_labels():
    m = build().eval()
    b = random_batch(m.config, 8, 1)
    all_masked = dict(b, labels=torch.full_like(b["labels"], -1.0))
    assert m(**all_masked).loss.item() == 0.0
    flipped = b["labels"].clone()
    flipped[:, 1:] = -1.0
    changed = flipped.clone()
    changed[:, 1:] = 1.0 - b["labels"][:, 1:].clamp(min=0)  # only the masked columns differ
    changed[:, 1:] = -1.0
    assert m(**dict(b, labels=flipped)).loss.item() == pytest.approx(m(**dict(b, labels=changed)).loss.item())


def test_distinct_history_dedup_matches_per_row_encoding():
    m = build().eval()
    b = random_batch(m.config, 6, 2)
    # the same history repeated (one request, many candidates) vs. each row alone
    rep = {k: (v[:1].expand(6, *v.shape[1:]).clone() if k in ("hist_items", "hist_mask", "user_profile", "context")
               else v) for k, v in b.items()}
    together = m(**rep).logits
    alone = torch.cat([m(**{k: v[i:i + 1] for k, v in rep.items()}).logits for i in range(6)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    mixed = m(**b).logits  # six distinct histories: torch.unique path
    m.dedupe_histories = False
    torch.testing.assert_close(m(**b).logits, mixed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(**rep).logits, together, atol=1e-5, rtol=1e-5)


def test_empty_history_is_finite():
    m = build().eval()
    b = random_batch(m.config, 4, 3)
    b["hist_mask"][:] = False
    assert torch.isfinite(m(**b).logits).all()


# ---------------------------------------------------------------- checkpoint I/O


@pytest.mark.parametrize("arch", ["transformer", "mlp"])
def test_save_load_round_trip_bit_exact(tmp_path, arch):
    m = build(arch).eval()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = load_foundation(tmp_path)
    sd1, sd2 = m.state_dict(), loaded.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    b = random_batch(m.config, 8, 4)
    assert torch.equal(m(**b).logits, loaded(**b).logits)
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_a_pinned_foundation_is_copied_until_its_files_change(tmp_path, monkeypatch):
    from fedpa.foundation import model as foundation_model

    monkeypatch.setattr(foundation_model, "_PINNED", {})
    build(seed=0).eval().save_pretrained(tmp_path / "f")
    pin_foundation(tmp_path / "f")
    reads = []
    real = FoundationModel.from_pretrained.__func__
    monkeypatch.setattr(FoundationModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: reads.append(a[0]) or real(cls, *a, **k)))
    a, b = load_foundation(tmp_path / "f"), load_foundation(str(tmp_path / "f"), frozen=False)
    assert reads == []                                   # both copies of the pinned model, no file read
    assert a is not b and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(p.requires_grad for p in a.parameters()) and all(p.requires_grad for p in b.parameters())
    with torch.no_grad():
        next(b.parameters()).add_(1.0)                   # a task that changes its copy changes nothing pinned
    assert torch.equal(next(load_foundation(tmp_path / "f").parameters()), next(a.parameters()))
    # a new version of the files (re-provisioned): read again, and its weights are the new ones
    build(seed=1).eval().save_pretrained(tmp_path / "g")
    shutil.rmtree(tmp_path / "f")
    (tmp_path / "g").rename(tmp_path / "f")
    c = load_foundation(tmp_path / "f")
    assert len(reads) == 1 and not torch.equal(next(c.parameters()), next(a.parameters()))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupted_truncated_and_mismatched_checkpoints_raise_checkpoint_error(tmp_path):
    m = build()
    good = tmp_path / "good"
    m.save_pretrained(good)

    trunc = _copy(good, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc/model\.safetensors.*truncated"):
        FoundationModel.from_pretrained(trunc)

    flipped = _copy(good, tmp_path / "flipped")
    raw = bytearray((flipped / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF  # a bit flip in the tensor data: safetensors alone would not notice
    (flipped / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"flipped/model\.safetensors.*corrupted"):
        FoundationModel.from_pretrained(flipped)

    header = _copy(good, tmp_path / "header")
    raw = bytearray((header / "model.safetensors").read_bytes())
    raw[12:40] = b"#" * 28
    (header / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"header/model\.safetensors"):
        FoundationModel.from_pretrained(header)

    mism = _copy(good, tmp_path / "mism")
    cfg = json.loads((mism / "config.json").read_text())
    cfg["user_vocab"]["age"] = 7
    (mism / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not match the config.*profile\.age\.table\.weight \[6, 8\]"):
        FoundationModel.from_pretrained(mism)

    with pytest.raises(CheckpointError, match="do not match"):
        FoundationModel.from_pretrained(good, config=small_config(d_model=64, n_heads=2))

    broken = _copy(good, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"broken/config\.json"):
        FoundationModel.from_pretrained(broken)

    with pytest.raises(CheckpointError, match="not a foundation checkpoint"):
        FoundationModel.from_pretrained(tmp_path / "nope")


# ---------------------------------------------------------------- pre-training


def _data(cfg):
    train = batch_iter(cfg, 12, 256, seed=1, n_users=48)
    val = batch_iter(cfg, 3, 256, seed=2, n_users=48)
    return train, val


def test_pretraining_beats_untrained_and_keeps_best(tmp_path):
    m = build("transformer")
    train, val = _data(m.config)
    before = evaluate(m, val)
    calls = []
    hist = pretrain(m, lambda e: train, lambda: val, tmp_path, epochs=3, lr=3e-3, seed=0,
                    progress=lambda *a: calls.append(a))
    assert len(hist["epochs"]) == 3
    best = load_foundation(tmp_path)
    after = evaluate(best, val)
    assert after["auc"] > before["auc"] + 0.05, (before, after)
    assert after["auc"] == pytest.approx(hist["best_auc"])
    assert after["gauc_users"] > 0 and math.isfinite(after["gauc"]) and after["n"] == 3 * 256
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == hist["best_epoch"]
    assert calls[0][:3] == (0, 1, 12) and "loss" in calls[0][3]
    assert any("val_auc" in c[3] for c in calls)


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    cfg_seed = 3
    m = build(seed=cfg_seed, dropout=0.1)  # dropout: the torch RNG state must be restored too
    train, val = _data(m.config)
    train = train[:5]
    full = pretrain(m, lambda e: train, lambda: val, tmp_path / "full", epochs=3, lr=3e-3, seed=7)

    def crashing(epoch):
        for i, b in enumerate(train):
            if epoch == 1 and i == 3:
                raise _Stop
            yield b

    m2 = build(seed=cfg_seed, dropout=0.1)
    with pytest.raises(_Stop):
        pretrain(m2, crashing, lambda: val, tmp_path / "resumed", epochs=3, lr=3e-3, seed=7)
    m3 = build(seed=99, dropout=0.1)  # a fresh process would rebuild the model; its init must not matter
    resumed = pretrain(m3, lambda e: train, lambda: val, tmp_path / "resumed", epochs=3, lr=3e-3, seed=7)
    for (n, a), (_, b) in zip(m.state_dict().items(), m3.state_dict().items()):
        assert torch.equal(a, b), n
    assert [e["val"]["auc"] for e in resumed["epochs"]] == [e["val"]["auc"] for e in full["epochs"]]
    assert resumed["best_epoch"] == full["best_epoch"]
    with pytest.raises(CheckpointError, match="different run"):
        pretrain(build(seed=cfg_seed, dropout=0.1), lambda e: train, lambda: val, tmp_path / "resumed", epochs=4,
                 lr=1e-3, seed=7)


# ---------------------------------------------------------------- int8


def test_int8_quantized_model_stays_close():
    m = build()
    train, val = _data(m.config)
    for b in train[:6]:  # a few steps so the model is not at init
        m.train()
        loss = m(**b).loss
        loss.backward()
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p -= 1e-2 * p.grad.sign()
                    p.grad = None
    fp32, int8 = quantize_for_inference(freeze(m))
    assert "DynamicQuantizedLinear" in repr(int8.tower)
    a32, a8 = evaluate(fp32, val)["auc"], evaluate(int8, val)["auc"]
    assert abs(a32 - a8) < 0.01


def test_pretraining_stops_after_patience_epochs_without_a_better_validation_auc(tmp_path):
    m = build("transformer")
    train, val = _data(m.config)
    # a learning rate this large overfits the tiny data at once: validation stops improving early
    hist = pretrain(m, lambda e: train, lambda: val, tmp_path, epochs=30, lr=0.05, seed=0, patience=2)
    epochs = len(hist["epochs"])
    assert epochs < 30 and epochs - 1 - hist["best_epoch"] == 2
    assert all(e["val"]["auc"] <= hist["best_auc"] for e in hist["epochs"])
