"""The `fedpa` command as a user runs it: results on success, one clear line and exit code 2 on mistakes."""

import json

import pytest
from typer.testing import CliRunner

from fedpa.simulations.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    res = runner.invoke(app, ["data", "synth", "--preset", "tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_synth_and_inspect(tiny_dir):
    res = runner.invoke(app, ["data", "inspect", str(tiny_dir), "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)
    assert stats["users"] == 200 and stats["days"] == 4
    assert stats["exposures"] > 0 and 0.2 < stats["label_rates"]["effective_view"] < 0.6
    assert set(stats["stage_samples_per_stage"]) == {"prerank_neg", "coarse_neg", "rank_neg", "rank_pos",
                                                      "rerank_neg", "rerank_pos"}


@pytest.mark.parametrize("args, message", [
    (["data", "inspect", "/nonexistent/dataset"], "not a fedpa dataset"),
    (["data", "synth", "--preset", "huge", "--out", "/tmp/never-written"], "huge"),
    (["pretrain", "--data", "/nonexistent", "--epochs", "0"], "--epochs"),
    (["pretrain", "--data", "/nonexistent", "--dropout", "1"], "--dropout must be auto or a rate in [0, 1), got 1"),
    (["pretrain", "--data", "/nonexistent", "--dropout", "some"], "a rate in [0, 1), got 'some'"),
    (["simulate", "--algorithm", "fedsgd"], "unknown algorithm 'fedsgd'"),
    (["simulate", "--rounds", "-1"], "num-rounds must be >= 0"),
    (["simulate", "--rank", "0"], "rank must be >= 1"),
    (["simulate", "--cohort-engine", "gpu"], "unknown cohort-engine 'gpu' (vectorized, loop)"),
    (["simulate", "--lr-decay", "1.5"], "lr-decay must be in (0, 1], got 1.5"),
    (["simulate", "--algorithm", "fedrap", "--fedrap-item-lr", "2000000"],
     "fedrap-item-lr x fedrap-weight-decay must be < 1, got 2e+06 x 0.0001"),
    (["compare", "--algorithms", "fedpa,bogus"], "unknown algorithm or ablation 'bogus'"),
    (["compare", "--seeds", "0"], "--seeds"),
    (["data", "synth", "--preset", "tiny", "--out", "/tmp/never-written", "--set", "n_userz=5"],
     "unknown parameter 'n_userz'"),
    (["data", "synth", "--preset", "tiny", "--out", "/tmp/never-written", "--set", "n_users=many"],
     "'many' is not a valid int"),
    (["data", "synth", "--preset", "tiny", "--out", "/tmp/never-written", "--set", "interest_persistence"],
     "expected KEY=VALUE"),
    (["data", "synth", "--preset", "tiny", "--out", "/tmp/never-written", "--set", "interest_persistence=2"],
     "'interest_persistence' must be in [0, 1]"),
])
def test_user_mistakes_exit_2_with_a_clear_message(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_simulate_names_missing_inputs(tiny_dir, tmp_path):
    res = runner.invoke(app, ["simulate", "--data", str(tiny_dir), "--foundation", str(tmp_path / "none")])
    assert res.exit_code == 2
    assert "no foundation checkpoint" in res.output and "fedpa pretrain" in res.output
    res = runner.invoke(app, ["simulate", "--data", str(tmp_path), "--foundation", str(tmp_path)])
    assert res.exit_code == 2 and "not a fedpa dataset" in res.output
    (tmp_path / "fd").mkdir()
    (tmp_path / "fd" / "config.json").write_text("{}")              # model.safetensors deleted
    res = runner.invoke(app, ["simulate", "--data", str(tiny_dir), "--foundation", str(tmp_path / "fd"),
                              "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2 and "model.safetensors: missing" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()                            # refused before anything was written
    res = runner.invoke(app, ["pretrain", "--data", str(tiny_dir), "--out", str(tmp_path / "p"), "--batch-size", "0"])
    assert res.exit_code == 2 and "batch size must be a whole number >= 1, got 0" in res.output
    assert not (tmp_path / "p").exists()


def test_synth_overrides_reach_the_world(tmp_path):
    out = tmp_path / "custom"
    res = runner.invoke(app, ["data", "synth", "--preset", "tiny", "--out", str(out), "--days", "1",
                              "--set", "n-users=40", "--set", "interest_persistence=0.5",
                              "--set", "stage_noise=0.9,0.7,0.5,0.3,0.2"])
    assert res.exit_code == 0, res.output
    generator = json.loads((out / "manifest.json").read_text())["generator"]
    assert generator["n_users"] == 40 and generator["interest_persistence"] == 0.5
    assert generator["stage_noise"] == [0.9, 0.7, 0.5, 0.3, 0.2]


def test_existing_dataset_is_not_overwritten_without_flag(tiny_dir):
    res = runner.invoke(app, ["data", "synth", "--preset", "tiny", "--out", str(tiny_dir)])
    assert res.exit_code == 2 and "already exists" in res.output


def test_bad_inputs_to_runs_name_what_is_wrong(tiny, tiny_foundation, tmp_path):
    """Unknown group attribute, resume without / with a damaged checkpoint, export of a foreign run."""
    base = ["--data", str(tiny), "--foundation", str(tiny_foundation), "--max-clients", "6", "--rounds", "1"]
    res = runner.invoke(app, ["simulate", *base, "--group-attributes", "shoe_size", "--run-dir", str(tmp_path / "g")])
    assert res.exit_code == 2 and "shoe_size" in res.output and "Traceback" not in res.output

    res = runner.invoke(app, ["simulate", "--resume", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a run directory" in res.output

    run = tmp_path / "run"
    assert runner.invoke(app, ["simulate", *base, "--run-dir", str(run), "--cohort-size", "3"]).exit_code == 0
    res = runner.invoke(app, ["simulate", "--resume", str(run), "--rounds", "3"])
    assert res.exit_code == 2 and "--resume continues a run with its own configuration" in res.output
    ckpt = run / "checkpoints" / "round-0001.safetensors"
    ckpt.write_bytes(b"\x00" * 64)  # damaged on disk
    res = runner.invoke(app, ["simulate", "--resume", str(run), "--cohort-size", "3"])
    assert res.exit_code == 2 and "cannot read checkpoint" in res.output, res.output
    assert (run / "summary.json").exists()  # a failed resume loses nothing
    res = runner.invoke(app, ["export", "--run", str(run), "--user", "1", "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (tmp_path / "e" / "model.onnx").exists()


def test_quiet_prints_no_progress_and_verbose_shows_the_log(tiny, tiny_foundation, tmp_path):
    import subprocess
    import sys

    def fedpa(*args):
        return subprocess.run([sys.executable, "-m", "fedpa.simulations.cli", *args], capture_output=True,
                              text=True, timeout=300)

    small = ["--days", "2", "--set", "n-users=40"]                        # the output, not the data, is tested
    quiet = fedpa("--quiet", "data", "synth", "--preset", "tiny", "--out", str(tmp_path / "q"), *small)
    normal = fedpa("data", "synth", "--preset", "tiny", "--out", str(tmp_path / "n"), *small)
    assert quiet.returncode == normal.returncode == 0
    assert "days: 1/2" in normal.stderr and quiet.stderr == ""           # not a terminal: plain progress lines
    assert quiet.stdout.splitlines()[-1] == normal.stdout.splitlines()[-1]  # the result is printed either way
    loud = fedpa("--verbose", "simulate", "--data", str(tiny), "--foundation", str(tiny_foundation), "--rounds", "1",
                 "--max-clients", "4", "--run-dir", str(tmp_path / "run"), "--feature-cache", "none")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "INFO fedpa.server: run finished: best round 1" in loud.stderr
    both = fedpa("--quiet", "--verbose", "data", "inspect", str(tiny))
    assert both.returncode == 2 and "contradict" in both.stderr


def test_device_executor_needs_to_know_how_to_reach_its_supernode():
    res = runner.invoke(app, ["device", "executor", "--runtime-api-address", "127.0.0.1:1"])
    assert res.exit_code != 0 and "--insecure or --root-certificates" in res.output
