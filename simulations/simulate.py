"""`fedpa simulate`: one federated run on Flower's simulation runtime (or pooled training for
the centralized upper bound), written to a run directory."""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

from fedpa.common.config import FederationConfig
from fedpa.common.flower_pace import deliver_locally
from fedpa.foundation.errors import FedpaError
from fedpa.recmodels.personalization import get_algorithm

log = logging.getLogger("fedpa")


def backend_config(num_cpus: int | None = None) -> dict:
    """Flower's Ray backend: one CPU per virtual node's actor; a local Ray instance sized to this machine (when
    the simulation joins a cluster, `join_ray_cluster` has connected already and Flower reuses that)."""
    from fedpa.simulations.progress import verbose

    cpus = num_cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0, "object_store_memory": 512 * 1024 ** 2,
                          "logging_level": "info" if verbose() else "error", "log_to_driver": verbose()}}


def join_ray_cluster(address: str) -> int:
    """Connect this driver to an existing Ray cluster (Flower's backend then uses the connection: it starts Ray
    only when none is initialised) and return the cluster's CPUs, one virtual node's actor each. The workers get
    this driver's import path, as Flower gives them on a local instance."""
    import sys

    import ray

    from fedpa.simulations.progress import verbose

    if ray.is_initialized():
        ray.shutdown()
    pythonpath = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    try:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
                 logging_level="info" if verbose() else "error", log_to_driver=verbose())
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise FedpaError(f"cannot join the Ray cluster at '{address}': {e}") from None
    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


def quiet_flower() -> None:
    """Flower's own log lines hidden (fedpa reports progress itself), unless the CLI runs with --verbose."""
    from fedpa.simulations.progress import verbose

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if verbose():
        logging.getLogger("flwr").setLevel(logging.INFO)
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def count_clients(cfg: FederationConfig) -> int:
    from fedpa.client.runtime import partition_config
    from fedpa.recdata.partition import make_partition
    from fedpa.recdata.store import Dataset

    return make_partition(Dataset(cfg.data_dir), partition_config(cfg)).num_clients


def check_inputs(cfg: FederationConfig) -> None:
    from fedpa.foundation.device import resolve_device
    from fedpa.recdata.store import Dataset

    if not cfg.ray_address:   # the nodes run on this machine: a GPU it lacks is refused before anything starts
        resolve_device(cfg.engine_device, "engine-device")
    ds = Dataset(cfg.data_dir)  # raises a clear error if it is not a dataset
    if cfg.domain_adapters:
        ds.item_domains()    # a one-domain dataset is refused here, before any process starts
    if not (Path(cfg.foundation) / "config.json").exists():
        raise FedpaError(f"{cfg.foundation}: no foundation checkpoint (run `fedpa pretrain` first)")
    if not get_algorithm(cfg.algorithm).collaborative:   # before any process starts: a damaged file fails here
        from fedpa.foundation.checkpoint import verify_safetensors

        verify_safetensors(Path(cfg.foundation) / "model.safetensors")


def simulate(cfg: FederationConfig, *, cohort_size: int = 0, progress=None, encode_progress=None) -> dict:
    """Run one configuration; returns its summary. ``cohort_size`` users per virtual SuperNode
    (0 = split the clients over one node per CPU core, at least 8 nodes with SecAgg; 1 = Flower's
    stock one user per node)."""
    cfg = replace(cfg)  # the caller's configuration stays as given
    cfg.validate()
    check_inputs(cfg)
    algo = get_algorithm(cfg.algorithm)
    from fedpa.client.runtime import ensure_feature_cache

    # held open until the run returns: a concurrent run's pruning leaves this entry alone while the nodes start
    _held_cache = ensure_feature_cache(cfg, progress=encode_progress)
    if algo.centralized:
        from fedpa.simulations.centralized import run_centralized

        return run_centralized(cfg, progress=progress)
    if cfg.algorithm == "foundation":
        cfg.num_rounds = 0
    num_clients = count_clients(cfg)
    if num_clients == 0:
        raise FedpaError(f"{cfg.data_dir}: no private users to federate (check the partition options)")
    if cohort_size < 0:
        raise FedpaError(f"cohort size must be >= 0, got {cohort_size}")
    # default: one node per core (of the Ray cluster, when joining one); SecAgg+ needs >= 3 participants and
    # hides little among 3, so >= 8
    cores = join_ray_cluster(cfg.ray_address) if cfg.ray_address else (os.cpu_count() or 1)
    default_nodes = max(cores, 8 if cfg.secagg else 1)
    per_node = cohort_size or math.ceil(num_clients / default_nodes)
    num_nodes = math.ceil(num_clients / per_node)
    if cfg.resume and not cohort_size and cfg.min_nodes > 1:
        num_nodes = cfg.min_nodes  # the interrupted run's nodes: the same clients on the same nodes
    cfg.min_nodes = num_nodes
    from flwr.simulation import run_simulation

    quiet_flower()  # after the import: importing flwr configures its logger

    from fedpa.client.app import app as client_app
    from fedpa.server.app import make_server_app

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        from fedpa.server.rundir import RunDir

        if RunDir(cfg.run_dir).latest_round() is None:
            raise FedpaError(f"{cfg.run_dir}: no checkpoint to resume from (was round 1 ever completed?)")
    else:
        _clear_previous(Path(cfg.run_dir))
    server_app = make_server_app(cfg.to_run_config(), progress=progress)
    with deliver_locally(num_nodes):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                       backend_config=backend_config())
    summary_path = Path(cfg.run_dir) / "summary.json"
    error_file = Path(cfg.run_dir) / "error.txt"
    if error_file.exists():
        raise FedpaError(error_file.read_text())
    if not summary_path.exists():
        raise FedpaError(f"the simulation ended without a summary; see the log above and {cfg.run_dir}/metrics.jsonl")
    import json

    return json.loads(summary_path.read_text())


def _clear_previous(run_dir: Path) -> None:
    """A fresh run in an existing directory starts clean (resume is explicit)."""
    for name in ("metrics.jsonl", "summary.json", "curves.png"):
        (run_dir / name).unlink(missing_ok=True)
    ck = run_dir / "checkpoints"
    if ck.exists():
        for p in ck.iterdir():
            p.unlink()
