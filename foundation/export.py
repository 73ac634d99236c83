"""ONNX export of one user's merged model, for on-device inference with onnxruntime.

Public API::

    export_onnx(model, example, path) -> Path          # fp32 graph, dynamic batch
    quantize_onnx(src, dst) -> Path                    # int8 weights (onnxruntime dynamic quantization)
    onnx_probabilities(path, batch) -> np.ndarray      # [B, T] per-task probabilities
    torch_probabilities(model, batch) -> np.ndarray
    scoring_latency(path, batch, repeats) -> dict      # median / p90 ms of one call

The exported graph takes the batch contract's model inputs (``user_profile``, ``item``,
``hist_items``, ``hist_mask``, ``context``; dtypes as `foundation.batch`) and returns
``probabilities`` [B, T], one column per task of the model's config. ``model`` is a dense
`FoundationModel` — e.g. `foundation.adapters.merge_for_user` of a user's adapters — so the device
needs neither peft nor the adapters. History de-duplication is switched off in the exported copy:
it branches on the data (one distinct history or several), and a traced graph would keep only the
branch of the example batch. Files are written through a temporary name and renamed, so a failed
export never leaves a half-written model.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FedpaError

INPUTS = ("user_profile", "item", "hist_items", "hist_mask", "context")
OPSET = 17


class ExportError(FedpaError):
    pass


class _Scoring(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, user_profile, item, hist_items, hist_mask, context):
        out = self.model(user_profile=user_profile, item=item, hist_items=hist_items, hist_mask=hist_mask,
                         context=context)
        return torch.sigmoid(out.logits)


def _inputs(batch: dict) -> dict[str, torch.Tensor]:
    missing = [k for k in INPUTS if k not in batch]
    if missing:
        raise ExportError(f"the example batch lacks {', '.join(missing)} (the exported model's inputs: "
                          f"{', '.join(INPUTS)})")
    return {k: torch.as_tensor(batch[k]) for k in INPUTS}


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_onnx(model: nn.Module, example: dict, path: str | Path) -> Path:
    """Trace ``model`` on ``example`` (a batch with the model inputs) and write an ONNX file."""
    graph = _Scoring(copy.deepcopy(model)).eval()
    for m in graph.modules():  # the foundation may sit inside a wrapper (e.g. with item-side offsets)
        if hasattr(m, "dedupe_histories"):
            m.dedupe_histories = False
    for p in graph.parameters():
        p.requires_grad_(False)
    x = _inputs(example)
    axes = {k: {0: "batch"} for k in INPUTS} | {"probabilities": {0: "batch"}}

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python-level branches on constants
            torch.onnx.export(graph, tuple(x[k] for k in INPUTS), tmp, input_names=list(INPUTS),
                              output_names=["probabilities"], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)

    return _atomic(Path(path), write)


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """int8 weights, dynamically quantized activations (onnxruntime's quantizer)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(tmp: str) -> None:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process the graph is for vision models
        try:
            quantize_dynamic(str(src), tmp, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)

    return _atomic(Path(dst), write)


def _session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise ExportError(f"{path}: not a loadable ONNX model ({e})") from None


def onnx_probabilities(path: str | Path, batch: dict, session=None) -> np.ndarray:
    sess = session or _session(path)
    return sess.run(["probabilities"], {k: v.numpy() for k, v in _inputs(batch).items()})[0]


@torch.no_grad()
def torch_probabilities(model: nn.Module, batch: dict) -> np.ndarray:
    return _Scoring(model).eval()(*(_inputs(batch)[k] for k in INPUTS)).numpy()


def scoring_latency(path: str | Path, batch: dict, repeats: int = 50, threads: int = 1) -> dict[str, float]:
    """Wall time of one onnxruntime call on ``batch`` (e.g. one request's 120 candidates)."""
    sess = _session(path, threads)
    feed = {k: v.numpy() for k, v in _inputs(batch).items()}
    for _ in range(3):
        sess.run(["probabilities"], feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(["probabilities"], feed)
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
            "batch": int(feed["item"].shape[0]), "threads": threads}
