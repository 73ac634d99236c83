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

from fedpa.server.federation import Federation
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
    exchanges = []   # the secure run's message exchanges: the records each carried to its first node
    send = Federation._send

    def recording_send(self, msgs, deadline=None):
        exchanges.append(sorted(msgs[0].content.keys()) if msgs else [])
        return send(self, msgs, deadline)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Federation, "_send", recording_send)
        s_secure = simulate(secure, cohort_size=3)
    _, a, _ = RunDir(plain.run_dir).load_checkpoint()
    _, b, _ = RunDir(secure.run_dir).load_checkpoint()
    return SimpleNamespace(plain=plain, secure=secure, s_plain=s_plain, s_secure=s_secure, a=a, b=b,
                           exchanges=exchanges)


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


def test_secure_rounds_take_five_exchanges_and_every_round_keeps_its_metrics(runs):
    """The SecAgg+ setup rides on the train and evaluate requests, and a round's evaluation sums its metrics in
    the next round's phases: round 1 (train, then its evaluation) and round 2 take five exchanges each, not
    the ten of sending every phase on its own; every round's metrics are still those of the plain run."""
    ex = runs.exchanges
    # discovery; round 0's evaluation (request + 4 phases); round 1: train + 4 phases, its evaluation request;
    # round 2: train + 4 phases carrying both sums; the final evaluation (request + 4 phases)
    assert len(ex) == 1 + 5 + 6 + 5 + 5, ex
    requests = [1, 6, 11, 12, 17]   # evaluate 0, train 1, evaluate 1, train 2, final evaluate: each with a setup
    assert all(ex[i] == ["arrays", "round", "run", "secagg-setup"] for i in requests), ex
    assert ex[2:6] == ex[18:22] == [["secagg-eval"]] * 4      # an evaluation's phases on their own
    assert ex[7:11] == [["secagg"]] * 4                         # round 1's (round 0's evaluation ran alone)
    assert ex[13:17] == [["secagg", "secagg-eval"]] * 4         # round 2's phases carry round 1's evaluation
    plain, secure = (RunDir(c.run_dir).read_metrics() for c in (runs.plain, runs.secure))
    assert [r["round"] for r in secure] == [0, 1, 2]
    for p, s in zip(plain, secure):
        for split in ("val", "test"):
            assert abs(p["eval"][split]["auc"] - s["eval"][split]["auc"]) < 1e-4, (p["round"], split)


def test_a_run_stopped_with_an_evaluation_open_resumes_with_that_round_evaluated(tiny, tiny_foundation, tmp_path):
    """Round 1's evaluation sums its metrics in round 2's messages; when round 2 fails, the checkpoint of round 1
    holds round 1's record without its line in metrics.jsonl, and resuming evaluates round 1 again first."""
    from fed_fixtures import faulty_client_app

    import fedpa.client.app as client_app_module
    from fedpa.client.personal_store import generate_key_file
    from fedpa.foundation.errors import FedpaError

    key = generate_key_file(tmp_path / "store.key")   # resuming needs the users' private state kept on disk
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", num_rounds=2, max_clients=12, secagg=True,
                     min_reply_fraction=1.0, personal_store=str(tmp_path / "store"),
                     personal_store_key_file=str(key))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client_app_module, "app", faulty_client_app({1: "raise"}, rounds={2}))
        with pytest.raises(FedpaError, match="round 2"):
            simulate(cfg, cohort_size=3)
    run = RunDir(cfg.run_dir)
    last, _, meta = run.load_checkpoint()
    assert last == 1 and meta["unevaluated-record"]["round"] == 1
    assert [r["round"] for r in run.read_metrics()] == [0]

    resumed = simulate(replace(cfg, resume=True), cohort_size=3)
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["stage_s"] == meta["unevaluated-record"]["stage_s"]     # round 1's own training record
    assert all(0.0 < r["eval"]["val"]["auc"] < 1.0 for r in rows)
    assert resumed["rounds"] == 2


def test_evaluations_every_other_round_keep_their_order(tiny, tiny_foundation, tmp_path):
    """eval-every 2 over 3 rounds: round 2's evaluation rides on round 3's phases, round 1 has none; the metrics
    lines still come in round order, each evaluation on its own round's line."""
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", num_rounds=3, max_clients=12, secagg=True,
                     eval_every=2)
    summary = simulate(cfg, cohort_size=3)
    rows = RunDir(cfg.run_dir).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert ["eval" in r for r in rows] == [True, False, True, True]
    assert all(0.0 < r["eval"]["val"]["auc"] < 1.0 for r in rows if "eval" in r)
    assert summary["best_round"] in (0, 2, 3)


def test_a_run_stopped_by_its_privacy_budget_still_finishes_the_open_evaluation(tiny, tiny_foundation, tmp_path):
    """Round 1's evaluation waits for round 2's phases; when the budget stops training before round 2, its secure
    sum runs on its own and round 1 keeps its metrics."""
    from fedpa.server.accounting import event_multiplier, make_accountant, round_event
    from fedpa.server.federation import default_delta

    cfg = fed_config(tiny, tiny_foundation, tmp_path / "run", num_rounds=2, max_clients=12, secagg=True,
                     dp_noise_multiplier=1.0, dp_clip=0.5)
    n = 12   # every client, every round: the accountant's ε after one and after two rounds
    accountant, event = make_accountant(n, default_delta(n)), round_event(event_multiplier(cfg.dp_mode, 1.0), n, n)
    eps = []
    for _ in range(2):
        accountant.compose(event)
        eps.append(accountant.get_epsilon(default_delta(n)))
    stopped_cfg = replace(cfg, dp_max_epsilon=(eps[0] + eps[1]) / 2)
    stopped = simulate(stopped_cfg, cohort_size=3)
    assert stopped["differential_privacy"]["stopped_by_budget_at_round"] == 2
    rows = RunDir(stopped_cfg.run_dir).read_metrics()
    assert [r["round"] for r in rows] == [0, 1]
    assert 0.0 < rows[1]["eval"]["val"]["auc"] < 1.0 and rows[1]["eval"]["users"] > 0
