"""`fedpa export`: a user's merged model as ONNX, equal to PyTorch, with an int8 variant."""

import json

import numpy as np
import onnx
import pytest
from fed_fixtures import fed_config
from typer.testing import CliRunner

from fedpa.client.personal_store import generate_key_file
from fedpa.foundation.export import ExportError, export_onnx, onnx_probabilities, torch_probabilities
from fedpa.simulations.cli import app
from fedpa.simulations.export_user import user_batches
from fedpa.simulations.simulate import simulate

runner = CliRunner()


@pytest.fixture(scope="module")
def fedpa_run(tiny, tiny_foundation, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_run")
    key = generate_key_file(root / "store.key")
    cfg = fed_config(tiny, tiny_foundation, root / "run", num_rounds=2, max_clients=12,
                     personal_store=str(root / "store"), personal_store_key_file=str(key))
    simulate(cfg, cohort_size=4)
    return cfg


def _a_client(cfg):
    from fedpa.client.runtime import ClientRuntime

    rt = ClientRuntime(cfg)
    return int(rt.partition.user_of(0))


def test_export_matches_pytorch_and_writes_int8(fedpa_run, tmp_path):
    user = _a_client(fedpa_run)
    out = tmp_path / "export"
    r = runner.invoke(app, ["export", "--run", fedpa_run.run_dir, "--user", str(user), "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "export.json").read_text())
    assert report["fp32"]["max_abs_diff_vs_torch"] <= 1e-4 and report["rows_checked"] > 0
    assert report["int8"]["bytes"] < report["fp32"]["bytes"] * 0.6
    assert report["int8"]["max_abs_diff_vs_fp32"] < 0.05
    assert report["fp32"]["latency_120"]["batch"] == 120
    onnx.checker.check_model(str(out / "model.onnx"))
    # the graph is general: a batch mixing requests (different histories) scores like PyTorch too
    test, request, _ = user_batches(fedpa_run, user)
    mixed = {k: np.concatenate([request[k][:5].numpy(), test[k][:7].numpy()]) for k in request}
    import torch

    mixed = {k: torch.as_tensor(v) for k, v in mixed.items()}
    got = onnx_probabilities(out / "model.onnx", mixed)
    alone = np.concatenate([onnx_probabilities(out / "model.onnx", {k: v[:5] for k, v in request.items()}),
                            onnx_probabilities(out / "model.onnx", {k: v[:7] for k, v in test.items()})])
    assert got.shape[0] == 12 and np.max(np.abs(got - alone)) < 1e-5


def test_export_is_the_users_personalized_model(fedpa_run, tmp_path):
    """Two users' exports differ (private adapters), and each equals its merged PyTorch model."""
    from fedpa.client.runtime import ClientRuntime

    rt = ClientRuntime(fedpa_run)
    a, b = int(rt.partition.user_of(0)), int(rt.partition.user_of(1))
    for u in (a, b):
        assert runner.invoke(app, ["export", "--run", fedpa_run.run_dir, "--user", str(u), "--out",
                                   str(tmp_path / str(u)), "--no-int8"]).exit_code == 0
        assert not (tmp_path / str(u) / "model.int8.onnx").exists()
    test, _, _ = user_batches(fedpa_run, a)
    pa = onnx_probabilities(tmp_path / str(a) / "model.onnx", test)
    pb = onnx_probabilities(tmp_path / str(b) / "model.onnx", test)
    assert np.max(np.abs(pa - pb)) > 1e-4


def test_export_refuses_what_it_cannot_do(fedpa_run, tmp_path):
    r = runner.invoke(app, ["export", "--run", str(tmp_path / "nope"), "--user", "1"])
    assert r.exit_code == 2 and "not a run directory" in r.output
    r = runner.invoke(app, ["export", "--run", fedpa_run.run_dir, "--user", "999999"])
    assert r.exit_code == 2 and "not in" in r.output
    other_key = generate_key_file(tmp_path / "other.key")
    user = _a_client(fedpa_run)
    r = runner.invoke(app, ["export", "--run", fedpa_run.run_dir, "--user", str(user), "--key-file", str(other_key),
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and not (tmp_path / "x" / "model.onnx").exists()
    import shutil

    from fedpa.client.personal_store import PersonalStore

    store = tmp_path / "store"                                   # a copy whose current file was tampered with
    shutil.copytree(fedpa_run.personal_store, store)
    current, prev = PersonalStore(store, b"\0" * 32).paths(user)
    assert prev.exists()
    blob = bytearray(current.read_bytes())
    blob[-5] ^= 1
    current.write_bytes(bytes(blob))
    r = runner.invoke(app, ["export", "--run", fedpa_run.run_dir, "--user", str(user), "--store", str(store),
                            "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "refuses to pair the previous version" in r.output, r.output
    assert not (tmp_path / "y" / "model.onnx").exists()
    with pytest.raises(ExportError, match="lacks"):
        export_onnx(None, {"item": np.zeros(1)}, tmp_path / "m.onnx")


def test_torch_and_onnx_agree_on_the_foundation_itself(tiny, tiny_foundation, tmp_path):
    from fedpa.foundation.model import load_foundation

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "r")
    test, request, _ = user_batches(cfg, 3)
    model = load_foundation(tiny_foundation)
    path = export_onnx(model, request, tmp_path / "f.onnx")
    assert np.max(np.abs(onnx_probabilities(path, test) - torch_probabilities(model, test))) <= 1e-4
