"""The federation end to end on Flower's real simulation runtime (`simulations.simulate.simulate`,
which runs `flwr.simulation.run_simulation` in-process): what a run leaves behind, that the shared
state learns where (and only where) clients contributed, what travels in the messages, and that a
seed fixes the result.

Each simulation costs several seconds of Ray start-up, so one fedpa run (module fixture) serves
most assertions; its ServerApp is the real one from `server.app.make_server_app`, run on a Grid
wrapped in a recording proxy (`fed_fixtures.RecordingGrid`) with the real `client.app.app`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fed_fixtures import fed_config, read_metrics, recording_server_app_factory

import fedpa.server.app as server_app_module
from fedpa.common.aggregation import count_keys, spec_from
from fedpa.server.rundir import RunDir

COHORT = 4        # 12 clients -> 3 virtual SuperNodes
NUM_CLIENTS = 12
EVAL_KEYS = ("auc", "gauc", "logloss")


def run_recorded(cfg, cohort_size: int = COHORT) -> SimpleNamespace:
    from fedpa.simulations.simulate import simulate

    log: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_app_module, "make_server_app", recording_server_app_factory(log))
        summary = simulate(cfg, cohort_size=cohort_size)
    return SimpleNamespace(cfg=cfg, summary=summary, log=log, run_dir=Path(cfg.run_dir))


def personal_model(cfg, foundation):
    from fedpa.common.models import build_personal_model
    from fedpa.foundation.model import load_foundation

    return build_personal_model(cfg, foundation=load_foundation(str(foundation)))


@pytest.fixture(scope="module")
def fedpa_run(tiny, tiny_foundation, tmp_path_factory):
    cfg = fed_config(tiny, tiny_foundation, tmp_path_factory.mktemp("fed") / "fedpa")
    return run_recorded(cfg)


@pytest.fixture(scope="module")
def fedpa_model(fedpa_run, tiny_foundation):
    return personal_model(fedpa_run.cfg, tiny_foundation)


def assert_finite_eval(ev: dict, where: str) -> None:
    for split in ("val", "test"):
        for k in EVAL_KEYS:
            v = ev[split][k]
            assert isinstance(v, float) and math.isfinite(v), (where, split, k, v)
        assert 0.0 <= ev[split]["auc"] <= 1.0 and ev[split]["logloss"] > 0
        assert ev[split]["n"] > 0


# ----------------------------------------------------------------------------- the run directory


def test_run_dir_has_config_metrics_summary_curves_checkpoints(fedpa_run, fedpa_model):
    run = fedpa_run.run_dir
    config = json.loads((run / "config.json").read_text())
    assert config["algorithm"] == "fedpa" and config["num-rounds"] == 2 and config["max-clients"] == NUM_CLIENTS
    shared_params = sum(int(np.prod(s)) for _, s, _ in fedpa_model.shared_spec())
    assert config["model"]["shared_params"] == shared_params > 0
    assert config["model"]["private_params_per_user"] > 0

    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert_finite_eval(r["eval"], f"round {r['round']}")
        assert r["eval"]["users"] == NUM_CLIENTS
    for r in rows[1:]:
        assert r["selected"] == NUM_CLIENTS and r["clients_ok"] == NUM_CLIENTS, r
        assert r["problems"] == []
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0

    s = json.loads((run / "summary.json").read_text())
    assert s == fedpa_run.summary
    assert s["algorithm"] == "fedpa" and s["rounds"] == 2 and s["clients"] == NUM_CLIENTS
    assert s["best_round"] in (0, 1, 2)
    best = rows[s["best_round"]]["eval"]
    assert s["test"] == best["test"] and s["val"] == best["val"]
    assert s["val"]["auc"] == max(r["eval"]["val"]["auc"] for r in rows)
    assert s["final"]["test"] == rows[-1]["eval"]["test"]
    for k in EVAL_KEYS:
        assert math.isfinite(s["test"][k])

    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    ck = RunDir(run)
    assert ck.latest_round() == 2
    assert sorted(p.name for p in (run / "checkpoints").glob("round-*.safetensors")) == \
        ["round-0001.safetensors", "round-0002.safetensors"]
    rnd, arrays, meta = ck.load_checkpoint()
    assert rnd == 2 and meta["algorithm"] == "fedpa"
    assert set(arrays) == {n for n, _, _ in fedpa_model.shared_spec()}


def test_bytes_per_round_are_the_serialized_messages(fedpa_run, fedpa_model):
    s = fedpa_run.summary
    float32_bytes = 4 * sum(int(np.prod(shape)) for _, shape, _ in fedpa_model.shared_spec())
    for key in ("bytes_down_per_client_round", "bytes_up_per_client_round"):
        # the whole shared state (plus names, counts and the run config) travels each way
        assert float32_bytes < s[key] < 1.5 * float32_bytes + 64 * 1024, (key, s[key], float32_bytes)
    rows = read_metrics(fedpa_run.run_dir)
    assert rows[1]["bytes_down_per_client"] == rows[2]["bytes_down_per_client"] == s["bytes_down_per_client_round"]


# ----------------------------------------------------------------------------- the shared state


def test_shared_state_learns_where_clients_contributed(fedpa_run, fedpa_model, tiny):
    from fedpa.client.runtime import partition_config
    from fedpa.recdata.examples import Lookups
    from fedpa.recdata.partition import make_partition
    from fedpa.recdata.store import Dataset

    cfg = fedpa_run.cfg
    initial = fedpa_model.get_shared()
    _, final, _ = RunDir(fedpa_run.run_dir).load_checkpoint(2)
    assert set(final) == set(initial)
    assert any(not np.array_equal(final[k], initial[k]) for k in initial)

    ds = Dataset(tiny)
    part = make_partition(ds, partition_config(cfg))
    assert part.num_clients == NUM_CLIENTS
    table = Lookups.build(ds).user_table
    held = set().union(*(fedpa_model.groups_of(table[part.user_of(c)]) for c in range(NUM_CLIENTS)))
    spec = spec_from(fedpa_model.shared_spec())
    groups = {t.group for t in spec if t.group is not None}
    unheld = groups - held
    assert held & groups, "no client holds any group value: the test needs another configuration"
    assert unheld, "every group value is held: the test needs a group value that no client holds"

    for t in spec:
        moved = not np.array_equal(final[t.name], initial[t.name])
        if t.group is None:
            continue
        if t.group in held:
            assert moved, f"{t.name}: held by a participating client but unchanged"
        else:
            assert not moved, f"{t.name}: no client holds {t.group} but it changed"
    # the globally shared entries (gate, head) learn too
    assert any(not np.array_equal(final[t.name], initial[t.name]) for t in spec if t.group is None)


# ----------------------------------------------------------------------------- what travels


def test_messages_carry_no_private_tensor(fedpa_run, fedpa_model):
    from fedpa.foundation.adapters import parameter_kinds

    log = fedpa_run.log
    private = set(fedpa_model._private)
    private |= {n for n, k in parameter_kinds(fedpa_model.model).items() if k.kind == "private"}
    assert private, "fedpa has private user adapters"
    spec = spec_from(fedpa_model.shared_spec())
    shared = {t.name for t in spec}
    counts = set(count_keys(spec))

    assert log, "the recording grid saw no message"
    for m in log:
        for rec, keys in m.array_keys.items():
            leaked = private & set(keys)
            assert not leaked, (m.direction, m.message_type, rec, sorted(leaked)[:5])
            assert not any("lora_user" in k or "lora_head_delta" in k for k in keys), (m.message_type, rec)

    by = lambda d, t: [m for m in log if m.direction == d and m.message_type == t]  # noqa: E731
    nodes = math.ceil(NUM_CLIENTS / COHORT)
    assert len(by("out", "query")) == nodes and len(by("out", "train")) == 2 * nodes
    assert len(by("out", "evaluate")) == 3 * nodes
    for m in by("out", "query"):
        assert m.array_keys == {}
    for m in by("out", "train") + by("out", "evaluate"):
        assert set(m.array_keys) == {"arrays"} and set(m.array_keys["arrays"]) == shared
    train_in = by("in", "train")
    assert len(train_in) == 2 * nodes and not any(m.has_error for m in train_in)
    for m in train_in:
        assert set(m.array_keys) == {"arrays"}
        assert set(m.array_keys["arrays"]) == shared | counts
        assert {m.array_dtypes[f"arrays/{k}"] for k in m.array_keys["arrays"]} == {"float32"}
    # evaluation replies carry metric sums only (plus the membership-attack sums in the final one)
    evals = by("in", "evaluate")
    for m in evals:
        assert set(m.array_keys) == {"arrays"}
        assert set(m.array_keys["arrays"]) in ({"val", "test"}, {"val", "test", "mia"})
    assert sum(set(m.array_keys["arrays"]) == {"val", "test", "mia"} for m in evals) == nodes  # last round only


# ----------------------------------------------------------------------------- other algorithms


def test_local_algorithm_sends_no_arrays(tiny, tiny_foundation, tmp_path):
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "local", algorithm="local", num_rounds=1)
    r = run_recorded(cfg)
    s = r.summary
    assert s["algorithm"] == "local" and s["rounds"] == 1
    assert s["bytes_down_per_client_round"] == 0 and s["bytes_up_per_client_round"] == 0
    rows = read_metrics(r.run_dir)
    assert [x["round"] for x in rows] == [0, 1]
    for x in rows:
        assert_finite_eval(x["eval"], f"local round {x['round']}")
    assert rows[1]["clients_ok"] == NUM_CLIENTS and rows[1]["problems"] == []
    for m in r.log:
        if m.direction == "out" or m.message_type == "train":
            assert m.array_keys == {}, (m.direction, m.message_type, m.array_keys)
    # local training personalizes: the private state changed the scores after round 1
    assert rows[1]["eval"]["val"] != rows[0]["eval"]["val"]


def test_foundation_algorithm_only_evaluates(tiny, tiny_foundation, tmp_path):
    from fedpa.simulations.simulate import simulate

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "foundation", algorithm="foundation", num_rounds=3)
    s = simulate(cfg, cohort_size=6)
    assert s["algorithm"] == "foundation" and s["rounds"] == 0 and s["best_round"] == 0
    assert s["bytes_down_per_client_round"] == 0 and s["bytes_up_per_client_round"] == 0
    rows = read_metrics(cfg.run_dir)
    assert [x["round"] for x in rows] == [0]
    assert_finite_eval(rows[0]["eval"], "foundation")
    assert s["test"] == rows[0]["eval"]["test"]
    assert RunDir(cfg.run_dir).latest_round() is None
    assert (Path(cfg.run_dir) / "curves.png").exists()


# ----------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_same_seed_same_result(fedpa_run, tmp_path):
    """A second run with the same configuration: bit-identical shared state and identical metrics
    (the server sums replies in the order of the clients their nodes serve, not arrival order)."""
    from fedpa.simulations.simulate import simulate

    cfg = fed_config(Path(fedpa_run.cfg.data_dir), Path(fedpa_run.cfg.foundation), tmp_path / "again")
    s = simulate(cfg, cohort_size=COHORT)
    _, a, _ = RunDir(cfg.run_dir).load_checkpoint(2)
    _, b, _ = RunDir(fedpa_run.run_dir).load_checkpoint(2)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    ref = fedpa_run.summary
    assert s["best_round"] == ref["best_round"]
    for split in ("val", "test"):
        assert set(s[split]) == set(ref[split])
        for k, v in ref[split].items():
            assert s[split][k] == v or (v != v and s[split][k] != s[split][k]), (split, k)
    for x, y in zip(read_metrics(cfg.run_dir), read_metrics(fedpa_run.run_dir)):
        assert x["round"] == y["round"]
        if "train_loss" in y:
            assert x["train_loss"] == y["train_loss"]


def test_lr_decay_sets_each_rounds_learning_rate(tiny, tiny_foundation, tmp_path):
    """lr-decay: round r trains at lr * decay^(r-1); with a vanishing decay round 2 leaves the shared state
    where round 1 put it, while round 1 itself still learns."""
    from fedpa.common.config import ConfigValueError, FederationConfig
    from fedpa.simulations.simulate import simulate

    assert FederationConfig(lr=0.01, lr_decay=0.5).round_lr(3) == pytest.approx(0.0025)
    assert FederationConfig(lr=0.01, lr_decay=0.5).round_lr(0) == 0.01  # evaluation before any training
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigValueError, match="lr-decay must be in"):
            FederationConfig(lr_decay=bad).validate()
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", num_rounds=2, lr_decay=1e-9)
    simulate(cfg, cohort_size=COHORT)
    run = RunDir(cfg.run_dir)
    _, r1, _ = run.load_checkpoint(1)
    _, r2, _ = run.load_checkpoint(2)
    assert max(float(np.abs(r2[k] - r1[k]).max()) for k in r1) < 1e-6
    init = personal_model(cfg, tiny_foundation).get_shared()
    assert max(float(np.abs(r1[k] - init[k]).max()) for k in r1) > 1e-3


@pytest.fixture(scope="module")
def user_side_run(tiny, tiny_foundation, tmp_path_factory):
    """One round with the user offsets (use-user-bias) and the item-side tables (item-bias-fields), recorded, the
    users' private state kept in a personal store: the run of the two tests below. The tables learn at the
    default lr (item-bias-lr 0.01); everything else at a vanishing lr, with which the user offsets must still be
    set (calibrated) after the round."""
    from fedpa.client.personal_store import generate_key_file

    root = tmp_path_factory.mktemp("user_side")
    key = root / "store.key"
    generate_key_file(key)
    cfg = fed_config(tiny, tiny_foundation, root / "run", use_user_bias=True, num_rounds=1, lr=1e-6,
                     item_bias_fields="category_level_one,upload_type", item_bias_lr=0.01,
                     personal_store=str(root / "store"), personal_store_key_file=str(key))
    return run_recorded(cfg)


def test_user_bias_offsets_stay_on_the_clients_and_are_calibrated(user_side_run, tiny_foundation):
    """use-user-bias: the shared head delta travels, each user's logit offsets never do; they start
    from the user's calibrated base rate, so they are set after one round even with a tiny lr."""
    from fedpa.client.personal_store import open_store
    from fedpa.foundation.adapters import parameter_kinds

    run, cfg = user_side_run, user_side_run.cfg
    assert cfg.lr == 1e-6
    pm = personal_model(cfg, tiny_foundation)
    kinds = parameter_kinds(pm.model)
    assert kinds["tower.head.lora_user_bias"].kind == "private"
    shared = {t.name for t in spec_from(pm.shared_spec())}
    assert {"tower.head.lora_head_shared_w", "tower.head.lora_head_shared_b"} <= shared
    sent = [set(keys) for m in run.log for keys in m.array_keys.values()]
    assert sent and not any(any("lora_user" in k for k in keys) for keys in sent)
    assert any("tower.head.lora_head_shared_w" in keys for keys in sent)
    store = open_store(cfg.personal_store, cfg.personal_store_key_file)
    offsets = [store.load(u)[0][pm.user_bias_key] for u in store.users()]
    assert len(offsets) == NUM_CLIENTS
    spread = np.array([o[0] for o in offsets])  # effective_view offset per user
    assert np.abs(spread).max() > 0.05 and spread.std() > 0.01  # each user's own rate, not a shared value


def test_item_side_tables_average_each_row_over_the_users_that_read_it(user_side_run):
    """item-bias-fields: one Flower round; each row of a shared item-side table moves by the mean delta of
    the users whose training rows read it (recomputed here user by user), rows nobody read stay, and
    what travels up is the delta plus one count per row."""
    from fedpa.client.runtime import ClientRuntime, user_seed

    run, cfg = user_side_run, user_side_run.cfg
    _, after, _ = RunDir(cfg.run_dir).load_checkpoint(1)
    rt = ClientRuntime(cfg)
    pm = rt.model
    start = pm.get_shared()
    keys = ["item_bias.category_level_one", "item_bias.upload_type"]
    sums = {k: np.zeros_like(start[k], dtype=np.float64) for k in keys}
    counts = {k: np.zeros(start[k].shape[0]) for k in keys}
    for c in range(rt.num_clients):
        data = rt.user(c)
        pm.set_shared(start)
        pm.set_private(None)
        pm.train_user(data.train, data.profile, rt.local_for(1), seed=user_seed(cfg.seed, 1, data.user_id))
        moved = pm.get_shared()
        for k, read in pm.touched_rows(data.train).items():
            sums[k] += (moved[k] - start[k]) * read[:, None]
            counts[k] += read
    for k in keys:
        assert counts[k].sum() > 0 and (counts[k] == 0).any()  # some rows read, some by nobody
        want = start[k] + sums[k] / np.maximum(counts[k], 1)[:, None]
        np.testing.assert_allclose(after[k], want, atol=2e-4)  # float32 cohort engine vs one user at a time
        np.testing.assert_array_equal(after[k][counts[k] == 0], start[k][counts[k] == 0])
        assert np.abs(after[k] - start[k]).max() > 1e-3  # the table really learned
    sent = [keys_ for m in run.log for keys_ in m.array_keys.values()]
    assert any("count/rows:item_bias.upload_type" in ks for ks in sent)


def test_a_client_runtime_freezes_the_process_heap_and_a_dropped_one_is_collected(tiny, tiny_foundation, tmp_path):
    """A client process's long-lived objects (imports, the runtime) are frozen once its runtime is built, so a
    full collection no longer walks them each few rounds; a runtime the process drops is collected again."""
    import gc
    import weakref
    from dataclasses import replace

    from fedpa.client import runtime

    runtime._RUNTIMES.clear()
    gc.unfreeze()
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run")
    first = runtime.get_runtime(cfg)
    assert gc.get_freeze_count() > 100_000   # torch, transformers, peft, Flower, the runtime: not walked again
    assert runtime.get_runtime(cfg) is first
    first.self_reference = first   # in a cycle: only a collection frees it, and a frozen object is never collected
    gone = weakref.ref(first)
    del first
    for n in (10, 11):   # two other configurations: building the third drops the first two
        runtime.get_runtime(replace(cfg, max_clients=n))
    gc.collect()
    assert gone() is None
    assert len(runtime._RUNTIMES) == 1 and gc.get_freeze_count() > 100_000
