"""Shared pieces of the federation tests (fixtures re-exported by conftest.py).

* ``tiny`` / ``tiny_foundation``: the synthetic "tiny" dataset and a foundation
  pre-trained on it for one epoch, built once per session in a tmp dir (outside
  the repository, so `flwr run .` never bundles them).
* `finished_run`: a copy of one small finished fedpa run (simulated once per session), for the
  tests that resume, damage or export a run that ended.
* `RecordingGrid` / `recording_server_app_factory`: the real ServerApp of
  `server.app.make_server_app`, whose Grid is wrapped in a proxy that records
  every message going out and coming back (nothing of Flower is mocked: the
  proxy delegates every call to the runtime's own Grid).
* `faulty_client_app`: a ClientApp that registers the real `client.app`
  handlers and corrupts the replies of chosen partitions.

Ray actors import this module by name: Flower hands the driver's ``sys.path``
(which holds ``tests/``, see conftest.py) to the workers as PYTHONPATH.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FAULTS = ("nan", "inf", "shape", "missing", "float64", "raise", "sleep", "eval-shape", "boost")


# ----------------------------------------------------------------------------- data and foundation


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The synthetic 'tiny' dataset (200 users, 4 days), seed 0."""
    from fedpa.recdata.synth import generate

    return Path(generate("tiny", tmp_path_factory.mktemp("fed_data") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_foundation(tiny, tmp_path_factory) -> Path:
    """A foundation pre-trained on ``tiny`` for one epoch."""
    from fedpa.simulations.pretraining import pretrain_foundation

    out = tmp_path_factory.mktemp("fed_foundation") / "foundation"
    pretrain_foundation(tiny, out, epochs=1, batch_size=1024)
    return out


def fed_config(data: Path, foundation: Path, run_dir: Path, **kw: Any):
    """A small federation: 12 clients, 2 rounds, every client in every round.

    The simulation's feature cache (when the configuration has one) goes next to the session's
    foundation, never into the user's home."""
    from dataclasses import fields

    from fedpa.common.config import FederationConfig

    base = dict(data_dir=str(data), foundation=str(foundation), run_dir=str(run_dir),
                num_rounds=2, max_clients=12, round_timeout=300.0)  # generous: Ray actors start slowly on a loaded box
    if "feature_cache" in {f.name for f in fields(FederationConfig)}:
        base["feature_cache"] = str(Path(foundation).parent / "feature_cache")
    base.update(kw)
    return FederationConfig(**base)


_FINISHED: dict[tuple[str, str], Any] = {}


def finished_run(tiny: Path, tiny_foundation: Path, tmp_path_factory, dest: Path):
    """A finished fedpa run of `fed_config` with 1 round of 4 clients, 2 per node, and no personal store,
    copied to ``dest``; returns its configuration (``run_dir`` = ``dest``). The run is simulated once per
    session (each simulation costs seconds of Ray start-up) and every caller gets a copy of its own to
    resume, damage or export: what `simulate(cfg, cohort_size=2)` leaves, as if the caller had run it."""
    from dataclasses import replace

    from fedpa.simulations.simulate import simulate

    key = (str(tiny), str(tiny_foundation))
    if key not in _FINISHED:
        cfg = fed_config(tiny, tiny_foundation, tmp_path_factory.mktemp("finished") / "run", num_rounds=1,
                         max_clients=4)
        simulate(cfg, cohort_size=2)
        _FINISHED[key] = cfg
    cfg = _FINISHED[key]
    shutil.copytree(cfg.run_dir, dest)
    return replace(cfg, run_dir=str(dest))


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


# ----------------------------------------------------------------------------- recording the server's messages


@dataclass
class Recorded:
    direction: str          # "out" (server -> node) or "in" (node -> server)
    message_type: str
    node: int               # destination (out) or source (in)
    has_error: bool
    array_keys: dict[str, list[str]] = field(default_factory=dict)  # record name -> keys
    array_dtypes: dict[str, str] = field(default_factory=dict)      # "record/key" -> dtype
    config_keys: dict[str, list[str]] = field(default_factory=dict)
    metric_keys: dict[str, list[str]] = field(default_factory=dict)


def _describe(direction: str, msg) -> Recorded:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    from fedpa.common.records import record_to_arrays

    md = msg.metadata
    rec = Recorded(direction, str(md.message_type), int(md.dst_node_id if direction == "out" else md.src_node_id),
                   msg.has_error())
    if not msg.has_error():
        for name, r in msg.content.items():
            if isinstance(r, ArrayRecord):   # the named arrays a record carries, however they are packed
                arrays = record_to_arrays(r)
                rec.array_keys[name] = list(arrays)
                for k, v in arrays.items():
                    rec.array_dtypes[f"{name}/{k}"] = str(v.dtype)
            elif isinstance(r, ConfigRecord):
                rec.config_keys[name] = list(r.keys())
            elif isinstance(r, MetricRecord):
                rec.metric_keys[name] = list(r.keys())
    return rec


def _make_recording_grid_class():
    from flwr.serverapp import Grid

    class RecordingGrid(Grid):
        """Delegates everything to the runtime's Grid and records each message that passes."""

        def __init__(self, inner: Grid, log: list[Recorded]):
            self._inner = inner
            self._log = log
            self._lock = threading.Lock()

        def _record(self, direction: str, msgs: Iterable) -> list:
            msgs = list(msgs)
            with self._lock:
                self._log.extend(_describe(direction, m) for m in msgs)
            return msgs

        # abstract API
        def set_run(self, run):
            return self._inner.set_run(run)

        @property
        def run(self):
            return self._inner.run

        def create_message(self, *a, **kw):
            return self._inner.create_message(*a, **kw)

        def get_node_ids(self):
            return self._inner.get_node_ids()

        def get_nodes(self):
            return self._inner.get_nodes()

        def push_messages(self, messages):
            return self._inner.push_messages(self._record("out", messages))

        def pull_messages(self, message_ids):
            return self._record("in", self._inner.pull_messages(message_ids))

        def send_and_receive(self, messages, *, timeout=None):
            out = self._record("out", messages)
            return self._record("in", self._inner.send_and_receive(out, timeout=timeout))

        def __getattr__(self, name):  # anything else the runtime's Grid offers
            return getattr(self._inner, name)

    return RecordingGrid


def recording_server_app_factory(log: list[Recorded]):
    """A drop-in for `server.app.make_server_app`: the real ServerApp, run on a recording Grid."""
    from flwr.serverapp import ServerApp

    import fedpa.server.app as server_app_module

    real_factory = server_app_module.make_server_app
    RecordingGrid = _make_recording_grid_class()

    def factory(overrides=None, progress=None):
        inner = real_factory(overrides, progress=progress)
        outer = ServerApp()

        @outer.main()
        def main(grid, context):
            inner(RecordingGrid(grid, log), context)

        return outer

    return factory


# ----------------------------------------------------------------------------- a ClientApp with faults


def faulty_client_app(faults: dict[int, str], *, rounds: Iterable[int] | None = None, sleep_s: float = 0.0,
                      node_dir: str | None = None):
    """The real `client.app` handlers; partitions in ``faults`` corrupt their train reply (in ``rounds``,
    default every round) as follows:

    nan / inf: one value of one shared tensor; shape: that tensor one element longer; missing: drop it;
    float64: send it as float64; boost: every shared delta x1000 (well-formed poison); raise: the handler raises;
    sleep: sleep ``sleep_s`` before training;
    eval-shape: the evaluate reply's metric vector is one element short.

    With ``node_dir``, every node writes ``node_dir/<partition-id>`` = its node id at discovery.
    """
    from flwr.clientapp import ClientApp

    from fedpa.client.app import evaluate, query, train
    from fedpa.common.records import arrays_to_record, record_to_arrays
    from fedpa.common.secagg.transport import is_secagg

    faults = dict(faults)
    rounds = None if rounds is None else set(rounds)
    unknown = set(faults.values()) - set(FAULTS)
    assert not unknown, unknown
    app = ClientApp()

    def pid_of(context) -> int:
        return int(context.node_config["partition-id"])

    def target_key(keys: list[str]) -> str:
        return sorted(k for k in keys if not k.startswith("count/"))[0]

    @app.query()
    def _query(msg, context):
        if node_dir:
            Path(node_dir).mkdir(parents=True, exist_ok=True)
            (Path(node_dir) / str(pid_of(context))).write_text(str(context.node_id))
        return query(msg, context)

    @app.train()
    def _train(msg, context):
        if is_secagg(msg.content):    # a SecAgg+ phase: the faults are injected into the train requests
            return train(msg, context)
        fault = faults.get(pid_of(context))
        round_ = int(msg.content["round"]["round"])
        if fault is None or fault == "eval-shape" or (rounds is not None and round_ not in rounds):
            return train(msg, context)
        if fault == "raise":
            raise RuntimeError(f"injected failure on partition {pid_of(context)}")
        if fault == "sleep":
            time.sleep(sleep_s)
            return train(msg, context)
        reply = train(msg, context)
        arrays = record_to_arrays(reply.content["arrays"])
        key = target_key(list(arrays))
        if fault in ("nan", "inf"):
            a = arrays[key].copy()
            a.flat[0] = np.nan if fault == "nan" else np.inf
            arrays[key] = a
        elif fault == "shape":
            arrays[key] = np.zeros(arrays[key].size + 1, np.float32)
        elif fault == "missing":
            del arrays[key]
        elif fault == "float64":
            arrays[key] = arrays[key].astype(np.float64)
        elif fault == "boost":  # a well-formed but poisoned update: every shared delta x1000
            arrays = {k: (v if k.startswith("count/") else v * np.float32(1000)) for k, v in arrays.items()}
        reply.content["arrays"] = arrays_to_record(arrays)
        return reply

    @app.evaluate()
    def _evaluate(msg, context):
        reply = evaluate(msg, context)
        round_ = int(msg.content["round"]["round"])
        if faults.get(pid_of(context)) == "eval-shape" and (rounds is None or round_ in rounds):
            arrays = {k: v[:-1].copy() for k, v in record_to_arrays(reply.content["arrays"]).items()}
            reply.content["arrays"] = arrays_to_record(arrays)
        return reply

    return app


def target_key_of(spec_names: list[str]) -> str:
    """The shared tensor `faulty_client_app` corrupts."""
    return sorted(k for k in spec_names if not k.startswith("count/"))[0]


def node_ids(node_dir: Path) -> dict[int, int]:
    """partition id -> node id, as the faulty app's nodes wrote them."""
    return {int(p.name): int(p.read_text()) for p in Path(node_dir).iterdir()}
