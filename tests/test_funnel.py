"""The funnel end to end: request pools from stage samples, the four stages, metrics, `fedpa funnel`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(scope="module")
def pools(tiny):
    from fedpa.recdata.examples import Lookups
    from fedpa.recdata.funnel import load_request_pools
    from fedpa.recdata.partition import read_exposures, read_views
    from fedpa.recdata.store import Dataset

    ds = Dataset(tiny)
    lookups = Lookups.build(ds)
    users = ds.users(["user_id"]).column("user_id").to_numpy()
    views = read_views(ds, users, read_exposures(ds, users))
    return ds, lookups, views, load_request_pools(ds, [ds.days[-1]], views=views, lookups=lookups, n_random=30)


def test_request_pools_hold_exposures_stage_samples_and_random_items(pools):
    from fedpa.recdata.schema import LEVEL_CLICK, LEVEL_RANDOM, LEVEL_REALSHOW, STAGE_LEVEL, STAGES

    ds, _, _, p = pools
    day = ds.days[-1]
    exp = ds.day("exposures", day)
    st = ds.day("stage_samples", day)
    assert len(p) == len(np.unique(exp.column("request_id").to_numpy()))
    r = 0
    rid = p.request_id[r]
    sl = p.pool(r)
    vid, level, labels = p.video_id[sl], p.level[sl], p.labels[sl]
    assert len(np.unique(vid)) == len(vid)  # a pool is a set
    e = exp.filter(exp.column("request_id").to_numpy() == rid)
    s = st.filter(st.column("request_id").to_numpy() == rid)
    for v, ev in zip(e.column("video_id").to_numpy(), e.column("effective_view").to_numpy()):
        j = int(np.nonzero(vid == v)[0][0])
        assert level[j] == (LEVEL_CLICK if ev == 1 else LEVEL_REALSHOW) and labels[j, 0] == ev
    exposed = set(e.column("video_id").to_numpy().tolist())
    for v, code in zip(s.column("video_id").to_numpy(), s.column("stage").to_numpy()):
        j = int(np.nonzero(vid == v)[0][0])
        if v not in exposed:  # the highest level wins
            assert level[j] >= STAGE_LEVEL[STAGES[code]] and (labels[j] == -1).all()
    assert (level == LEVEL_RANDOM).sum() > 0 and (labels[level == LEVEL_RANDOM] == -1).all()
    assert p.requests.user_id[r] == e.column("user_id").to_numpy()[0]


def test_random_items_depend_only_on_seed_and_request(pools):
    from fedpa.recdata.funnel import load_request_pools
    from fedpa.recdata.schema import LEVEL_RANDOM

    ds, lookups, views, p = pools
    again = load_request_pools(ds, [ds.days[-1]], views=views, lookups=lookups, n_random=30, max_requests=3)
    other = load_request_pools(ds, [ds.days[-1]], views=views, lookups=lookups, n_random=30, max_requests=3, seed=1)
    for r in range(3):
        a = p.video_id[p.pool(r)][p.level[p.pool(r)] == LEVEL_RANDOM]
        b = again.video_id[again.pool(r)][again.level[again.pool(r)] == LEVEL_RANDOM]
        c = other.video_id[other.pool(r)][other.level[other.pool(r)] == LEVEL_RANDOM]
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_each_stage_keeps_a_subset_of_the_previous_one(pools, tiny_foundation):
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.stages.features import StageEncoder
    from fedpa.recmodels.stages.funnel import FunnelSizes, run_funnel
    from fedpa.simulations.funnel import FunnelConfig, build_models, request_tensors

    _, lookups, _, p = pools
    data = request_tensors(p.subset(np.arange(16)), lookups)
    encoder = StageEncoder(load_foundation(tiny_foundation))
    sizes = FunnelSizes(retrieval=20, prerank=10, rank=5, exposed=3)
    for rerank in ("cdm", "mmr"):
        models = build_models(encoder, FunnelConfig(rerank=rerank))
        out = run_funnel(models, encoder, data.requests, data.items, data.mask, sizes)
        prev = None
        for stage, size in zip(("retrieval", "prerank", "rank", "exposed"), (20, 10, 5, 3)):
            kept = out.kept[stage]
            assert kept.shape == (16, size)
            for r in range(16):
                real = kept[r][kept[r] >= 0].tolist()
                assert len(real) == min(size, int(data.mask[r].sum())) and len(set(real)) == len(real)
                assert all(bool(data.mask[r, i]) for i in real)
                if prev is not None:
                    assert set(real) <= set(prev[r][prev[r] >= 0].tolist())
            prev = kept
        assert out.rank_logits.shape == (16, 5, 6) and torch.isfinite(out.rank_logits).all()


def test_funnel_experiment_writes_every_metric(tiny, tiny_foundation, tmp_path):
    from fedpa.simulations.funnel import FunnelConfig, run_funnel_experiment

    cfg = FunnelConfig(data_dir=str(tiny), foundation=str(tiny_foundation), out_dir=str(tmp_path / "f"),
                       train_requests=300, test_requests=120, epochs=1, random_per_request=40,
                       retrieval_size=40, prerank_size=20, rank_size=8, exposed=4)
    steps = []
    m = run_funnel_experiment(cfg, progress=lambda step, done, total: steps.append(step))
    assert steps[0] == "data" and steps[-1] == "done" and "rerank" in steps
    written = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert written["retrieval"]["recall@40"] == pytest.approx(m["retrieval"]["recall@40"])
    recalls = [m[s][f"recall@{k}"] for s, k in (("retrieval", 40), ("prerank", 20), ("rank", 8), ("exposed", 4))]
    assert all(0 <= r <= 1 for r in recalls)
    assert recalls == sorted(recalls, reverse=True)  # a later stage cannot find what an earlier one dropped
    assert 0 <= m["end_to_end"]["effective_view_rate"] <= 1 and "oracle_utility" in m["end_to_end"]
    assert 0 < m["rerank"]["intra_list_distance"] <= 2 and 0 < m["rerank"]["category_coverage"] <= 1
    assert 0 <= m["ranking_tasks"]["effective_view"]["auc"] <= 1
    assert all(np.isfinite(v["loss"]).all() for v in m["training"].values())
    assert (tmp_path / "f" / "funnel.png").stat().st_size > 0

    # the saved heads reproduce the run's funnel exactly, and a damaged file is named
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.stages.features import StageEncoder
    from fedpa.simulations.funnel import evaluate_funnel, load_funnel_data, load_stage_models, request_tensors

    encoder = StageEncoder(load_foundation(tiny_foundation))
    models = load_stage_models(encoder, cfg, tmp_path / "f" / "models")
    ds, lookups, _, test_pools = load_funnel_data(cfg)
    again = evaluate_funnel(models, encoder, request_tensors(test_pools, lookups), test_pools, ds, cfg)
    assert again["exposed"]["recall@4"] == m["exposed"]["recall@4"]
    assert again["ranking_tasks"]["effective_view"]["auc"] == pytest.approx(m["ranking_tasks"]["effective_view"]["auc"])
    (tmp_path / "f" / "models" / "rank.safetensors").write_bytes(b"not a safetensors file")
    from fedpa.foundation.errors import FedpaError

    with pytest.raises(FedpaError, match="rank.safetensors: cannot load the rank head"):
        load_stage_models(encoder, cfg, tmp_path / "f" / "models")


def test_funnel_cli_rejects_bad_input(tiny, tiny_foundation, tmp_path):
    from fedpa.simulations.cli import app

    res = runner.invoke(app, ["funnel", "--data", str(tiny), "--foundation", str(tiny_foundation),
                              "--out", str(tmp_path / "x"), "--rerank", "greedy"])
    assert res.exit_code == 2 and "unknown re-ranker 'greedy'" in res.output, res.output
    res = runner.invoke(app, ["funnel", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no such dataset directory" in res.output
    res = runner.invoke(app, ["funnel", "--epochs", "0"])
    assert res.exit_code == 2 and "--epochs must be >= 1" in res.output
    assert not (tmp_path / "x").exists()


def test_funnel_names_a_foundation_or_dataset_it_cannot_use(tiny, tiny_foundation, tmp_path):
    from fedpa.recdata.synth import generate
    from fedpa.simulations.cli import app
    from fedpa.simulations.pretraining import pretrain_foundation

    mlp = tmp_path / "mlp"
    pretrain_foundation(tiny, mlp, arch="mlp", epochs=1, batch_size=1024, max_private_eval_users=20)
    res = runner.invoke(app, ["funnel", "--data", str(tiny), "--foundation", str(mlp), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "transformer foundation" in res.output and "Traceback" not in res.output
    one_day = generate("tiny", tmp_path / "one-day", seed=0, days=1)
    res = runner.invoke(app, ["funnel", "--data", str(one_day), "--foundation", str(tiny_foundation),
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "at least 2 days" in res.output, res.output


def test_sampled_requests_are_the_only_ones_read(pools):
    from fedpa.recdata.funnel import load_request_pools, sample_requests

    ds, lookups, views, p = pools
    ids = sample_requests(ds, [ds.days[-1]], 7, seed=3)
    assert ids is not None and len(ids) == 7
    got = load_request_pools(ds, [ds.days[-1]], views=views, lookups=lookups, n_random=5, request_ids=ids)
    assert set(got.request_id.tolist()) <= set(ids.tolist()) and len(got) >= 1
    assert sample_requests(ds, [ds.days[-1]], 10 ** 9, seed=3) is None  # fewer requests than asked: all


def test_kept_positions_become_scores_in_order():
    from fedpa.simulations.funnel import kept_scores

    s = kept_scores(torch.tensor([[2, 0, -1, -1], [1, -1, -1, -1]]), (2, 3))
    inf = float("-inf")
    assert s.tolist() == [[3.0, inf, 4.0], [inf, 4.0, inf]]  # a short list's padding never hides position 0


def test_a_stage_larger_than_the_pool_keeps_every_view(pools, tiny_foundation):
    """Stage sizes above the pool size: every stage keeps the whole pool, so every recall is exactly 1."""
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.stages.features import StageEncoder
    from fedpa.simulations.funnel import FunnelConfig, build_models, evaluate_funnel, request_tensors

    ds, lookups, _, p = pools
    sub = p.subset(np.arange(24))
    cfg = FunnelConfig(retrieval_size=400, prerank_size=300, rank_size=200, exposed=150)
    encoder = StageEncoder(load_foundation(tiny_foundation))
    m = evaluate_funnel(build_models(encoder, cfg), encoder, request_tensors(sub, lookups), sub, ds, cfg)
    assert m["requests_with_views"] > 0
    for stage, k in (("retrieval", 400), ("prerank", 300), ("rank", 200), ("exposed", 150)):
        assert m[stage][f"recall@{k}"] == 1.0, stage


def test_dimerec_retrieval_on_the_validation_day_runs_saves_and_reloads(tiny, tiny_foundation, tmp_path):
    from fedpa.foundation.model import load_foundation
    from fedpa.recdata.store import Dataset
    from fedpa.recmodels.stages.dimerec import DimeRecRetrieval
    from fedpa.recmodels.stages.features import StageEncoder
    from fedpa.simulations.cli import app
    from fedpa.simulations.funnel import (
        FunnelConfig,
        evaluate_funnel,
        load_funnel_data,
        load_stage_models,
        request_tensors,
    )

    out = tmp_path / "d"
    res = runner.invoke(app, ["funnel", "--data", str(tiny), "--foundation", str(tiny_foundation), "--out", str(out),
                              "--retrieval", "dimerec", "--validation", "--train-requests", "200",
                              "--test-requests", "80", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "funnel on the validation day" in res.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["retrieval"] == "dimerec" and saved["interests"] == 4 and saved["validation"] is True
    m = json.loads((out / "metrics.json").read_text())
    cfg = FunnelConfig(**saved)
    ds, lookups, train_pools, test_pools = load_funnel_data(cfg)
    # validation: evaluated on the last training day, trained on the days before it; the test day unread
    days_of = {d: set(Dataset(tiny).day("requests", d, ["request_id"]).column("request_id").to_pylist())
               for d in ds.days}
    assert set(test_pools.request_id.tolist()) <= days_of[ds.days[-2]]
    assert not set(train_pools.request_id.tolist()) & (days_of[ds.days[-2]] | days_of[ds.days[-1]])
    encoder = StageEncoder(load_foundation(tiny_foundation))
    models = load_stage_models(encoder, cfg, out / "models")
    assert isinstance(models.retrieval, DimeRecRetrieval)
    again = evaluate_funnel(models, encoder, request_tensors(test_pools, lookups), test_pools, ds, cfg)
    assert again["retrieval"]["ndcg@72"] == pytest.approx(m["retrieval"]["ndcg@72"], abs=1e-9)

    res = runner.invoke(app, ["funnel", "--data", str(tiny), "--foundation", str(tiny_foundation),
                              "--out", str(tmp_path / "x"), "--retrieval", "dimerec", "--interests", "1"])
    assert res.exit_code == 2 and "interests must be >= 2" in res.output, res.output
    res = runner.invoke(app, ["funnel", "--data", str(tiny), "--foundation", str(tiny_foundation),
                              "--out", str(tmp_path / "x"), "--retrieval", "bm25"])
    assert res.exit_code == 2 and "unknown retrieval head 'bm25'" in res.output, res.output
    assert not (tmp_path / "x").exists()
