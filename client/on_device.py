"""The user's personalized model on the device: recommend top-K from a candidate list between rounds.

The ClientApp keeps, in the device directory, the last global state a message brought and the run
configuration it came with (`keep_global_state`); the private state is in the encrypted personal store. A
`DeviceRecommender` puts the three together with the same code the federation scores with
(`client.runtime.ClientRuntime` and `recmodels.personalization.PersonalModel`), so its scores are the run's
scores for the same rows, and reads the user's behaviour sequence from the provisioned data and the event log.

Why the torch model and not the ONNX export here: measured for 120 candidates on one thread of this machine
(`benchmarks/bench_device.py`, `small`, FedPA), recommending with the torch model takes 4.3 ms including the
candidates' tower inputs, scoring the same batch with the exported ONNX model 11.9 ms; the torch path also needs no
export after each round and is the run's scorer itself (parity 0). The ONNX export (`export_onnx`, and
`fedpa export`) is what an app without Python ships (parity ≤ 1e-4, tested: 2.4e-7 measured).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedpa.client.device_data import DeviceData, DeviceDataError
from fedpa.client.personal_store import PersonalStore
from fedpa.common.config import NODE_KEYS, FederationConfig
from fedpa.common.files import atomic_write_json

MODEL_DIR = "model"
STATE_FILE = "shared.safetensors"
RUN_FILE = "run.json"


def keep_global_state(device: DeviceData, cfg: FederationConfig, state: dict[str, np.ndarray], round_: int) -> None:
    """Keep the global state a message brought (atomically: a crash leaves the previous one) for recommending
    between rounds; the run configuration is kept without the node's own keys and paths."""
    from safetensors.numpy import save_file

    from fedpa.foundation.checkpoint import seal_safetensors

    if not state:
        return
    out = device.path / MODEL_DIR
    out.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".shared.", suffix=".safetensors", dir=out)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp)
        seal_safetensors(tmp)
        os.replace(tmp, out / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    run = {k: v for k, v in cfg.to_run_config().items() if k not in NODE_KEYS and k not in ("data-dir", "foundation")}
    atomic_write_json(out / RUN_FILE, {"round": int(round_), "run": run})


class DeviceRecommender:
    """Scores candidates for the device's user with its current personalized model."""

    def __init__(self, device_dir: str | Path, store: PersonalStore | None = None, client: int | None = None):
        from safetensors.numpy import load_file

        from fedpa.client.runtime import ClientRuntime
        from fedpa.foundation.checkpoint import verify_safetensors

        self.device = DeviceData.open(device_dir)
        model_dir = self.device.path / MODEL_DIR
        if not (model_dir / RUN_FILE).is_file() or not (model_dir / STATE_FILE).is_file():
            raise DeviceDataError(f"{model_dir}: no model yet (the device keeps one once it has taken part in a "
                                  "round)")
        meta = json.loads((model_dir / RUN_FILE).read_text())
        self.round = int(meta["round"])
        cfg = FederationConfig.from_run_config({**meta["run"], "device-data": str(self.device.path)})
        cfg = replace(cfg, data_dir=str(self.device.data_dir), foundation=str(self.device.foundation_dir),
                      feature_cache="none")
        self.client = client if client is not None else min(self.device.clients)
        self.user_id = self.device.clients[self.client]
        self.rt = ClientRuntime(cfg)
        verify_safetensors(model_dir / STATE_FILE)
        self.shared = load_file(str(model_dir / STATE_FILE))
        self.private = None
        if store is not None:
            loaded = store.load(self.user_id)
            if loaded is not None and loaded[1].get("algorithm") == cfg.algorithm:
                self.private = loaded[0]

    def scores(self, candidates, now_ms: int) -> np.ndarray:
        """The personalized probability of an effective view for each candidate, shown at ``now_ms``."""
        from fedpa.client.runtime import user_seed

        rt, pm = self.rt, self.rt.model
        data = rt.user(self.client)
        rows = rt.candidate_rows(self.user_id, np.asarray(candidates, np.int64), int(now_ms))
        pm.set_shared(self.shared)
        pm.set_private(self.private)
        return pm.personalized_scores(data.train, [rows], data.profile, rt.local_for(self.round + 1),
                                      seed=user_seed(rt.cfg.seed, self.round + 1, self.user_id))[0]

    def export_onnx(self, path: str | Path, candidates, now_ms: int, domain: int | None = None) -> np.ndarray:
        """Write the user's current model as ONNX (adapters merged into the foundation, as `fedpa export` does)
        and return its scores of ``candidates``: what an app without Python ships. With a domain-specific
        path, the model of one ``domain`` (its code), for candidates of that domain."""
        from fedpa.client.runtime import ClientRuntime
        from fedpa.foundation.adapters import merge_for_user
        from fedpa.foundation.export import export_onnx, onnx_probabilities
        from fedpa.recmodels.compiled import CompiledAdapters
        from fedpa.recmodels.item_bias import WithItemBias

        if isinstance(self.rt.model.model, CompiledAdapters):   # merging needs peft's model: the full one, once
            self.rt = ClientRuntime(self.rt.cfg, compiled=False)
        rt, pm = self.rt, self.rt.model
        if pm.model is None:
            raise DeviceDataError(f"'{rt.cfg.algorithm}' scores without the foundation's adapters: no ONNX model")
        pm.set_shared(self.shared)
        pm.set_private(self.private)
        profile = rt.user(self.client).profile
        model = merge_for_user(pm.model, 0, pm.group_values(profile), domain=domain)
        if pm.item_bias is not None:
            import copy

            model = WithItemBias(model, copy.deepcopy(pm.item_bias).requires_grad_(False)).eval()
        batch = rt.candidate_examples(self.user_id, np.asarray(candidates, np.int64), int(now_ms)).batch()
        return onnx_probabilities(export_onnx(model, batch, path), batch)[:, 0]

    def recommend(self, candidates, k: int = 10, now_ms: int | None = None) -> list[tuple[int, float]]:
        """The top ``k`` candidates, best first, with their scores."""
        import time

        candidates = np.asarray(candidates, np.int64)
        s = self.scores(candidates, int(time.time() * 1000) if now_ms is None else now_ms)
        order = np.argsort(-s, kind="stable")[:k]
        return [(int(candidates[i]), float(s[i])) for i in order]
