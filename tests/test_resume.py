"""Crash-safe server: SIGKILL the simulation mid-run, resume, and end exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fed_fixtures import fed_config, finished_run

from fedpa.client.personal_store import generate_key_file
from fedpa.foundation.errors import FedpaError
from fedpa.server.rundir import RunDir
from fedpa.simulations.simulate import simulate

REPO = Path(__file__).resolve().parents[1]


def _toml(cfg) -> str:
    lines = []
    for k, v in cfg.to_run_config().items():
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    return "\n".join(lines) + "\n"


def _rounds_logged(run_dir: Path) -> int:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return 0
    return max([json.loads(line)["round"] for line in p.read_text().splitlines() if line.strip()] or [0])


@pytest.mark.timeout(600)
def test_killed_run_resumes_to_the_uninterrupted_result(tiny, tiny_foundation, tmp_path):
    key = generate_key_file(tmp_path / "store.key")

    def config(name):
        return fed_config(tiny, tiny_foundation, tmp_path / name / "run", num_rounds=4, max_clients=12,
                          personal_store=str(tmp_path / name / "store"), personal_store_key_file=str(key))

    whole = config("whole")
    expected = simulate(whole, cohort_size=6)   # 2 nodes: each simulated node costs its own start-up

    broken = config("broken")
    (tmp_path / "broken.toml").write_text(_toml(broken))
    proc = subprocess.Popen([sys.executable, "-m", "fedpa.simulations.cli", "simulate", "--config",
                             str(tmp_path / "broken.toml"), "--cohort-size", "6"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = Path(broken.run_dir)
    deadline = time.time() + 400
    while _rounds_logged(run_dir) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the server, its Ray workers, everything
    proc.wait()
    killed_at = _rounds_logged(run_dir)
    assert 2 <= killed_at < 4 and not (run_dir / "summary.json").exists()

    resumed = simulate(replace(broken, resume=True), cohort_size=6)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # no round twice, none missing
    assert resumed["test"] == expected["test"] and resumed["best_round"] == expected["best_round"]
    _, a, _ = RunDir(whole.run_dir).load_checkpoint()
    _, b, _ = RunDir(broken.run_dir).load_checkpoint()
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) == 0.0


def test_resume_refuses_a_changed_configuration_or_a_missing_checkpoint(tiny, tiny_foundation, tmp_path_factory,
                                                                         tmp_path):
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "fresh", num_rounds=1, max_clients=4)
    with pytest.raises(FedpaError, match="no checkpoint to resume"):
        simulate(replace(cfg, resume=True), cohort_size=2)
    done = finished_run(tiny, tiny_foundation, tmp_path_factory, tmp_path / "run")   # that configuration, finished
    assert replace(done, run_dir=cfg.run_dir) == cfg
    with pytest.raises(FedpaError, match="different configuration.*lr"):
        simulate(replace(done, resume=True, num_rounds=2, lr=0.5), cohort_size=2)


def test_a_redone_round_reads_the_state_from_before_it(tmp_path):
    """The store keeps the version before the latest: a resumed run redoing round r skips what the
    killed attempt saved at r; another run (or evaluation) takes the latest."""
    from flwr.app import Context, RecordDict

    from fedpa.client.node_state import NodePrivateStates
    from fedpa.client.personal_store import PersonalStore
    from fedpa.client.training import _private_state

    key = generate_key_file(tmp_path / "k")
    store = PersonalStore.from_key_file(tmp_path / "store", key)
    store.save(7, {"w": np.full(3, 1.0, np.float32)}, {"algorithm": "fedpa", "round": 1, "run-id": "A"})
    store.save(7, {"w": np.full(3, 2.0, np.float32)}, {"algorithm": "fedpa", "round": 2, "run-id": "A"})

    class Runtime:
        cfg = replace(fed_config(tmp_path, tmp_path, tmp_path / "r"), personal_store=str(tmp_path / "store"),
                      personal_store_key_file=str(key))

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    states = NodePrivateStates(ctx.state)    # a resumed node's context holds nothing yet
    assert _private_state(states, Runtime, 7, "A", before_round=2)["w"][0] == 1.0   # redoing round 2
    assert _private_state(states, Runtime, 7, "A", before_round=3)["w"][0] == 2.0   # round 3 after 2
    assert _private_state(states, Runtime, 7, "B", before_round=1)["w"][0] == 2.0   # a later run
    assert _private_state(states, Runtime, 7)["w"][0] == 2.0                          # evaluation
    states.put(7, {"w": np.full(3, 3.0, np.float32)})
    states.flush()
    assert _private_state(NodePrivateStates(ctx.state), Runtime, 7, "A", before_round=4)["w"][0] == 3.0  # in a run


def test_configuration_differences_count_missing_keys_at_their_default():
    from fedpa.common.config import FederationConfig

    cfg = FederationConfig(lr=0.05)
    written = {k: v for k, v in FederationConfig().to_run_config().items() if k != "robust-aggregation"}
    assert cfg.differences(written) == ["lr"]  # a run from before robust-aggregation existed
    assert cfg.differences(written, ignore={"lr"}) == []
    assert FederationConfig(robust_aggregation="median").differences(written) == ["robust-aggregation"]
