"""Shared item-side logit offsets (`recmodels.item_bias`, FedPA option ``item-bias-fields``): the rows
they read, what one user's training moves, what the run configuration refuses. The per-row
aggregation is tested in test_aggregation.py, the cohort engine's equality in test_cohort.py and a
Flower round in test_federation.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fed_fixtures import fed_config

FIELDS = "category_level_one,upload_type,video_id"


def _runtime(tiny, tiny_foundation, tmp_path, **kw):
    from client.runtime import ClientRuntime

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=8, feature_cache="none",
                     item_bias_fields=FIELDS, **kw)
    return ClientRuntime(cfg)


def test_tables_read_the_rows_the_foundations_embeddings_read(tiny_foundation):
    from foundation.batch import ITEM_FIELDS
    from foundation.model import load_foundation
    from recmodels.item_bias import ItemBias

    foundation = load_foundation(str(tiny_foundation))
    bias = ItemBias(foundation.config, FIELDS.split(","), 2)
    assert all(float(t.detach().abs().sum()) == 0 for t in bias.tables.values())  # exact foundation at init
    rng = np.random.default_rng(0)
    items = torch.as_tensor(rng.integers(-5, 10**7, size=(64, len(ITEM_FIELDS))))  # in range, negative, huge
    for f, rows in zip(bias.fields, bias.rows(items)):
        torch.testing.assert_close(rows, foundation.item_encoder.fields[f].rows(items[:, ITEM_FIELDS.index(f)]))
    with torch.no_grad():
        for t in bias.tables.values():
            t.normal_()
    want = sum(bias.tables[f][r] for f, r in zip(bias.fields, bias.rows(items)))
    torch.testing.assert_close(bias(items), want)
    read = bias.touched_rows(items[:3])
    for f, r in zip(bias.fields, bias.rows(items[:3])):
        assert set(np.nonzero(read[f"item_bias.{f}"])[0]) == set(r.tolist())


def test_one_users_training_moves_only_the_rows_its_items_read(tiny, tiny_foundation, tmp_path):
    rt = _runtime(tiny, tiny_foundation, tmp_path, use_user_bias=True)
    pm = rt.model
    spec = {n: g for n, _, g in pm.shared_spec()}
    assert {spec[f"item_bias.{f}"] for f in FIELDS.split(",")} == {"per-row"}
    data = next(rt.user(c) for c in range(rt.num_clients) if len(rt.user(c).train) > 10)
    assert data.train.items is not None and data.train.items.shape == (len(data.train), 6)
    start = pm.get_shared()
    pm.set_private(None)
    pm.train_user(data.train, data.profile, rt.local, seed=0)
    after = pm.get_shared()
    for key, read in pm.touched_rows(data.train).items():
        moved = np.abs(after[key] - start[key]).max(axis=1) > 0
        assert moved[read > 0].any() and not moved[read == 0].any(), key


def test_a_faster_table_learning_rate_moves_the_tables_further(tiny, tiny_foundation, tmp_path):
    from dataclasses import replace

    rt = _runtime(tiny, tiny_foundation, tmp_path)
    pm = rt.model
    data = next(rt.user(c) for c in range(rt.num_clients) if len(rt.user(c).train) > 10)
    start = pm.get_shared()
    steps = {}
    for lr in (None, 0.1):
        pm.set_shared(start)
        pm.set_private(None)
        pm.train_user(data.train, data.profile, replace(rt.local, item_bias_lr=lr), seed=0)
        after = pm.get_shared()
        steps[lr] = {k: float(np.abs(after[k] - start[k]).max()) for k in after}
    assert steps[0.1]["item_bias.upload_type"] > 5 * steps[None]["item_bias.upload_type"]
    others = [k for k in start if not k.startswith("item_bias.")]
    assert all(steps[0.1][k] == pytest.approx(steps[None][k], rel=0.5) for k in others)  # the rest: its own lr


@pytest.mark.parametrize("change, words", [
    (dict(item_bias_fields="duration"), "categorical item fields"),
    (dict(item_bias_fields="genre"), "categorical item fields"),
    (dict(item_bias_fields="upload_type", algorithm="fedper"), "a FedPA option"),
    (dict(item_bias_fields="upload_type", dp_noise_multiplier=1.0), "differential privacy"),
    (dict(item_bias_fields="upload_type", robust_aggregation="median"), "robust aggregation"),
    (dict(item_bias_fields="upload_type", stage="rank", stage_models="x"), "funnel stage"),
    (dict(item_bias_lr=-1.0), "item-bias-lr"),
])
def test_the_configuration_refuses_what_the_tables_cannot_do(change, words):
    from server.config import ConfigValueError, FederationConfig

    with pytest.raises(ConfigValueError, match=words):
        FederationConfig(**change).validate()


def test_export_and_the_update_attack_refuse_runs_with_tables(tiny, tiny_foundation, tmp_path):
    from foundation.errors import FedpaError
    from simulations.export_user import export_user
    from simulations.update_attack import run_update_attack

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", item_bias_fields="upload_type", feature_cache="none")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_run_config()))
    with pytest.raises(FedpaError, match="item-side offsets"):
        export_user(tmp_path / "run", 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="item-bias-fields"):
        run_update_attack(cfg, {})
