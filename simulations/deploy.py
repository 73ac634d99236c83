"""`fedpa deploy`: a real deployment on this machine — SuperLink, N SuperNodes, `flwr run`.

Everything runs as separate processes of Flower's deployment runtime and binds to 127.0.0.1:

1. key material (`server.pki`): a CA, the SuperLink's TLS certificate, one authentication key pair
   per SuperNode, and one personal-store key file per node (kept apart from the store itself);
2. ``flower-superlink`` with TLS and SuperNode authentication (runtime dependency installation
   off: the nodes use this environment);
3. ``flwr supernode register`` of every node's public key;
4. N device directories (`client.device_data`: node i holds the rows of partition i of N and the foundation,
   nothing else) and N ``flower-supernode`` processes, each reading its own device directory and keeping its
   users' private state in its own personal store; the run sends no data path, only the foundation's digest;
5. ``flwr run <this app> <connection>`` with the run configuration, then polling ``flwr ls``
   until the run is finished;
6. every process is stopped (SIGTERM, then SIGKILL) whatever happened.

`LocalDeployment` is the same thing as a context manager, for tests that kill a node mid-run or
start nodes that must be refused.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fedpa.foundation.errors import FedpaError
from fedpa.server.pki import NodeKey, ServerFiles, issue_node_certificate, make_node_key, make_server_files
from fedpa.simulations.loopback_supernode import POLL_ENV

CONNECTION = "fedpa-deploy"
FLWR_IN_MEMORY_DB = ":flwr-in-memory:"   # flower-superlink's --database for its state in memory (its default)
APP_DIR = Path(__file__).resolve().parents[1]   # the Flower app: pyproject.toml + the packages
BIN = Path(sys.executable).parent


class DeployError(FedpaError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def config_string(values: dict) -> str:
    """Flower's ``key=value key2="text"`` syntax for --run-config and --node-config."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


@dataclass
class Node:
    index: int
    key: NodeKey
    port: int
    store: Path
    store_key: Path
    node_id: int | None = None
    certificate: Path | None = None      # the CA's certificate for its key: its SecAgg+ identity
    device: Path | None = None           # its own users' data and the foundation (client.device_data)
    proc: subprocess.Popen | None = None
    executor: subprocess.Popen | None = None   # its warm ClientApp executor (client/warm_executor.py)
    log: Path | None = None


@dataclass
class LocalDeployment:
    workdir: Path
    nodes: int = 3
    tls: bool = True
    auth: bool = True
    port: int = 0
    poll_s: float | None = 0.1   # the nodes' idle waits on loopback (None: Flower's own 3 s / 1 s)
    warm: bool = True            # a warm executor per node (else Flower's: a fresh flwr-clientapp per message)
    # the SuperLink's state: None keeps it in memory (Flower's own default); a path makes it an SQLite file, which
    # outlives a SuperLink restart but commits every request to disk (on this machine a round took 10 s, not 6)
    superlink_db: str | None = None
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        if self.auth and not self.tls:
            raise DeployError("SuperNode authentication needs TLS (Flower refuses it on an insecure link)")
        if self.nodes < 1:
            raise DeployError(f"--nodes must be at least 1, got {self.nodes}")
        self.port = self.port or free_port()
        self.home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        for d in (self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(APP_DIR), os.environ.get("PYTHONPATH", "")) if p)}
        # what a device's process should run with: freed arrays (a round's messages, its deltas) go back to the
        # system instead of staying in glibc's heap (benchmarks/bench_device_memory.py: 378 MiB steady instead of
        # 404 after three rounds)
        self.env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        if self.poll_s is not None:
            # the SuperExec a SuperNode starts polls for tasks every second by default (Flower's own variable);
            # the SuperNode's own 3 s poll has no setting: simulations/loopback_supernode.py caps it
            self.env.update({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(self.poll_s), POLL_ENV: str(self.poll_s)})
        self.server: ServerFiles | None = None
        self.node_list: list[Node] = []

    # ------------------------------------------------------------------ processes

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.workdir)
        self._procs.append(proc)
        return proc

    def _cli(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout, cwd=self.workdir)
        if r.returncode != 0:
            raise DeployError(f"flwr {' '.join(args[:2])} failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
        return r.stdout

    @staticmethod
    def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=grace)

    def close(self) -> None:
        for proc in reversed(self._procs):
            self._stop(proc)
        self._procs.clear()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the SuperLink

    def start_superlink(self, timeout: float = 60) -> None:
        args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation", "--database", self.superlink_db or FLWR_IN_MEMORY_DB]
        if self.tls:
            self.server = make_server_files(self.workdir / "certs")
            args += ["--ssl-ca-certfile", str(self.server.ca_cert), "--ssl-certfile", str(self.server.cert),
                     "--ssl-keyfile", str(self.server.key)]
            if self.auth:
                args.append("--enable-supernode-auth")
        else:
            args.append("--insecure")
        conn = [f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]',
                f'address = "127.0.0.1:{self.port}"']
        conn.append(f'root-certificates = "{self.server.ca_cert}"' if self.tls else "insecure = true")
        (self.home / "config.toml").write_text("\n".join(conn) + "\n")
        self.superlink = self._spawn(args, self.logs / "superlink.log")
        ctx = ssl.create_default_context(cafile=str(self.server.ca_cert)) if self.tls else None
        url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/health"
        deadline = time.time() + timeout
        while True:
            if self.superlink.poll() is not None:
                raise DeployError(f"flower-superlink exited ({self.superlink.returncode}): "
                                  f"{(self.logs / 'superlink.log').read_text()[-1500:]}")
            try:
                urllib.request.urlopen(url, timeout=1, context=ctx)
                return
            except OSError:
                if time.time() > deadline:
                    raise DeployError(f"the SuperLink did not answer on {url} within {timeout:g}s") from None
                time.sleep(0.2)

    # ------------------------------------------------------------------ SuperNodes

    def enroll(self) -> list[Node]:
        """Key pairs, store keys and (with auth) registration of every node."""
        from fedpa.client.personal_store import generate_key_file

        keys = self.workdir / "keys"
        for i in range(self.nodes):
            store_key = keys / f"store-{i}.key"
            if not store_key.exists():
                generate_key_file(store_key)
            node = Node(i, make_node_key(keys, f"node-{i}"), free_port(), self.workdir / "stores" / f"node-{i}",
                        store_key)
            if self.auth:
                out = json.loads(self._cli("supernode", "register", str(node.key.public), CONNECTION,
                                           "--format", "json"))
                node.node_id = int(out["node-id"])
                node.certificate = issue_node_certificate(self.server, node.key, f"node-{i}", node.node_id)
            self.node_list.append(node)
        return self.node_list

    def provision_devices(self, cfg) -> None:
        """Give every node a device directory with its own users' rows and the foundation (node i: clients
        i*C .. of the partition `cfg` defines) — the only data a node then reads; the run sends no path."""
        from fedpa.client.device_data import provision
        from fedpa.client.runtime import clients_of_node
        from fedpa.simulations.simulate import count_clients

        n = count_clients(cfg)
        for node in self.node_list:
            clients = list(clients_of_node(node.index, self.nodes, n))
            if not clients:
                raise DeployError(f"{self.nodes} nodes for {n} clients: node {node.index} would hold no user")
            node.device = provision(cfg, clients, self.workdir / "devices" / f"node-{node.index}",
                                    overwrite=True).path

    def supernode_args(self, partition: int, num_partitions: int, port: int, *, key: Path | None,
                       root_certificates: Path | None, extra_config: dict | None = None,
                       max_retries: int | None = None, warm: bool = False) -> list[str]:
        launcher = ([str(BIN / "flower-supernode")] if self.poll_s is None
                    else [sys.executable, "-m", "fedpa.simulations.loopback_supernode"])
        args = [*launcher, "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
                "--port", str(port),
                "--node-config", config_string({"partition-id": partition, "num-partitions": num_partitions,
                                                **(extra_config or {})})]
        args += ["--root-certificates", str(root_certificates)] if root_certificates else (
            [] if self.tls else ["--insecure"])
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        if warm:
            args += ["--isolation", "process"]
        return args

    def start_node(self, node: Node) -> subprocess.Popen:
        node.store.mkdir(parents=True, exist_ok=True)
        node.log = self.logs / f"supernode-{node.index}.log"
        args = self.supernode_args(node.index, self.nodes, node.port,
                                   key=node.key.private if self.auth else None,
                                   root_certificates=self.server.ca_cert if self.tls else None,
                                   extra_config={"personal-store": str(node.store),
                                                 "personal-store-key-file": str(node.store_key),
                                                 **({"device-data": str(node.device)} if node.device else {}),
                                                 **self.secagg_identity(node)},
                                   warm=self.warm)
        node.proc = self._spawn(args, node.log)
        if self.warm:
            node.executor = self._spawn(
                [sys.executable, "-m", "fedpa.client.warm_executor", "--runtime-api-address",
                 f"127.0.0.1:{node.port}", "--insecure",
                 *(["--foundation", str(node.device / "foundation")] if node.device else [])],
                self.logs / f"executor-{node.index}.log")
        return node.proc

    def secagg_identity(self, node: Node) -> dict:
        """Node config naming the node's SecAgg+ identity (its authentication key, certified by the CA): with it
        the node signs its keys and survivor sets and checks its neighbours' (client/app.py)."""
        if node.certificate is None:
            return {}
        return {"secagg-identity-key": str(node.key.private), "secagg-certificate": str(node.certificate),
                "secagg-ca": str(self.server.ca_cert)}

    def kill_node(self, node: Node) -> None:
        """SIGKILL, as a crashing device: no goodbye to the SuperLink."""
        for proc in (node.proc, node.executor):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def try_node(self, name: str, *, key: Path | None, root_certificates: Path | None,
                 timeout: float = 60) -> tuple[int, str]:
        """Start a SuperNode that is expected to be refused; returns (exit code, its output)."""
        log = self.logs / f"{name}.log"
        proc = self._spawn(self.supernode_args(0, self.nodes, free_port(), key=key,
                                               root_certificates=root_certificates, max_retries=0), log)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop(proc)
            return -1, log.read_text()
        return proc.returncode, log.read_text()

    # ------------------------------------------------------------------ runs

    def submit(self, run_config: dict) -> int:
        out = self._cli("run", str(APP_DIR), CONNECTION, "--format", "json", "--run-config",
                        config_string(run_config), timeout=180)
        try:
            info = json.loads(out[out.index("{"):])
        except ValueError:
            raise DeployError(f"flwr run printed no run id: {out[-1000:]}") from None
        if not info.get("success"):
            raise DeployError(f"flwr run failed: {info}")
        return int(info["run-id"])

    def status(self, run_id: int) -> dict:
        out = self._cli("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        runs = json.loads(out[out.index("{"):]).get("runs", [])
        return runs[0] if runs else {}

    def wait(self, run_id: int, timeout: float, on_poll=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.status(run_id)
            if str(st.get("status", "")).startswith("finished"):
                return st
            if on_poll:
                on_poll(st)
            time.sleep(2)
        raise DeployError(f"run {run_id} did not finish within {timeout:g}s (logs in {self.logs})")

    def server_log(self, run_id: int) -> str:
        try:
            return self._cli("log", str(run_id), CONNECTION, "--show", timeout=60)
        except DeployError as e:
            return str(e)


def deploy(*, workdir: str | Path, run_config: dict, nodes: int = 3, tls: bool = True, auth: bool = True,
           timeout: float = 3600, on_poll=None, poll_s: float | None = 0.1, warm: bool = True,
           superlink_db: str | None = None) -> dict:
    """The whole sequence; returns the run's summary.json plus the deployment's facts. Every node holds its own
    users' data (a device directory provisioned here from the run's dataset); the run sends no data path."""
    from fedpa.common.config import FederationConfig

    run_dir = Path(run_config["run-dir"])
    with LocalDeployment(Path(workdir), nodes=nodes, tls=tls, auth=auth, poll_s=poll_s, warm=warm,
                         superlink_db=superlink_db) as d:
        d.start_superlink()
        d.enroll()
        d.provision_devices(FederationConfig.from_run_config(run_config))
        for node in d.node_list:
            d.start_node(node)
        run_id = d.submit({**run_config, "min-nodes": nodes, "nodes-hold-data": True})
        st = d.wait(run_id, timeout, on_poll=on_poll)
        if st.get("status") != "finished:completed":
            detail = ((run_dir / "error.txt").read_text() if (run_dir / "error.txt").exists()
                      else st.get("status-details"))
            raise DeployError(f"run {run_id} ended as {st.get('status')}: {detail} (logs: {d.logs})")
        summary = json.loads((run_dir / "summary.json").read_text())
        return {"summary": summary, "run_id": run_id, "status": st, "superlink": f"127.0.0.1:{d.port}",
                "tls": tls, "auth": auth, "nodes": [{"index": n.index, "node_id": n.node_id, "store": str(n.store),
                                                     "device": str(n.device)} for n in d.node_list],
                "network_traffic": st.get("network-traffic"), "workdir": str(d.workdir),
                "command": shlex.join(["flwr", "run", str(APP_DIR), CONNECTION, "--run-config",
                                       config_string(run_config)])}
