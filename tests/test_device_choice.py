"""Where computations run (`foundation.device`): the CPU unless CUDA is there and asked for (or ``auto``); a
GPU asked for and absent is refused by name; pre-training on CUDA gives the CPU's result to float32 tolerance
(skipped without a GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedpa.foundation.device import resolve_device
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import load_foundation
from fedpa.simulations.cli import app
from fedpa.simulations.pretraining import pretrain_foundation

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_auto_is_cuda_only_where_torch_sees_one_and_a_missing_gpu_is_refused_by_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(FedpaError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(FedpaError, match="device 'cuda': torch sees no CUDA device here"):
            resolve_device("cuda")


def test_pretrain_reports_where_it_trained_and_the_cli_refuses_a_missing_gpu(tiny, tmp_path):
    report = pretrain_foundation(tiny, tmp_path / "f", epochs=1, batch_size=1024, device="cpu")
    assert report["device"] == "cpu"
    assert json.loads((tmp_path / "f" / "pretrain_report.json").read_text())["device"] == "cpu"
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, ["pretrain", "--data", str(tiny), "--out", str(tmp_path / "g"),
                                          "--epochs", "1", "--device", "cuda"])
        assert result.exit_code != 0 and "torch sees no CUDA device" in result.output
        assert not (tmp_path / "g" / "model.safetensors").exists()


@needs_cuda
def test_pretraining_on_cuda_gives_the_cpu_result(tiny, tmp_path):
    cpu = pretrain_foundation(tiny, tmp_path / "cpu", epochs=2, batch_size=256, device="cpu")
    gpu = pretrain_foundation(tiny, tmp_path / "gpu", epochs=2, batch_size=256, device="cuda")
    assert gpu["device"].startswith("cuda")
    for a, b in zip(cpu["history"], gpu["history"]):
        assert abs(a["val"]["auc"] - b["val"]["auc"]) < 1e-3
    wc, wg = load_foundation(tmp_path / "cpu").state_dict(), load_foundation(tmp_path / "gpu").state_dict()
    for k in wc:
        np.testing.assert_allclose(wc[k].float().numpy(), wg[k].float().numpy(), atol=1e-3, rtol=1e-3)
