"""The cohort engine on a chosen device (`CohortEngine(..., device=)`, run config ``engine-device``).

On CUDA it must give the CPU's results to float32 tolerance (skipped without a GPU). Where no GPU is present, the
engine trains and scores on the ``meta`` device instead (shapes without data) under a dispatch mode that refuses
any operation mixing tensors of two devices, as a CUDA kernel does: a tensor the engine forgot to place on its
device fails the test here. (Fake CUDA tensors cannot stand in on a CPU-only torch: indexing one asks for a
CUDA device guard, which such a build does not have.) A run asking for a GPU where there is none is refused by
name before anything trains.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from fed_fixtures import fed_config
from test_domains import world, world_foundation  # noqa: F401  (fixtures: a dataset of two surfaces)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")

# every part of the scorer the engine stacks per user: adapters with user shift and logit offsets (calibrated
# for fresh users), item-side tables, item embeddings with the user's vector, the click tally with its steps;
# and Ditto's two phases with the proximal term
OPTIONS = {
    "fedpa+all": dict(algorithm="fedpa", use_user_shift=True, use_user_bias=True,
                      item_bias_fields="category_level_one,video_id", item_embedding_dim=4, item_popularity=True,
                      item_popularity_steps=True),
    "ditto": dict(algorithm="ditto"),
}


def _runtime(tiny, tiny_foundation, tmp_path, **kw):
    from fedpa.client.runtime import ClientRuntime

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", max_clients=16, feature_cache="none", batch_size=8,
                     local_epochs=2, **kw)
    rt = ClientRuntime(cfg)
    if rt.model.item_bias is not None:
        rt.local = replace(rt.local, item_bias_lr=0.05)
    return rt


class OneDevicePerOp(TorchDispatchMode):
    """Refuses an operation whose tensors live on two devices, a CPU scalar aside (CUDA kernels take those): what
    CUDA refuses, and what some meta kernels let pass; stricter than CUDA about CPU index tensors, which it takes
    at the price of a copy and a wait. A copy between devices is what a transfer is."""

    def __init__(self):
        super().__init__()
        self.devices: set[torch.device] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1 and func is not torch.ops.aten.copy_.default:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        self.devices |= devices
        return func(*args, **kwargs)


@pytest.mark.parametrize("option", sorted(OPTIONS) + ["fedpa+domains"])
def test_the_engine_trains_and_scores_on_its_device_alone(tiny, tiny_foundation, tmp_path, option, monkeypatch,
                                                          request):
    """A chunk's local training (`_fit`: stacking, calibration, the click tally, every phase's steps) and its
    scoring (`_logits`) on the meta device: no operation mixes it with the CPU, the routing the layers are given
    is there too (with one row per user they need not read it yet), what they leave is there, and the model
    stays on the CPU as it was."""
    from fedpa.recmodels import cohort
    from fedpa.recmodels.cohort import CohortEngine, CohortUser

    if option == "fedpa+domains":   # each row routed by its item's domain (a dataset of two surfaces)
        from test_domains import _domain_runtime

        rt = _domain_runtime(request.getfixturevalue("world"), request.getfixturevalue("world_foundation"), tmp_path,
                             batch_size=8, local_epochs=2)
    else:
        rt = _runtime(tiny, tiny_foundation, tmp_path, **OPTIONS[option])
    pm = rt.model
    meta = torch.device("meta")
    routed = []

    def use_routing(model, **routing):
        routed.extend(t.device for t in routing.values() if t is not None)
        return cohort_use_routing(model, **routing)

    cohort_use_routing = cohort.use_routing
    monkeypatch.setattr(cohort, "use_routing", use_routing)
    engine = CohortEngine(pm, device=meta)
    users = [rt.user(c) for c in range(rt.num_clients)]
    (chunk,) = engine._chunks([CohortUser(u.train, u.profile, None, u.user_id) for u in users], rt.local)
    users = [users[i] for i in chunk]   # sorted by size, as `train` passes a chunk
    members = [CohortUser(u.train, u.profile, None, u.user_id) for u in users]
    groups = engine._group_rows(members)
    chunk_rows = engine._chunk_rows([[u.train] for u in members])
    before = {n: p.detach().clone() for n, p in pm.model.named_parameters()}

    with OneDevicePerOp() as mode:
        engine._copy_frozen()
        params, loss_sum = engine._fit(members, groups, rt.local, chunk_rows)
        logits = engine._logits(params, [u.val for u in users], chunk_rows,
                                paths=("user",) if pm.algorithm.ditto else None)

    assert meta in mode.devices   # the engine computed there
    assert routed and set(routed) == {meta}
    assert engine._frozen and all(t.device == meta for t in engine._frozen.values())
    assert all(t.device == meta for t in [loss_sum, *params.values(), *logits])
    assert [tuple(z.shape) for z in logits] == [(len(u.val), len(pm.task_columns)) for u in users]
    for n, p in pm.model.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, before[n]), n


def _train_and_score(engine, users, shared, local) -> dict[str, np.ndarray]:
    """A fresh round, a returning round's scores: every number the engine returns, by name."""
    from fedpa.recmodels.cohort import CohortUser, RowDeltas

    out, private = {}, [None] * len(users)
    for chunk in engine.train([CohortUser(u.train, u.profile, None, u.user_id) for u in users], shared, local):
        for k, i in enumerate(chunk.users):
            private[i] = chunk.private[k]
            out[f"loss {i}"] = chunk.loss[k]
            out.update({f"{key} {i}": v for key, v in chunk.private[k].items()})
        for key, d in chunk.deltas.items():
            for j, k in enumerate(d.users if isinstance(d, RowDeltas) else d[0]):
                i = chunk.users[k]
                if isinstance(d, RowDeltas):
                    out[f"{key} rows {i}"] = d.rows[j]
                    out[f"{key} {i}"] = d.values[j]
                    if d.weights is not None:
                        out[f"{key} weights {i}"] = d.weights[j]
                else:
                    out[f"{key} {i}"] = d[1][j]
    returning = [CohortUser(u.train, u.profile, p, u.user_id) for u, p in zip(users, private)]
    for i, scores in enumerate(engine.predict(returning, [[u.val, u.test] for u in users], shared, local)):
        out.update({f"scores {split} {i}": s for split, s in zip(("val", "test"), scores)})
    return out


@needs_cuda
@pytest.mark.parametrize("option", sorted(OPTIONS) + ["fedpa+newton"])
def test_the_engine_on_cuda_gives_the_cpu_result(tiny, tiny_foundation, tmp_path, option):
    from fedpa.recmodels.cohort import CohortEngine

    kw = (dict(algorithm="fedpa", use_user_bias=True, item_bias_fields="category_level_one,video_id",
               item_bias_update="newton", item_bias_prior=10.0) if option == "fedpa+newton" else OPTIONS[option])
    rt = _runtime(tiny, tiny_foundation, tmp_path, **kw)
    pm = rt.model
    users = [rt.user(c) for c in range(rt.num_clients)]
    shared = pm.get_shared()
    before = {n: p.detach().clone() for n, p in pm.model.named_parameters()}
    on_cpu = _train_and_score(CohortEngine(pm, max_users=5), users, shared, rt.local)
    on_gpu = _train_and_score(CohortEngine(pm, max_users=5, device="cuda"), users, shared, rt.local)
    for n, p in pm.model.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, before[n]), n
    assert set(on_gpu) == set(on_cpu)
    for key, want in on_cpu.items():
        got = on_gpu[key]
        assert isinstance(got, type(want)), key
        # float32 on other kernels: the engine's tolerance against one-user training in float32 (test_cohort.py)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=key)


@without_cuda
def test_a_run_asking_for_a_missing_gpu_is_refused_before_anything_trains(tiny, tiny_foundation, tmp_path):
    from typer.testing import CliRunner

    from fedpa.client.runtime import ClientRuntime
    from fedpa.common.config import ConfigValueError, FederationConfig
    from fedpa.foundation.errors import FedpaError
    from fedpa.simulations.cli import app
    from fedpa.simulations.simulate import simulate

    for good in ("auto", "cpu", "cuda", "cuda:1"):
        FederationConfig(engine_device=good).validate()   # whether the device is there is the runtime's question
    with pytest.raises(ConfigValueError, match="engine-device 'gpu'"):
        FederationConfig(engine_device="gpu").validate()
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", algorithm="fedpa", engine_device="cuda")
    with pytest.raises(FedpaError, match="device 'cuda': torch sees no CUDA device here .*; use engine-device cpu"):
        simulate(cfg, cohort_size=4)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(FedpaError, match="torch sees no CUDA device"):   # a node's process, whoever started it
        ClientRuntime(cfg)
    assert ClientRuntime(replace(cfg, engine_device="auto")).cohort_engine.device == torch.device("cpu")
    result = CliRunner().invoke(app, ["simulate", "--data", str(tiny), "--foundation", str(tiny_foundation),
                                      "--run-dir", str(tmp_path / "cli"), "--engine-device", "cuda"])
    assert result.exit_code != 0 and "torch sees no CUDA device" in result.output
    assert not (tmp_path / "cli" / "metrics.jsonl").exists()
