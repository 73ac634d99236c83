"""SecAgg+ inside a real Flower round: the server sees only the sum, and the model equals plain FedPA.

One pair of runs (module fixture: plain, then the same configuration under SecAgg+) serves both tests; its
configuration has the item-side tables and user offsets on top of FedPA's adapters, so every kind of shared
entry (adapters, gate and head, per-row item tables with their count vectors) goes through the masked sum.
"""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from fed_fixtures import fed_config

from fedpa.server.rundir import RunDir
from fedpa.simulations.simulate import simulate

ITEM_TABLES = ("item_bias.category_level_one", "item_bias.upload_type")


@pytest.fixture(scope="module")
def runs(tiny, tiny_foundation, tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg_federation")
    plain = fed_config(tiny, tiny_foundation, root / "plain", num_rounds=2, max_clients=12, use_user_bias=True,
                       item_bias_fields="category_level_one,upload_type", item_bias_lr=0.1)
    secure = replace(plain, run_dir=str(root / "secure"), secagg=True)
    s_plain = simulate(plain, cohort_size=3)   # 4 nodes: SecAgg+ needs at least 3 participants
    s_secure = simulate(secure, cohort_size=3)
    _, a, _ = RunDir(plain.run_dir).load_checkpoint()
    _, b, _ = RunDir(secure.run_dir).load_checkpoint()
    return SimpleNamespace(plain=plain, secure=secure, s_plain=s_plain, s_secure=s_secure, a=a, b=b)


def test_secure_round_matches_plain_aggregation(runs):
    a, b, s_plain, s_secure = runs.a, runs.b, runs.s_plain, runs.s_secure
    assert a.keys() == b.keys()
    # same training; only fixed-point rounding differs (24 fractional bits, sums over 4 nodes)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < 1e-4, worst
    assert any(float(np.max(np.abs(v))) > 0 for v in b.values())
    # evaluation too goes through SecAgg+ (the server sees only the nodes' total metric sums): the same
    # metrics, up to the 2^-13 fixed-point resolution of loss sums
    for split in ("val", "test"):
        for k in ("auc", "gauc", "logloss"):
            assert abs(s_plain[split][k] - s_secure[split][k]) < 1e-4, (split, k)
    assert abs(s_plain["membership_inference"]["auc"] - s_secure["membership_inference"]["auc"]) < 1e-6
    # masked fixed-point vector (bit-packed) + keys and shares: the same order as the plain float32 reply
    assert 0.5 < s_secure["bytes_up_per_client_round"] / s_plain["bytes_up_per_client_round"] < 2.0
    # simulated nodes have no CA-certified identity: the honest-but-curious protocol, and the metrics say so
    rows = RunDir(runs.secure.run_dir).read_metrics()
    assert [r.get("secagg_signed_nodes") for r in rows[1:]] == [0, 0]


def test_item_side_row_counts_survive_secure_aggregation(runs):
    """Per-row count vectors travel inside the masked vector like every other entry: the item-side
    tables after secure rounds equal those after plain ones."""
    a, b = runs.a, runs.b
    for key in ITEM_TABLES:
        assert float(np.abs(a[key]).max()) > 1e-2  # the tables learned
        assert float(np.max(np.abs(a[key] - b[key]))) < 1e-4
