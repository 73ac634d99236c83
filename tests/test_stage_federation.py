"""Federated personalization of the funnel's stage heads (recmodels/stages/pointwise.py,
recdata/stage_rows.py, simulations/stage_federation.py, `fedpa simulate --stages`)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from fed_fixtures import fed_config

STAGES = ("retrieval", "prerank", "rank")


# ----------------------------------------------------------------------------- scorers over the pair vector


@pytest.fixture(scope="module")
def pair_setup():
    from fedpa.foundation.model import FoundationModel
    from fedpa.foundation.testing import random_batch, small_config
    from fedpa.recmodels.stages.features import StageEncoder

    torch.manual_seed(0)
    cfg = small_config()
    foundation = FoundationModel(cfg).eval()
    batch = random_batch(cfg, 48, seed=3)
    encoder = StageEncoder(foundation)
    return cfg, foundation, batch, encoder, encoder.pairs(batch)


def _host(stage, cfg, head):
    from fedpa.recmodels.stages.pointwise import SCORERS, PairLayout, StageHost

    return StageHost(stage, SCORERS[stage](head, PairLayout(cfg)).eval(), cfg)


def test_pair_layout_recovers_what_the_stages_read(pair_setup):
    from fedpa.recmodels.stages.pointwise import PairLayout

    cfg, _, batch, encoder, pair = pair_setup
    layout = PairLayout(cfg)
    user, _, _ = encoder.users(batch)
    assert pair.shape[1] == layout.width
    torch.testing.assert_close(layout.user(pair), user)
    torch.testing.assert_close(layout.item(pair), encoder.items(batch["item"]))


@pytest.mark.parametrize("stage", STAGES)
def test_scorers_score_a_row_like_the_funnel_does(pair_setup, stage):
    from fedpa.recmodels.stages.pointwise import build_stage_head

    cfg, _, batch, encoder, pair = pair_setup
    torch.manual_seed(1)
    head = build_stage_head(stage, cfg).eval()
    logits = _host(stage, cfg, head)(pair)
    user, _, _ = encoder.users(batch)
    item = encoder.items(batch["item"])
    with torch.no_grad():
        if stage == "retrieval":  # run_funnel: user vectors . item vectors, over the temperature
            want = (head.user_vectors(user)[:, 0] * head.item_vectors(item)).sum(-1) / head.temperature
        elif stage == "prerank":
            want = head(user, item)
        else:
            want = head(pair)[:, 0]
    torch.testing.assert_close(logits[:, 0], want)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("algorithm", ["fedpa", "local", "fedavg-lora", "fedper", "ditto"])
def test_adapters_start_at_the_trained_head_and_personalize_it_in_place(pair_setup, stage, algorithm):
    from fedpa.recmodels.personalization import LocalTraining, PersonalModel, UserTensors, get_algorithm
    from fedpa.recmodels.stages.pointwise import build_stage_head

    cfg, foundation, batch, _, pair = pair_setup
    torch.manual_seed(2)
    head = build_stage_head(stage, cfg).eval()
    host = _host(stage, cfg, head)
    before = torch.sigmoid(host(pair)[:, 0]).detach().numpy()
    pm = PersonalModel(foundation, get_algorithm(algorithm), host=host)
    profile = batch["user_profile"][0].numpy()
    data = UserTensors(pair, batch["labels"])
    np.testing.assert_allclose(pm.predict(data, profile), before, atol=1e-6)  # B = 0, head = identity map
    shared_before = pm.get_shared()
    pm.train_user(data, profile, LocalTraining(epochs=2, lr=0.01, batch_size=16), seed=0)
    after = pm.predict(data, profile)
    assert np.abs(after - before).max() > 1e-3
    # the head object itself is adapted (peft replaced its layers): it is what the funnel calls
    assert host.stage_head is head and any("FedPALinear" in type(m).__name__ for m in head.modules())
    # only adapters and the small head train; the trained head's own weights are frozen
    assert not any(p.requires_grad for n, p in head.named_parameters() if "lora_" not in n)
    if pm.algorithm.communicates:
        moved = [k for k in shared_before if not np.array_equal(shared_before[k], pm.get_shared()[k])]
        assert moved
    if algorithm in ("fedpa", "local", "ditto"):
        assert pm.get_private()  # a private user path
    assert not set(pm.get_private()) & set(pm.get_shared())


def test_a_multi_interest_retrieval_head_is_refused(pair_setup):
    from fedpa.foundation.errors import FedpaError
    from fedpa.recmodels.stages.pointwise import PairLayout, RetrievalScorer, build_stage_head

    cfg = pair_setup[0]
    with pytest.raises(FedpaError, match="multi-interest"):
        RetrievalScorer(build_stage_head("retrieval", cfg, interests=3), PairLayout(cfg))


# ----------------------------------------------------------------------------- stage negatives


@pytest.fixture(scope="module")
def tiny_splits(tiny):
    from fedpa.client.runtime import partition_config
    from fedpa.common.config import FederationConfig
    from fedpa.recdata.examples import Lookups
    from fedpa.recdata.partition import make_partition
    from fedpa.recdata.store import Dataset

    ds = Dataset(tiny)
    lookups = Lookups.build(ds)
    users = make_partition(ds, partition_config(FederationConfig(data_dir=str(tiny), max_clients=30))).private_users
    return ds, lookups, users


@pytest.mark.parametrize("stage", STAGES)
def test_stage_negatives_come_from_the_stage_and_keep_the_exposures(tiny_splits, stage):
    from fedpa.recdata.funnel import load_request_pools
    from fedpa.recdata.partition import SplitConfig, split_users
    from fedpa.recdata.stage_rows import NEGATIVE_LEVELS, with_stage_negatives

    ds, lookups, users = tiny_splits
    base = split_users(ds, users, SplitConfig("by-day"), lookups=lookups)
    k = 3
    aug = with_stage_negatives(ds, base, users, stage, k, seed=5, lookups=lookups)
    again = with_stage_negatives(ds, base, users, stage, k, seed=5, lookups=lookups)
    for name in ("train", "val", "test"):
        b, a = getattr(base, name), getattr(aug, name)
        assert np.array_equal(a.video_id, getattr(again, name).video_id)  # deterministic
        assert (np.diff(a.user_id) >= 0).all()  # still grouped by user, as the feature cache needs
        exposed = (a.labels >= 0).sum(axis=1) > 1
        assert exposed.sum() == len(b)  # every exposure kept, labels as logged
        neg = ~exposed
        assert neg.any()
        assert (a.labels[neg, 0] == 0).all() and (a.labels[neg, 1:] == -1).all()
        per_request = np.unique(a.request_id[neg], return_counts=True)[1]
        assert per_request.max() <= k
        # each negative is in its request's pool at one of the stage's levels
        days = sorted({d for d in ds.days})
        pools = load_request_pools(ds, days, views=b.views, lookups=lookups, n_random=k, seed=5, users=users,
                                   request_ids=np.unique(a.request_id[neg][:50]))
        level_of = {(int(pools.request_id[r]), int(v)): int(lv) for r in range(len(pools))
                    for v, lv in zip(pools.video_id[pools.pool(r)], pools.level[pools.pool(r)])}
        for rid, vid in zip(a.request_id[neg][:50], a.video_id[neg][:50]):
            assert level_of[(int(rid), int(vid))] in NEGATIVE_LEVELS[stage]


# ----------------------------------------------------------------------------- configuration and inputs


def test_bad_stage_configurations_are_named(tiny, tiny_foundation, tmp_path):
    from fedpa.foundation.errors import FedpaError
    from fedpa.simulations.stage_federation import funnel_config, parse_stages

    assert parse_stages("all") == list(STAGES)
    assert parse_stages("rank, retrieval") == ["retrieval", "rank"]  # funnel order
    with pytest.raises(FedpaError, match="re-ranking cannot be federated"):
        parse_stages("rank,rerank")
    with pytest.raises(FedpaError, match="unknown stage"):
        parse_stages("ranking")
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run")
    with pytest.raises(FedpaError, match="stage-models"):
        replace(cfg, stage="rank").validate()
    with pytest.raises(FedpaError, match="unknown stage"):
        replace(cfg, stage="rerank", stage_models="x").validate()
    with pytest.raises(FedpaError, match="not a `fedpa funnel` run"):
        funnel_config(tmp_path / "nothing", cfg)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"data_dir": str(tmp_path), "foundation": str(tiny_foundation)}))
    with pytest.raises(FedpaError, match="same data and foundation"):
        funnel_config(other, cfg)
    (other / "config.json").write_text(json.dumps({"data_dir": str(tiny), "foundation": str(tiny_foundation),
                                                  "validation": True}))
    with pytest.raises(FedpaError, match="trained with --validation"):
        funnel_config(other, cfg)


# ----------------------------------------------------------------------------- the federation, end to end


@pytest.fixture(scope="module")
def tiny_funnel(tiny, tiny_foundation, tmp_path_factory):
    from fedpa.simulations.funnel import FunnelConfig, run_funnel_experiment

    out = tmp_path_factory.mktemp("stage_fed") / "funnel"
    cfg = FunnelConfig(data_dir=str(tiny), foundation=str(tiny_foundation), out_dir=str(out), train_requests=300,
                       test_requests=200, epochs=1, random_per_request=40, retrieval_size=40, prerank_size=20,
                       rank_size=8, exposed=4)
    run_funnel_experiment(cfg)
    return out


def _stage_cfg(tiny, tiny_foundation, tmp_path, funnel, **kw):
    return fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=30, stage_negatives=3, **kw)


@pytest.mark.parametrize("algorithm", ["fedpa", "ditto"])
def test_cohort_engine_matches_one_user_training_on_stage_rows(tiny, tiny_foundation, tmp_path, tiny_funnel,
                                                               algorithm):
    from fedpa.client.runtime import ClientRuntime
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    cfg = replace(_stage_cfg(tiny, tiny_foundation, tmp_path, tiny_funnel, algorithm=algorithm, batch_size=8),
                  stage="rank", stage_models=str(tiny_funnel), feature_cache="none", max_clients=8)
    rt = ClientRuntime(cfg)
    pm = rt.model
    pm.model.double()
    users = [rt.user(c) for c in range(rt.num_clients)]
    for u in users:
        u.train.features, u.train.labels = u.train.features.double(), u.train.labels.double()
    shared0 = pm.get_shared()
    worst = 0.0
    chunks = list(CohortEngine(pm, max_users=4).train([CohortUser(u.train, u.profile, None, u.user_id)
                                                      for u in users], shared0, rt.local))
    for chunk in chunks:
        for k, i in enumerate(chunk.users):
            u = users[i]
            pm.set_shared(shared0)
            pm.set_private(None)
            pm.train_user(u.train, u.profile, rt.local, seed=u.user_id)
            for key, v in pm.get_private().items():
                worst = max(worst, float(np.abs(chunk.private[k][key] - v).max()))
    assert worst < 1e-9


def test_stage_federation_personalizes_the_funnel_end_to_end(tiny, tiny_foundation, tmp_path, tiny_funnel):
    from fedpa.client.personal_store import PersonalStore
    from fedpa.server.rundir import RunDir
    from fedpa.simulations.stage_federation import KEY_FILE, evaluate_personalized_funnel, simulate_stages

    cfg = _stage_cfg(tiny, tiny_foundation, tmp_path, tiny_funnel, num_rounds=2)
    result = simulate_stages(cfg, ["prerank", "rank"], tiny_funnel)
    root = tmp_path / "run"
    written = json.loads((root / "stages.json").read_text())
    assert written["stages"] == ["prerank", "rank"] and "| prerank recall@20 |" in (root / "stages.md").read_text()
    for stage in ("prerank", "rank"):
        rounds = [json.loads(line)["round"] for line in (root / stage / "metrics.jsonl").read_text().splitlines()]
        assert rounds == [0, 1, 2]
        # what the server holds is the shared state only: no user path, no private head
        _, shared, _ = RunDir(root / stage).load_checkpoint()
        assert shared and not any("lora_user" in k or "lora_head_delta" in k for k in shared)
        run_cfg = json.loads((root / stage / "config.json").read_text())
        assert run_cfg["stage"] == stage and run_cfg["stage-models"] == str(tiny_funnel)
        # every user's private adapters are in the encrypted store, not in plain files
        store = PersonalStore.from_key_file(root / stage / "personal", root / KEY_FILE)
        assert len(store.users()) == 30
        blob = next((root / stage / "personal").iterdir()).read_bytes()
        assert b"lora_user" not in blob
    f = result["funnel"]
    assert f["users"] > 0 and set(f["users_with_private_state"]) == {"prerank", "rank"}
    assert all(0 < n <= f["users"] for n in f["users_with_private_state"].values())
    recalls = [f[s][f"recall@{k}"] for s, k in (("retrieval", 40), ("prerank", 20), ("rank", 8), ("exposed", 4))]
    assert recalls == sorted(recalls, reverse=True) and 0 <= f["end_to_end"]["effective_view_rate"] <= 1

    # the same evaluation without adaptation is the trained funnel on the same requests, and personal
    # state moves what the funnel keeps
    base = evaluate_personalized_funnel(replace(cfg, algorithm="foundation"), ["prerank", "rank"], tiny_funnel)
    assert base["users"] == f["users"] and set(base["users_with_private_state"].values()) == {0}
    assert base["prerank"] != f["prerank"] or base["rank"] != f["rank"]


def test_foundation_evaluation_equals_the_plain_funnel(tiny, tiny_foundation, tmp_path, tiny_funnel):
    from fedpa.client.runtime import partition_config
    from fedpa.foundation.model import load_foundation
    from fedpa.recdata.partition import make_partition
    from fedpa.recmodels.stages.features import StageEncoder
    from fedpa.simulations.funnel import (
        funnel_kept,
        funnel_metrics,
        load_funnel_data,
        load_stage_models,
        request_tensors,
    )
    from fedpa.simulations.stage_federation import evaluate_personalized_funnel, funnel_config

    cfg = _stage_cfg(tiny, tiny_foundation, tmp_path, tiny_funnel, algorithm="foundation")
    got = evaluate_personalized_funnel(cfg, ["retrieval", "prerank", "rank"], tiny_funnel)
    fc = funnel_config(tiny_funnel, cfg)
    ds, lookups, _, pools = load_funnel_data(fc, with_train=False)
    private = make_partition(ds, partition_config(cfg)).private_users
    pools = pools.subset(np.nonzero(np.isin(pools.requests.user_id, private))[0])
    test = request_tensors(pools, lookups)
    encoder = StageEncoder(load_foundation(tiny_foundation))
    models = load_stage_models(encoder, fc, tiny_funnel / "models")
    want = funnel_metrics(funnel_kept(models, encoder, test, fc.sizes()), encoder, test, pools, ds, fc)
    for stage in ("retrieval", "prerank", "rank", "exposed"):
        assert got[stage] == pytest.approx(want[stage])
    assert got["end_to_end"] == pytest.approx(want["end_to_end"])


def test_stage_federation_runs_under_secure_aggregation_and_dp(tiny, tiny_foundation, tmp_path, tiny_funnel):
    from fedpa.simulations.stage_federation import simulate_stages

    cfg = _stage_cfg(tiny, tiny_foundation, tmp_path, tiny_funnel, num_rounds=1, secagg=True,
                     dp_noise_multiplier=0.5, dp_mode="distributed", dp_clip=0.5)
    result = simulate_stages(cfg, ["rank"], tiny_funnel)
    summary = json.loads((tmp_path / "run" / "rank" / "summary.json").read_text())
    assert summary["differential_privacy"]["epsilon"] > 0
    assert summary["cohorts"]["secagg_participant"].startswith("node")
    assert result["funnel"]["users_with_private_state"]["rank"] > 0


def test_stage_report_averages_seeds(tmp_path):
    from fedpa.simulations.stage_federation import collect_stage_runs, write_stages_report

    def result(seed, recall):
        funnel = {s: {f"recall@{k}": recall, f"ndcg@{k}": recall / 2} for s, k in
                  (("retrieval", 8), ("prerank", 4), ("rank", 2), ("exposed", 1))}
        funnel.update(end_to_end={"effective_view_rate": recall / 10, "exposed_with_feedback": 0.2},
                      rerank={"intra_list_distance": 0.5, "category_coverage": 0.4})
        return {"algorithm": "fedpa", "seed": seed, "funnel": funnel,
                "stage_runs": {"rank": {"test": {"auc": 0.7 + seed / 100, "gauc": 0.6}}}}

    for seed, recall in ((0, 0.5), (1, 0.7)):
        d = tmp_path / "fedpa" / f"seed-{seed}"
        d.mkdir(parents=True)
        (d / "stages.json").write_text(json.dumps(result(seed, recall)))
    out = write_stages_report(tmp_path, collect_stage_runs(tmp_path), {})
    row = out["table"]["fedpa"]
    assert row["rank recall@2"] == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
    assert row["rank head test auc"][0] == pytest.approx(0.705)
    assert "exposed_with_feedback" not in " ".join(row)
    assert "| rank recall@2 | 0.6000 ± 0.1414 |" in (tmp_path / "stages.md").read_text()
    assert (tmp_path / "stages.png").stat().st_size > 0
