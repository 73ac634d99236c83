"""A run's summary warns when its own training curves say the run did not train as it should."""

from __future__ import annotations

import json
import math

from fedpa.server.health import training_warnings
from fedpa.simulations.compare import aggregate, markdown_table


def history(losses: list[float | None]) -> list[dict]:
    return [{"round": 0, "eval": {}}] + [{"round": r, "train_loss": v} for r, v in enumerate(losses, start=1)]


def test_a_normal_run_and_one_that_does_not_train_get_no_warning():
    assert training_warnings(history([0.162, 0.162, 0.159, 0.158, 0.157]), best_round=5) == []
    # FedAvg-LoRA on `small`: its loss creeps up by 2 %, which is not a divergence
    assert training_warnings(history([0.167, 0.168, 0.169, 0.17, 0.17]), best_round=3) == []
    assert training_warnings(history([0.167, 0.168, 0.169, 0.171]), best_round=3) == []
    assert training_warnings([{"round": 0, "eval": {}}], best_round=0) == []   # the frozen foundation


def test_pfedrec_at_its_official_step_on_a_large_catalogue_is_called_diverging():
    """The demo's PFedRec before 2026-12-07: the loss grew every round and round 0 stayed the best."""
    got = training_warnings(history([8.229, 15.91, 21.22, 27.03, 29.84]), best_round=0)
    assert got[0] == ("the training loss rose in each of the last 4 rounds (8.229 in round 1, 29.84 in round 5): "
                      "the steps are likely too large")
    assert got[1] == "no round improved the validation metric on round 0, the starting point"
    assert "tune_baseline.py" in got[-1] and len(got) == 3
    # rising for two rounds only, or by less than half: no divergence claimed
    assert training_warnings(history([1.0, 0.9, 1.2, 1.6]), best_round=2) == []


def test_a_loss_that_runs_away_or_stops_being_finite_is_named_with_its_rounds():
    """FedRAP over 20 rounds on `small`: its unbounded -λ·MSE term took the loss to -inf."""
    losses = [0.518, 0.506, 0.48, 0.437, 0.433, 0.352, -6.993, -2148.9, -math.inf, -math.inf]
    got = training_warnings(history(losses), best_round=6)
    assert got[0] == "the training loss is not finite from round 9 on"
    assert got[1] == "the training loss ran away: 0.518 in round 1, -6.993 in round 7"
    assert len(got) == 3
    assert training_warnings(history([0.5, math.nan]), best_round=1)[0] == \
        "the training loss is not finite from round 2 on"


def summary(seed: int, warnings: list[str], **more) -> dict:
    """A run's summary as `compare` reads it, every figure the same."""
    return {"seed": seed, "test": {"auc": 0.7, "gauc": 0.6, "logloss": 0.5, "f1": 0.6}, "best_round": 1,
            "bytes_up_per_client_round": 0.0, "bytes_down_per_client_round": 0.0, "seconds_per_round": 1.0,
            "wall_s": 1.0, "warnings": warnings,
            "model": {"shared_params": 1, "private_params_per_user": 1, "foundation_params": 1}, **more}


def test_compare_lists_each_runs_warnings_under_its_table():
    table = aggregate({"fedpa": [summary(0, []), summary(1, [])],
                       "pfedrec": [summary(0, ["the training loss rose", "search"]), summary(1, [])]})
    md = markdown_table(table)
    assert md.endswith("- **pfedrec**, seed 0: the training loss rose; search.")
    assert "fedpa**" not in md
    assert "Warnings" not in markdown_table(aggregate({"fedpa": [summary(0, [])]}))


def test_the_compare_page_shows_the_warnings_beside_its_table(tmp_path):
    from fedpa.simulations.html_report import compare_page

    def run(name: str, warnings: list[str]) -> dict:
        path = tmp_path / name / "seed-0"
        path.mkdir(parents=True)
        (path / "metrics.jsonl").write_text("".join(
            json.dumps({"round": r, "eval": {"val": {"gauc": 0.6}}}) + "\n" for r in range(2)))
        return summary(0, warnings, run_dir=str(path))

    summaries = {"fedpa": [run("fedpa", [])], "pfedrec": [run("pfedrec", ["the loss <rose>"])]}
    page = compare_page(aggregate(summaries), summaries, {}, tmp_path / "compare.html").read_text()
    assert "<li><b>pfedrec</b>, seed 0: the loss &lt;rose&gt;.</li>" in page and "<b>fedpa</b>" not in page


def test_the_privacy_sweep_lists_a_points_warnings_under_its_table():
    """Under heavy noise a run may diverge; its point must not read as that noise's utility alone."""
    from fedpa.simulations.privacy_sweep import SweepPoint, aggregate_point
    from fedpa.simulations.privacy_sweep import markdown_table as sweep_table

    def run(seed: int, warnings: list[str]) -> dict:
        return summary(seed, warnings, run_dir=f"runs/s{seed}", final={"test": {"auc": 0.7, "gauc": 0.6}},
                       differential_privacy={"epsilon": 3.0, "delta": 1e-5, "rounds_accounted": 2},
                       membership_inference={"auc": 0.5},
                       update_attack={"individual_auc": 0.6, "aggregate_auc": 0.5, "cohort": 8})

    calm = aggregate_point(SweepPoint(0.5, 1.0, False, "central"), [run(0, []), run(1, [])], "by-day")
    loud = aggregate_point(SweepPoint(5.0, 1.0, False, "central"), [run(0, []), run(1, ["the loss ran away"])],
                           "by-day")
    md = sweep_table([calm, loud], "by-day")
    assert md.endswith("- **z5-C1-central-plain**, seed 1: the loss ran away.")
    assert "Warnings" not in sweep_table([calm], "by-day")


def test_compare_shows_a_spread_only_where_there_are_several_seeds():
    """One seed has no spread: its row shows the value, not "± 0.0000" (which would read as a measured zero)."""
    one = markdown_table(aggregate({"fedpa": [summary(0, [])]}))
    two = markdown_table(aggregate({"fedpa": [summary(0, []), summary(1, [], test={"auc": 0.8, "gauc": 0.6,
                                                                                   "logloss": 0.5, "f1": 0.6})]}))
    assert "| fedpa | 0.7000 | 0.6000 |" in one and "±" not in one
    from fedpa.simulations.compare import markdown_by_activity

    by = {"users": 10, "metric": [0.6, 0.0], "share_better": [0.5, 0.0], "share_worse": [0.2, 0.0],
          "change_mean": [0.01, 0.0]}
    assert markdown_by_activity({"fedpa": {"seeds": [0], "by_activity": {"1-9": by}}}).endswith(
        "| fedpa | 1-9 | 10 | 50.0% | 20.0% | +0.0100 |")
    assert markdown_by_activity({"fedpa": {"seeds": [0, 1], "by_activity": {"1-9": by}}}).endswith("+0.0100 ± 0.0000 |")
    assert "| fedpa | 0.7500 ± 0.0707 | 0.6000 ± 0.0000 |" in two
