"""A simulation that joins an existing Ray cluster (`ray-address`) instead of starting a local Ray instance.

A real two-node cluster on this machine (Ray's own `cluster_utils`: a head and a second raylet, each with its
own resources), a 2-round federation whose virtual nodes run on both Ray nodes, the same metrics and shared
state as the run on a local instance; the cluster is torn down by the test. Slow (two federations and a
cluster): `make test-slow` or `pytest -m slow tests/test_ray_cluster.py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fed_fixtures import fed_config

pytestmark = pytest.mark.slow


def test_a_federation_on_a_two_node_ray_cluster_equals_the_local_run(tiny, tiny_foundation, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from fedpa.server.rundir import RunDir
    from fedpa.simulations.simulate import simulate

    base = dict(num_rounds=2, max_clients=8, feature_cache=str(tmp_path / "cache"))
    local = simulate(fed_config(tiny, tiny_foundation, tmp_path / "local", **base), cohort_size=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        spread = simulate(fed_config(tiny, tiny_foundation, tmp_path / "cluster", ray_address=cluster.address,
                                     **base), cohort_size=1)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    ran_on = {p["ray_node"] for p in spread["cohorts"]["processes"]}
    assert len(ran_on) == 2 and "" not in ran_on, spread["cohorts"]["processes"]
    assert {p["ray_node"] for p in local["cohorts"]["processes"]} != ran_on       # a local instance elsewhere
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("local", "cluster")]
    for a, b in zip(*rows):
        for split in ("val", "test"):
            for m in ("auc", "gauc", "logloss"):
                assert abs(a["eval"][split][m] - b["eval"][split][m]) <= 1e-5, (a["round"], split, m)
    _, s1, _ = RunDir(tmp_path / "local").load_checkpoint()
    _, s2, _ = RunDir(tmp_path / "cluster").load_checkpoint()
    assert max(float(np.abs(s1[k] - s2[k]).max()) for k in s1) <= 1e-5
