"""Flower's deployment runtime on loopback: 1 SuperLink + 4 SuperNodes, TLS, SuperNode authentication,
secure aggregation, FedPA, 2 rounds — each node reading only its own users' data, one node killed mid-run,
strangers refused.

This is the one end-to-end test of a real deployment (separate processes, real certificates), as `fedpa deploy`
runs it: every SuperNode in Flower's process isolation with a warm executor beside it (client/warm_executor.py:
every ClientApp task a child forked from it) and loopback polls (simulations/loopback_supernode.py). Round 1's
evaluation sums its metrics in round 2's SecAgg+ messages, the round node 3 dies in. To keep it short the test
asks `flwr ls` for the run's status only when the run directory says the run is ending (each `flwr ls` is a
Python process: polling it every 2 s takes a CPU core's fair share from the nodes).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedpa.client.device_data import DeviceData
from fedpa.client.event_log import LOG_FILE, EventLog
from fedpa.client.on_device import DeviceRecommender
from fedpa.client.personal_store import PersonalStore
from fedpa.common.config import FederationConfig
from fedpa.recdata.store import Dataset
from fedpa.server.pki import make_node_key, make_server_files
from fedpa.server.rundir import RunDir
from fedpa.simulations.deploy import LocalDeployment

pytestmark = pytest.mark.timeout(900)


def wait_until_finished(d: LocalDeployment, run_id: int, run_dir: Path, timeout: float) -> dict:
    """`LocalDeployment.wait`, asking `flwr ls` every 30 s only until the run directory holds the summary (or
    the error) the ServerApp writes as it ends, then every second: the status is the SuperLink's all the same."""
    deadline = time.time() + timeout
    asked = 0.0
    while time.time() < deadline:
        ending = (run_dir / "summary.json").exists() or (run_dir / "error.txt").exists()
        if ending or time.time() - asked >= 30:
            asked = time.time()
            status = d.status(run_id)
            if str(status.get("status", "")).startswith("finished"):
                return status
        time.sleep(1.0 if ending else 0.5)
    raise AssertionError(f"run {run_id} did not finish within {timeout:g}s (logs in {d.logs})")


def test_deployment_with_tls_auth_and_secagg_survives_a_crashed_node(tiny, tiny_foundation, tmp_path):
    run_dir = tmp_path / "run"
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    run_config = {"data-dir": str(data), "foundation": str(tiny_foundation), "run-dir": str(run_dir),
                  "num-rounds": 2, "max-clients": 4, "secagg": True, "min-nodes": 4, "round-timeout": 90.0,
                  "feature-cache": "none"}
    with LocalDeployment(tmp_path / "deploy", nodes=4) as d:
        d.start_superlink()
        d.enroll()
        assert all(n.node_id is not None for n in d.node_list)
        # every node is a phone: its own user's rows only; the dataset they came from is gone before the run starts
        d.provision_devices(FederationConfig.from_run_config(run_config))
        shutil.rmtree(data)
        for node in d.node_list:
            assert len(Dataset(node.device / "data").users()) == 1
            assert json.loads((node.device / "device.json").read_text())["compiled"] == "yes"   # torch alone
            d.start_node(node)
        phone = d.node_list[0]
        with EventLog(phone.device / LOG_FILE, DeviceData.open(phone.device).clients[0]) as log:
            for i in range(12):      # what the user watched since provisioning: trained on from round 1
                log.impression(i * 7, timestamp_ms=1_900_000_000_000 + i, effective_view=i % 2)
            log.impression(99, timestamp_ms=1_900_000_000_100)   # no feedback yet: not trained on
        run_id = d.submit({**run_config, "nodes-hold-data": True})

        # strangers, while the run goes on: an unregistered key, and a node that does not trust the CA
        rogue = make_node_key(tmp_path / "rogue", "rogue")
        code, out = d.try_node("rogue", key=rogue.private, root_certificates=d.server.ca_cert)
        assert code != 0 and "2004" in out, out[-800:]
        other_ca = make_server_files(tmp_path / "other-ca")
        code, out = d.try_node("untrusting", key=d.node_list[0].key.private, root_certificates=other_ca.ca_cert)
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in out, out[-800:]

        # node 3 crashes once round 1 is checkpointed: round 2 runs on without it
        def crash():
            deadline = time.time() + 600
            while RunDir(run_dir).latest_round() is None and time.time() < deadline:
                time.sleep(0.5)
            d.kill_node(d.node_list[3])
        killer = threading.Thread(target=crash, daemon=True)
        killer.start()
        status = wait_until_finished(d, run_id, run_dir, timeout=800)
        killer.join(timeout=5)
        if status["status"] != "finished:completed":     # the whole server log: a str message is never cut
            log = d.server_log(run_id)
            (tmp_path / "server.log").write_text(log)
            pytest.fail(f"run ended {status['status']}; server log:\n{log[-6000:]}", pytrace=False)

    # every ClientApp task ran in a child of its node's warm executor, which outlived them all
    for node in d.node_list[:3]:
        log = (d.logs / f"executor-{node.index}.log").read_text()
        done = log.count("task done")
        assert done >= 12 and log.count("(exit 0;") == done and f"stopped after {done} task(s)" in log, log[-2000:]
        assert "training with the full model" not in log    # each device trained with its compiled model
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients_ok"] == 4 and rows[2]["clients_ok"] == 3, [r.get("clients_ok") for r in rows]
    # round 1's evaluation summed its metrics in round 2's SecAgg+ messages, which node 3 did not live to see:
    # the sum went on over the nodes left (3 users, or 4 if node 3 died only after masking its sums)
    assert rows[1]["eval"]["users"] in (3, 4) and 0.0 < rows[1]["eval"]["val"]["auc"] < 1.0, rows[1]["eval"]
    # every node in the sum signed its keys with its CA-certified identity (the malicious-server protocol)
    assert rows[1]["secagg_signed_nodes"] == 4 and rows[2]["secagg_signed_nodes"] == 3
    assert any("no reply" in p or "secure aggregation" in p or "error" in p for p in rows[2]["problems"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and 0 < summary["test"]["auc"] < 1
    # the aggregated shared state moved away from the initial adapters
    _, state, _ = RunDir(run_dir).load_checkpoint()
    from fedpa.foundation.model import load_foundation
    from fedpa.recmodels.personalization import PersonalModel, get_algorithm

    start = PersonalModel(load_foundation(tiny_foundation), get_algorithm("fedpa"), seed=0, r=4,
                          lora_alpha=4).get_shared()
    assert max(float(np.max(np.abs(state[k] - start[k]))) for k in start) > 1e-4
    # each surviving device kept its users' private state, encrypted, in its own store
    stores = sorted(Path(tmp_path / "deploy" / "stores").glob("node-*/*"))
    assert stores and not any(b"lora" in p.read_bytes() for p in stores if p.is_file())
    # the phone recommends with the model of the last round it took part in, as its exported ONNX model ranks
    rec = DeviceRecommender(phone.device, PersonalStore.from_key_file(phone.store, phone.store_key))
    assert rec.round == 2 and rec.private is not None
    candidates = np.arange(50) * 3
    top = [v for v, _ in rec.recommend(candidates, k=10, now_ms=1_900_000_001_000)]
    onnx = rec.export_onnx(tmp_path / "phone.onnx", candidates, 1_900_000_001_000)
    assert set(top) == {int(candidates[i]) for i in np.argsort(-onnx)[:10]}


@pytest.mark.parametrize("db", [None, "state/superlink.db"])
def test_the_superlink_keeps_its_state_in_memory_unless_given_a_file(tmp_path, db):
    """`fedpa deploy`'s SuperLink holds its state in memory (an SQLite file commits every request: rounds took
    twice as long); `--superlink-db` gives it a file, which it creates and which outlives it."""
    path = tmp_path / db if db else None
    if path:
        path.parent.mkdir()
    with LocalDeployment(tmp_path / "deploy", nodes=1, superlink_db=str(path) if path else None) as d:
        d.start_superlink()
        assert all(n.node_id is not None for n in d.enroll())    # the node key registered in that state
    files = sorted(p.name for p in (tmp_path / "deploy").rglob("*.db"))
    if path:
        assert path.is_file() and path.stat().st_size > 0 and files == []
    else:
        assert files == []
