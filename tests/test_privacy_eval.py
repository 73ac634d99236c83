"""Privacy evaluation: the attack on what the server sees, and `fedpa privacy-sweep` end to end."""

import json
import math

import pytest
from fed_fixtures import fed_config
from test_html_report import check_sweep_page
from typer.testing import CliRunner

from fedpa.client.runtime import ClientRuntime
from fedpa.common.models import model_options
from fedpa.foundation.model import load_foundation
from fedpa.recmodels.personalization import PersonalModel, get_algorithm
from fedpa.simulations.cli import app
from fedpa.simulations.privacy_sweep import SweepPoint, make_grid
from fedpa.simulations.update_attack import run_update_attack

runner = CliRunner()


def _attack(tiny, tiny_foundation, tmp_path, **kw):
    # a memorizing local schedule on the shared adapter: what one update reveals is then large
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "attack", algorithm="fedavg-lora", max_clients=40,
                     local_epochs=10, lr=0.05, feature_cache="none", **kw)
    start = PersonalModel(load_foundation(cfg.foundation), get_algorithm(cfg.algorithm), seed=0,
                          **model_options(cfg)).get_shared()
    return run_update_attack(cfg, start, targets=32, runtime=ClientRuntime(cfg))


def test_one_update_leaks_membership_and_the_sum_or_local_noise_hides_it(tiny, tiny_foundation, tmp_path):
    plain = _attack(tiny, tiny_foundation, tmp_path)
    assert plain.cohort == 40 and plain.targets == 32
    assert plain.individual_auc > 0.65, plain            # the server without SecAgg
    assert plain.aggregate_auc < plain.individual_auc - 0.1, plain   # hidden among 40 users
    noisy = _attack(tiny, tiny_foundation, tmp_path, dp_noise_multiplier=1.0, dp_clip=0.1, dp_mode="local")
    assert abs(noisy.individual_auc - 0.5) < 0.08, noisy


def test_an_algorithm_without_updates_cannot_be_attacked(tiny, tiny_foundation, tmp_path):
    cfg = fed_config(tiny, tiny_foundation, tmp_path / "local", algorithm="local", max_clients=12,
                     feature_cache="none")
    with pytest.raises(ValueError, match="sends no updates"):
        run_update_attack(cfg, {}, runtime=ClientRuntime(cfg))


def test_grid_pairs_secagg_with_distributed_noise_and_lists_no_dp_once():
    points = make_grid([0, 1, 2], [0.5, 1.0], [False, True], "auto")
    names = [p.name for p in points]
    assert names.count("no-dp-plain") == 1 and names.count("no-dp-secagg") == 1
    assert SweepPoint(1.0, 0.5, True, "distributed") in points and SweepPoint(1.0, 0.5, False, "central") in points
    assert len(points) == 2 + 2 * 2 * 2
    assert all(p.secagg for p in make_grid([1], [1], [False, True], "distributed"))  # invalid pairs dropped
    with pytest.raises(ValueError):
        make_grid([-1], [1], [False], "auto")


def test_privacy_sweep_command_writes_table_plots_and_report(tiny, tiny_foundation, tmp_path):
    out = tmp_path / "sweep"
    args = ["privacy-sweep", "--data", str(tiny), "--foundation", str(tiny_foundation), "--out", str(out),
            "--noise", "0,1", "--clip", "0.5", "--secagg", "off,on", "--rounds", "1", "--max-clients", "12",
            "--attack-targets", "8", "--cohort-size", "4"]   # 3 nodes for every point: SecAgg+'s minimum
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "sweep.json").read_text())
    rows = {row["point"]: row for row in data["rows"]}
    assert set(rows) == {"no-dp-plain", "z1-C0.5-central-plain", "no-dp-secagg", "z1-C0.5-distributed-secagg"}
    assert rows["no-dp-plain"]["epsilon"] is None  # ∞: no DP
    central, distributed = rows["z1-C0.5-central-plain"], rows["z1-C0.5-distributed-secagg"]
    assert 0 < central["epsilon"] < math.inf and math.isclose(central["epsilon"], distributed["epsilon"])
    for row in rows.values():
        assert 0.0 <= row["gauc"][0] <= 1.0 and 0.0 <= row["server_view_attack_auc"][0] <= 1.0
        assert row["bytes_up_per_client_round"] > 0
    assert rows["no-dp-secagg"]["bytes_up_per_client_round"] != rows["no-dp-plain"]["bytes_up_per_client_round"]
    for name in ("sweep.md", "report.md", "utility_vs_epsilon.png", "attack_vs_epsilon.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "What the numbers mean" in report and "distributed" in report and "∞" in report
    check_sweep_page(out)                                  # the one-page report (tests/test_html_report.py)
    # a second call reuses the finished runs instead of training again
    summary = out / "no-dp-plain" / "seed-0" / "summary.json"
    before = summary.stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert summary.stat().st_mtime_ns == before


def test_privacy_sweep_rejects_a_bad_grid(tiny, tiny_foundation, tmp_path):
    r = runner.invoke(app, ["privacy-sweep", "--data", str(tiny), "--noise", "1,x"])
    assert r.exit_code == 2 and "bad grid" in r.output
    r = runner.invoke(app, ["privacy-sweep", "--data", str(tiny), "--noise", "1", "--secagg", "off",
                            "--dp-mode", "distributed"])
    assert r.exit_code == 2 and "empty" in r.output
