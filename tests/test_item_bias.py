"""Shared item-side logit offsets (`recmodels.item_bias`, FedPA option ``item-bias-fields``): the rows
they read, what one user's training moves, what the run configuration refuses. The per-row
aggregation is tested in test_aggregation.py, the cohort engine's equality in test_cohort.py and a
Flower round in test_federation.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fed_fixtures import fed_config

FIELDS = "category_level_one,upload_type,video_id"


def _runtime(tiny, tiny_foundation, tmp_path, **kw):
    from fedpa.client.runtime import ClientRuntime

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=8, feature_cache="none",
                     item_bias_fields=FIELDS, **kw)
    return ClientRuntime(cfg)


def test_tables_read_the_rows_the_foundations_embeddings_read(tiny_foundation):
    from fedpa.foundation.batch import ITEM_FIELDS
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.item_bias import ItemBias

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
    (dict(item_bias_fields="upload_type", dp_noise_multiplier=1.0, dp_mode="local"), "local DP"),
    (dict(item_bias_fields="upload_type", robust_aggregation="median"), "robust aggregation"),
    (dict(item_bias_fields="upload_type", stage="rank", stage_models="x"), "funnel stage"),
    (dict(item_bias_lr=-1.0), "item-bias-lr"),
    (dict(item_bias_prior=-0.5), "item-bias-prior"),
    (dict(item_bias_prior=float("nan")), "item-bias-prior"),
    (dict(foundation_logit_scale=0.0), "foundation-logit-scale"),
    (dict(foundation_logit_scale=float("inf")), "foundation-logit-scale"),
    (dict(foundation_logit_scale=0.5, stage="rank", stage_models="x"), "its own head"),
    (dict(item_bias_update="newton"), "set item-bias-fields"),
    (dict(item_bias_update="newton", item_bias_fields="video_id", dp_noise_multiplier=1.0), "under DP"),
    (dict(item_bias_update="sgd", item_bias_fields="video_id"), "unknown item-bias-update"),
])
def test_the_configuration_refuses_what_the_tables_cannot_do(change, words):
    from fedpa.common.config import ConfigValueError, FederationConfig

    with pytest.raises(ConfigValueError, match=words):
        FederationConfig(**change).validate()


def test_the_other_algorithms_ignore_the_fedpa_option():
    """As with FedPA's other options: a compare run's shared configuration serves every baseline."""
    from fedpa.common.config import FederationConfig
    from fedpa.common.models import model_options

    for algorithm in ("fedper", "ditto", "centralized"):
        cfg = FederationConfig(algorithm=algorithm, item_bias_fields="upload_type", dp_noise_multiplier=1.0,
                               dp_mode="local")
        cfg.validate()
        assert "item_bias_fields" not in model_options(cfg)
    assert model_options(FederationConfig(item_bias_fields="upload_type"))["item_bias_fields"] == ("upload_type",)
    assert FederationConfig(lr=0.01, lr_decay=0.5, item_bias_lr=0.3).round_item_bias_lr(3) == pytest.approx(0.075)
    # the embeddings' own step does not decay; unset, they follow the tables' step
    cfg = FederationConfig(lr=0.01, lr_decay=0.5, item_bias_lr=0.3, item_embedding_lr=0.03)
    assert cfg.round_embedding_lr(1) == cfg.round_embedding_lr(7) == 0.03
    assert FederationConfig().round_embedding_lr(3) is None


def test_the_update_attack_refuses_runs_with_tables(tiny, tiny_foundation, tmp_path):
    from fedpa.simulations.update_attack import run_update_attack

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", item_bias_fields="upload_type", feature_cache="none")
    with pytest.raises(ValueError, match="item-bias-fields"):
        run_update_attack(cfg, {})


def test_a_dp_run_trains_the_tables_and_its_export_carries_them(tiny, tiny_foundation, tmp_path):
    """A central-DP run with item-side tables (per-row weights 1/sqrt(rows read), their unit-norm counts
    covered by the sensitivity; tested in test_cohort.py) completes with ε reported and the tables
    learned; `fedpa export` of it: the ONNX model equals the user's PyTorch scorer (cached-row path:
    tower + tables), and the tables change its scores. With item embeddings (bounded to 512 hashed rows)
    and each user's private vector beside them, and the click tally scored through its steps."""
    from fedpa.client.personal_store import generate_key_file
    from fedpa.client.runtime import ClientRuntime
    from fedpa.foundation.export import onnx_probabilities
    from fedpa.server.rundir import RunDir
    from fedpa.simulations.export_user import export_user, user_batches
    from fedpa.simulations.simulate import simulate

    key = generate_key_file(tmp_path / "store.key")
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", num_rounds=1, max_clients=8, use_user_bias=True,
                     item_bias_fields="category_level_one,upload_type", item_bias_lr=0.3,
                     item_embedding_dim=4, item_rows=512, item_popularity=True, item_popularity_steps=True,
                     foundation_logit_scale=0.5,  # the export must carry the scaled head too
                     # small noise: at z = 0.5 the noise on the 8 users' shared head alone can saturate a
                     # user's scores at p = 1, where no comparison of probabilities can see the tables
                     dp_noise_multiplier=0.05, dp_clip=1.0,
                     personal_store=str(tmp_path / "store"), personal_store_key_file=str(key))
    summary = simulate(cfg, cohort_size=4)
    assert summary["differential_privacy"]["epsilon"] > 0
    rt = ClientRuntime(cfg)
    user = int(rt.partition.user_of(0))
    report = export_user(cfg.run_dir, user, tmp_path / "out", int8=False)
    assert report["fp32"]["max_abs_diff_vs_torch"] <= 1e-4
    # the exported model scores the user's test rows as the federation's own scorer does
    pm = rt.model
    _, shared, _ = RunDir(cfg.run_dir).load_checkpoint()
    for entry in ("item_bias.category_level_one", "item_bias.upload_type"):
        assert np.all(np.isfinite(shared[entry])) and float(np.abs(shared[entry]).max()) > 1e-2
    assert shared["item_bias.embedding"].shape == (512, 4)
    assert shared["item_bias.popularity"].shape == (9, len(pm.task_columns))       # the log weight and 8 steps
    assert float(np.abs(shared["item_bias.popularity"][1:]).max()) > 0             # the steps learned too
    assert np.abs(shared["item_bias.embedding"] - pm.get_shared()["item_bias.embedding"]).max() > 1e-3
    pm.set_shared(shared)
    from fedpa.client.personal_store import PersonalStore

    private = PersonalStore.from_key_file(cfg.personal_store, key).load(user)[0]
    assert np.abs(private["item_bias.user"]).max() > 1e-3      # the user's own vector moved, and stayed home
    pm.set_private(private)
    data = rt.user(0)
    test, _, _ = user_batches(cfg, user)
    got = onnx_probabilities(tmp_path / "out" / "model.onnx", test)
    want = pm.predict(data.test, data.profile)
    assert got.shape[0] == len(want) and np.abs(got[:, 0] - want).max() < 1e-4
    without = {k: v for k, v in shared.items()}
    for k in without:
        if k.startswith("item_bias."):
            without[k] = np.zeros_like(without[k])
    pm.set_shared(without)
    assert np.abs(pm.predict(data.test, data.profile) - want).max() > 1e-3  # the tables matter



@pytest.mark.parametrize("algorithm", ["fedpa", "foundation"])
def test_foundation_logit_scale_multiplies_the_frozen_logits_every_client_starts_from(tiny, tiny_foundation, tmp_path,
                                                                                     algorithm):
    from fedpa.client.runtime import ClientRuntime

    def start_scores(scale):
        rt = ClientRuntime(fed_config(tiny, tiny_foundation, tmp_path / f"run{scale}", algorithm=algorithm,
                                      max_clients=4,
                                      feature_cache="none", foundation_logit_scale=scale))
        data = rt.user(1)
        return rt.model.predict(data.test, data.profile).astype(np.float64)

    plain, scaled = start_scores(1.0), start_scores(0.3)
    logit = np.log(plain / (1 - plain))
    np.testing.assert_allclose(scaled, 1 / (1 + np.exp(-0.3 * logit)), atol=2e-5)
    assert np.abs(scaled - plain).max() > 1e-2


def test_newton_steps_on_several_tables_at_once_descend_and_do_not_overshoot(tiny_foundation):
    """item-bias-update newton with several tables: every table steps at once on the same residuals, so each
    table's curvature is divided by its share of the joint step (`newton_step_shares`: the video id half, the
    others the rest): the penalized loss then falls every round. With each table taking a whole step (the
    single-table rule) the joint step overshoots and the loss rises."""
    from fedpa.common.aggregation import SharedTensor, apply_sums
    from fedpa.foundation.batch import ITEM_FIELDS
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.item_bias import PREFIX, ItemBias, newton_row_statistics, newton_step_shares

    foundation = load_foundation(str(tiny_foundation))
    bias = ItemBias(foundation.config, FIELDS.split(","), 1)
    rng = np.random.default_rng(0)
    items = torch.as_tensor(rng.integers(0, 6, size=(400, len(ITEM_FIELDS))))   # few values: rows shared
    labels = torch.as_tensor((rng.random((400, 1)) < 0.9).astype(np.float32))   # far from the 0.5 start
    tables = {PREFIX + f: bias.tables[f] for f in bias.fields}
    spec = [SharedTensor(n, tuple(t.shape), "per-row") for n, t in tables.items()]
    prior = 1.0

    def loss() -> float:
        with torch.no_grad():
            z = bias(items).double()
            nll = torch.nn.functional.binary_cross_entropy_with_logits(z, labels.double(), reduction="sum")
            return float(nll) + 0.5 * prior * sum(float((t.double() ** 2).sum()) for t in tables.values())

    shares = newton_step_shares(bias.fields)
    assert shares == {"category_level_one": 0.25, "upload_type": 0.25, "video_id": 0.5}

    def run(whole_steps: bool) -> list[float]:
        with torch.no_grad():
            for t in tables.values():
                t.zero_()
        out = [loss()]
        for _ in range(6):
            with torch.no_grad():
                stats = newton_row_statistics(bias, bias(items), labels, items)
            state = {n: t.detach().numpy().copy() for n, t in tables.items()}
            sums = {}
            for n, (rows, g, h) in stats.items():
                sums[n] = np.zeros(state[n].shape)
                sums[n][rows] = g
                key = next(t.count_key for t in spec if t.name == n)
                sums[key] = np.zeros(len(state[n]))
                sums[key][rows] = h * (shares[n[len(PREFIX):]] if whole_steps else 1.0)
            new = apply_sums(state, sums, spec, row_prior=prior, newton=True)
            with torch.no_grad():
                for n, t in tables.items():
                    t.copy_(torch.from_numpy(new[n]))
            out.append(loss())
        return out

    bounded = run(False)
    assert all(b < a for a, b in zip(bounded, bounded[1:])), bounded
    assert bounded[-1] < 0.8 * bounded[0]
    once = run(True)
    assert any(b > a for a, b in zip(once, once[1:])), once


def test_several_users_newton_statistics_are_each_users_own(tiny_foundation):
    """`users_newton_row_statistics` over several users' rows concatenated (the cohort engine's one pass) gives each
    user exactly what `newton_row_statistics` gives for its rows alone: the same rows, and the same sums, in the
    same order of addition (bitwise), a user without rows included."""
    from fedpa.foundation.batch import ITEM_FIELDS
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.item_bias import ItemBias, newton_row_statistics, users_newton_row_statistics

    foundation = load_foundation(str(tiny_foundation))
    bias = ItemBias(foundation.config, FIELDS.split(","), 2)
    rng = np.random.default_rng(1)
    sizes = [30, 0, 7, 55]
    items = [torch.as_tensor(rng.integers(0, 40, size=(n, len(ITEM_FIELDS)))) for n in sizes]
    logits = [torch.as_tensor(rng.normal(size=(n, 2))) for n in sizes]
    labels = [torch.as_tensor(rng.choice([-1.0, 0.0, 1.0], size=(n, 2))) for n in sizes]
    owner = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(sizes)])
    together = users_newton_row_statistics(bias, torch.cat(logits), torch.cat(labels), bias.rows(torch.cat(items)),
                                           owner, len(sizes))
    for k, n in enumerate(sizes):
        alone = newton_row_statistics(bias, logits[k], labels[k], items[k]) if n else None
        for name, (rows, g, h) in together.items():
            if alone is None:
                assert len(rows[k]) == 0 and g[k].shape == (0, 2) and h[k].shape == (0,)
                continue
            assert np.array_equal(rows[k], alone[name][0])
            assert np.array_equal(g[k], alone[name][1]) and np.array_equal(h[k], alone[name][2])
            assert len(rows[k]) > 1
