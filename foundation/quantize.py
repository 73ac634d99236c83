"""int8 dynamic quantization of a (merged) model for on-device inference.

Public API::

    quantize_for_inference(model, *, embeddings=False) -> (fp32_model, int8_model)
    model_size_bytes(model) -> int        # bytes of parameters + buffers (+ packed int8 weights)

``torch.ao.quantization.quantize_dynamic`` replaces every ``nn.Linear`` (the
tower, the user encoder's attention/FFN, a merged FedPA layer's stacked path
weights and its gate) by an int8-weight / dynamically-quantized-activation
linear. The input model is not modified: both returned models are copies in
eval mode without gradients, so a caller can compare them on held-out data
(the benchmark and CLI report the AUC change; the target is <= 0.005).

``embeddings=True`` additionally stores the id embedding tables as 8-bit rows with
per-row scale/offset (``float_qparams_weight_only_qconfig``); the tables are
most of the parameters, so this is what shrinks the file ~4x, at a small
accuracy cost that must be measured the same way.

Note: ``torch.ao.quantization`` is deprecated upstream in favour of torchao
(not a dependency here); its DeprecationWarnings are silenced locally.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def quantize_for_inference(model: nn.Module, *, embeddings: bool = False) -> tuple[nn.Module, nn.Module]:
    """Return ``(fp32 copy, int8 copy)`` of ``model``, both in eval mode with requires_grad False."""
    fp32 = copy.deepcopy(model).eval()
    for p in fp32.parameters():
        p.requires_grad_(False)
    spec: dict = {nn.Linear: torch.ao.quantization.default_dynamic_qconfig}
    if embeddings:
        # Only the id tables (BoundedEmbedding.table): they hold the parameters, and they are indexed
        # with contiguous row tensors, which the quantized embedding kernel requires (BERT's
        # position/type tables are indexed with expanded views and stay fp32).
        from .model import BoundedEmbedding

        for name, mod in fp32.named_modules():
            if isinstance(mod, BoundedEmbedding):
                spec[f"{name}.table"] = torch.ao.quantization.float_qparams_weight_only_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), spec, dtype=torch.qint8)
    return fp32, int8.eval()


def model_size_bytes(model: nn.Module) -> int:
    """Serialized size of the model's state (what a device stores), measured via torch.save to memory."""
    import io

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes
