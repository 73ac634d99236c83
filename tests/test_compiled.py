"""A device's compiled model (recmodels/compiled.py) trains, exchanges and scores as the full model does, with
torch alone, and a compiled model that is not the run's is refused by name.

The claims: the same user trained twice from the same state by the peft model and by its compiled copy ends
with the same shared and private values (float32 rounding), the same Newton statistics and scores; a device
process trains from its compiled model without importing peft, transformers or torch's compiler; a compiled
file that was changed, a run with other options or another foundation, and Ditto are refused or fall back to
the full model, saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from fed_fixtures import fed_config

from fedpa.client.device_data import COMPILED_DIR, DeviceData, provision

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phone(tiny, tiny_foundation, tmp_path_factory):
    """A one-user device provisioned with FedPA's recipe (item tables, click tally, user offsets, groups)."""
    from fedpa.common.config import with_recipe

    run = tmp_path_factory.mktemp("run")
    cfg = with_recipe(replace(fed_config(tiny, tiny_foundation, run, max_clients=8, feature_cache="none"),
                              group_attributes="age,gender"), given={"group_attributes"})
    return cfg, provision(cfg, [3], tmp_path_factory.mktemp("devices") / "phone")


def _models(cfg, dev: DeviceData):
    from fedpa.common.models import build_compiled_model, build_personal_model

    on_device = dev.apply(replace(cfg, device_data=str(dev.path), foundation_digest=_digest(cfg.foundation)))
    return on_device, build_personal_model(on_device), build_compiled_model(on_device, dev.path / COMPILED_DIR)


def _digest(path) -> str:
    from fedpa.foundation.checkpoint import artifact_digest

    return artifact_digest(path)


def test_provisioning_compiles_the_runs_model_for_a_one_user_device(phone):
    cfg, dev = phone
    meta = json.loads((dev.path / "device.json").read_text())
    assert meta["compiled"] == "yes"
    compiled = json.loads((dev.path / COMPILED_DIR / "compiled.json").read_text())
    assert compiled["parity"] <= 1e-5 and compiled["group_attributes"] == ["age", "gender"]
    assert compiled["foundation-digest"] == meta["foundation-digest"]


def test_the_compiled_model_trains_exchanges_and_scores_as_the_full_model(phone):
    from fedpa.client.runtime import ClientRuntime
    from fedpa.recmodels.compiled import CompiledAdapters

    cfg, dev = phone
    on_device, full, compiled = _models(cfg, dev)
    assert isinstance(compiled.model, CompiledAdapters) and full.item_bias is not None and full.user_bias_key
    assert [s[:2] for s in compiled.shared_spec()] == [s[:2] for s in full.shared_spec()]
    rt = ClientRuntime(on_device, compiled=False)
    user = rt.user(3)
    rng = np.random.default_rng(0)
    shared = {k: v if k.endswith("clicks") else v + rng.normal(0, 0.05, v.shape).astype(np.float32)
              for k, v in full.get_shared().items()}
    shared["item_bias.clicks"] = rng.integers(0, 4, shared["item_bias.clicks"].shape).astype(np.float32)
    out = []
    for pm in (full, compiled):
        pm.set_shared(shared)
        pm.set_private(None)    # fresh: its offsets are calibrated first
        pm.train_user(user.train, user.profile, rt.local, seed=1)
        stats = pm.train_user(user.train, user.profile, rt.local, seed=2)
        out.append((stats, pm.get_shared(), pm.get_private(), pm.item_statistics,
                    pm.predict(user.test, user.profile), pm.reference_scores(user.test),
                    pm.features(rt.candidate_examples(user.user_id, np.arange(1, 40),
                                                      10**12).iter_batches(16)).features.numpy()))
    (a_stats, a_sh, a_pr, a_st, a_p, a_r, a_f), (b_stats, b_sh, b_pr, b_st, b_p, b_r, b_f) = out
    assert a_stats["n"] == b_stats["n"] == len(user.train) and abs(a_stats["loss"] - b_stats["loss"]) < 1e-6
    # after two Adam steps: Adam divides by each gradient's own scale, so where a gradient is near zero the two
    # traces' float32 rounding becomes a small part of a step (one gate weight of 2,816 moves 1.2e-5 apart since the
    # recipe's item embeddings add their dot product to the logit; every other value is within 2.2e-6). A wrong
    # computation moves values by the order of the learning rate (1e-2).
    for k in a_sh:
        np.testing.assert_allclose(b_sh[k], a_sh[k], rtol=0, atol=5e-5, err_msg=k)
    for k in a_pr:
        np.testing.assert_allclose(b_pr[k], a_pr[k], rtol=0, atol=5e-5, err_msg=k)
    assert sorted(a_st) == sorted(b_st) and a_st
    for k in a_st:
        np.testing.assert_array_equal(b_st[k][0], a_st[k][0])
        np.testing.assert_allclose(b_st[k][1], a_st[k][1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(b_p, a_p, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b_r, a_r, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b_f, a_f, rtol=0, atol=1e-6)


def test_a_device_process_trains_from_its_compiled_model_with_torch_alone(phone):
    """The train handler in a fresh interpreter, as a SuperNode's ClientApp process runs it."""
    from fedpa.common.models import build_personal_model
    from fedpa.server.federation import run_message_config

    cfg, dev = phone
    state = build_personal_model(cfg).get_shared()
    np.savez(dev.path.parent / "state.npz", **state)
    run = run_message_config(replace(cfg, nodes_hold_data=True))
    code = f"""
import json, sys, time
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from fedpa.client import training
from fedpa.client.app import _config
from fedpa.common.records import arrays_to_record
content = RecordDict({{"run": ConfigRecord(json.loads({json.dumps(json.dumps(run))})),
    "round": ConfigRecord({{"round": 1, "clients": [3], "final": False, "cohort": 8, "run-id": "t", "resumed": False}}),
    "arrays": arrays_to_record(dict(np.load({str(dev.path.parent / 'state.npz')!r})))}})
meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
msg = Message(content=content, metadata=meta)
ctx = Context(run_id=1, node_id=1, node_config={{"device-data": {str(dev.path)!r}}}, state=RecordDict(),
              run_config={{}})
reply = training.train(msg, ctx, _config(msg, ctx))
heavy = ("peft", "transformers", "torch._dynamo", "sympy")
print(json.dumps({{"metrics": dict(reply.content["metrics"]), "loaded": sorted(m for m in heavy if m in sys.modules)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["metrics"]["num-users"] == 1 and out["metrics"]["num-examples"] > 0


def test_a_compiled_model_that_is_not_the_runs_is_refused_or_replaced_by_the_full_model(phone, tmp_path, caplog):
    import shutil

    from fedpa.client.runtime import ClientRuntime
    from fedpa.common.models import build_compiled_model
    from fedpa.recmodels.compiled import CompiledAdapters, CompiledModelError, load_compiled

    cfg, dev = phone
    copy = tmp_path / "phone"
    shutil.copytree(dev.path, copy)
    mine = DeviceData.open(copy)
    on_device = mine.apply(replace(cfg, device_data=str(copy), foundation_digest=_digest(cfg.foundation)))
    # another run's options: the device trains with the full model and says why
    other = replace(on_device, rank=on_device.rank + 2)
    with pytest.raises(CompiledModelError, match="other options than this run's"):
        build_compiled_model(other, copy / COMPILED_DIR)
    with caplog.at_level("WARNING", logger="fedpa.client"):
        rt = ClientRuntime(other)
    assert not isinstance(rt.model.model, CompiledAdapters) and "training with the full model" in caplog.text
    # compiled from another foundation than the one the device holds
    with pytest.raises(CompiledModelError, match="another foundation"):
        build_compiled_model(on_device, copy / COMPILED_DIR, foundation_digest="0" * 64)
    # a file changed after compiling: refused by its digest before TorchScript reads it
    tower = copy / COMPILED_DIR / "tower.pt"
    tower.write_bytes(tower.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CompiledModelError, match="tower.pt: its sha256 .* refused"):
        load_compiled(copy / COMPILED_DIR)
    (copy / COMPILED_DIR / "compiled.json").write_text("{not json")
    with pytest.raises(CompiledModelError, match="compiled.json: malformed"):
        load_compiled(copy / COMPILED_DIR)


def test_ditto_and_multi_user_devices_are_not_compiled(tiny, tiny_foundation, tmp_path):
    cfg = replace(fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=8, feature_cache="none"),
                  algorithm="ditto")
    dev = provision(cfg, [3], tmp_path / "ditto")
    assert "Ditto trains its paths in phases" in json.loads((dev.path / "device.json").read_text())["compiled"]
    assert not (dev.path / COMPILED_DIR).exists()
    two = provision(replace(cfg, algorithm="fedpa"), [3, 4], tmp_path / "edge")
    assert "several users" in json.loads((two.path / "device.json").read_text())["compiled"]


def test_a_pinned_compiled_model_gives_each_load_its_own_copy_and_is_reread_when_its_files_change(phone, tmp_path):
    import shutil

    import torch

    from fedpa.recmodels import compiled as C

    _, dev = phone
    path = tmp_path / "compiled"
    shutil.copytree(dev.path / COMPILED_DIR, path)
    C.pin_compiled(path)
    try:
        a, b = C.load_compiled(path), C.load_compiled(path)
        pa, pb = dict(a.adapters.named_parameters()), dict(b.adapters.named_parameters())
        name = next(n for n, p in pa.items() if p.requires_grad)
        with torch.no_grad():
            pa[name].add_(1.0)     # a task training its copy leaves the pinned one and the other copies alone
        assert not torch.equal(pa[name], pb[name])
        assert torch.equal(dict(C.load_compiled(path).adapters.named_parameters())[name], pb[name])
        (path / "tower.pt").write_bytes((path / "tower.pt").read_bytes()[:-4] + b"XXXX")   # a new version
        with pytest.raises(C.CompiledModelError, match="sha256"):
            C.load_compiled(path)
    finally:
        C._PINNED.clear()
