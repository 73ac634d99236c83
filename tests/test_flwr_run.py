"""`flwr run .` of the repository against a local simulation SuperLink that the test owns.

As /tmp/flwr_proto/FINDINGS.md recommends: start `flower-superlink --simulation` on a free
loopback port with FLWR_HOME in a tmp dir outside the repository (the FAB bundles the app
directory, honouring .gitignore), write the connection into $FLWR_HOME/config.toml, submit the run,
poll `flwr ls` until it finishes, and always kill the SuperLink.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fed_fixtures import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONN = "fedpa-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def superlink(tmp_path):
    home = tmp_path / "flwr_home"
    home.mkdir()
    assert REPO not in home.parents, "FLWR_HOME inside the repository would be bundled into the FAB"
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    log = tmp_path / "superlink.log"
    with open(tmp_path / "superlink.out", "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation", "--database", str(home / "state.db"),
             "--log-file", str(log)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"flower-superlink exited: {(tmp_path / 'superlink.out').read_text()[-2000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert time.time() < deadline, "flower-superlink did not come up within 60 s"
                time.sleep(0.2)
        yield env
    finally:
        # the SuperLink's process group: itself, its flower-superexec and what that started
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)


def flwr(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_flwr_run_dot_completes_a_round(superlink, tiny, tiny_foundation, tmp_path):
    run_dir = tmp_path / "run"
    run_config = (f"data-dir='{tiny}' foundation='{tiny_foundation}' run-dir='{run_dir}' "
                  "num-rounds=1 max-clients=6 min-nodes=2 round-timeout=120.0")
    fed_config = ("num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=2 "
                  "init-args-logging-level='error' init-args-log-to-driver=false")
    p = flwr(superlink, "run", ".", CONN, "--run-config", run_config, "--federation-config", fed_config,
             "--format", "json")
    assert p.returncode == 0, p.stdout + p.stderr
    submitted = json.loads(p.stdout)
    assert submitted["success"] is True, submitted
    rid = str(submitted["run-id"])
    assert submitted["fab-id"] == "fedpa/fedpa", submitted

    deadline, status, run = time.time() + 300, "", {}
    while time.time() < deadline:
        ls = flwr(superlink, "ls", CONN, "--run-id", rid, "--format", "json")
        if ls.returncode == 0:
            run = json.loads(ls.stdout)["runs"][0]
            status = run["status"]
            if status.startswith("finished"):
                break
        time.sleep(2)
    logs = flwr(superlink, "log", rid, CONN, "--show").stdout
    assert status == "finished:completed", f"{status}: {run.get('status-details')}\n{logs[-4000:]}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "fedpa" and summary["rounds"] == 1 and summary["clients"] == 6
    assert summary["bytes_down_per_client_round"] > 0 and summary["bytes_up_per_client_round"] > 0
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == 6 and rows[1]["problems"] == []
    assert (run_dir / "checkpoints" / "round-0001.safetensors").exists()
    assert not (run_dir / "error.txt").exists()
    # the FAB left the repository as it was (flwr rewrites pyproject.toml when it migrates federations)
    assert "[tool.flwr.federations]" not in (REPO / "pyproject.toml").read_text()
