"""What a resume can trust and what a careless or hostile party cannot slip past: sealed checkpoints, metrics cut
short by a crash, a privacy ledger that charges every release, a node's own privacy floor, δ well below 1/N."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fed_fixtures import finished_run

from fedpa.common.config import ConfigValueError, FederationConfig
from fedpa.server.rundir import RunDir, RunDirError


def test_a_flipped_bit_in_a_round_checkpoint_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(1, {"w": np.arange(64, dtype=np.float32)}, {"algorithm": "fedpa"})
    path = tmp_path / "run" / "checkpoints" / "round-0001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-17] ^= 0x40                       # one bit of the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(RunDirError, match="corrupted"):
        run.load_checkpoint()


def test_a_checkpoint_holding_nan_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(2, {"w": np.array([1.0, np.nan], np.float32)}, {"algorithm": "fedpa"})
    with pytest.raises(RunDirError, match="'w' holds NaN"):
        run.load_checkpoint()


def test_a_metrics_line_cut_short_by_a_crash_is_left_out_a_damaged_one_is_an_error(tmp_path):
    run = RunDir(tmp_path / "run")
    for r in range(3):
        run.append_metrics({"round": r})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "ev')                     # the append a SIGKILL interrupted
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2]
    run.truncate_metrics(2)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().endswith('{"round": 2}\n')
    (tmp_path / "run" / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl:2: malformed"):
        run.read_metrics()


def test_a_resume_that_fails_changes_nothing(tiny, tiny_foundation, tmp_path_factory, tmp_path):
    """A damaged metrics file is found before anything is touched: the finished run's summary stays."""
    from fedpa.simulations.simulate import simulate

    cfg = finished_run(tiny, tiny_foundation, tmp_path_factory, tmp_path / "run")  # 1 round, 4 clients, 2 a node
    summary = (tmp_path / "run" / "summary.json").read_text()   # a finished run, resumed as it was
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "run" / "metrics.jsonl").write_text(lines[0] + "\n{broken\n" + "\n".join(lines[1:]) + "\n")
    damaged = (tmp_path / "run" / "metrics.jsonl").read_text()
    from dataclasses import replace

    with pytest.raises(Exception, match="malformed metrics line"):
        simulate(replace(cfg, resume=True), cohort_size=2)
    assert (tmp_path / "run" / "summary.json").read_text() == summary
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == damaged


def test_the_privacy_ledger_charges_a_release_the_checkpoint_never_saw(tmp_path):
    run = RunDir(tmp_path / "run")
    for r in (1, 2, 2):            # round 2 released, then a crash before its checkpoint, then released again
        run.append_privacy_event({"round": r, "noise_multiplier": 1.0, "sample_size": 10})
    with open(tmp_path / "run" / "privacy_ledger.jsonl", "a") as f:
        f.write('{"round": 3, "noise')   # cut short: written before a release that never happened
    assert [e["round"] for e in run.read_privacy_ledger()] == [1, 2, 2]


def test_delta_defaults_to_well_below_one_over_n():
    from fedpa.server.federation import default_delta

    assert default_delta(10**6) == pytest.approx(10**-6.6) and default_delta(10**6) < 1e-6
    assert default_delta(1_000) == 1e-5 < 1 / 1_000


@pytest.mark.parametrize("change, words", [
    (dict(dp_noise_multiplier=1.0, robust_aggregation="median"), "robust aggregation cannot run under DP"),
    (dict(dp_noise_multiplier=math.nan), "dp-noise-multiplier must be a finite number"),
    (dict(dp_clip=math.inf), "dp-clip must be a finite number"),
])
def test_the_configuration_refuses_unsound_privacy(change, words):
    with pytest.raises(ConfigValueError, match=words):
        FederationConfig(**change).validate()


@pytest.mark.parametrize("node, round_cfg, cohort, refused", [
    ({"dp-min-noise-multiplier": "1.0"}, dict(dp_noise_multiplier=0.5), 10, "at least 1"),
    ({"dp-min-noise-multiplier": "1.0"}, dict(dp_noise_multiplier=1.0), 10, None),
    ({"dp-max-clip": "0.5"}, dict(dp_noise_multiplier=1.0, dp_clip=2.0), 10, "at most 0.5"),
    ({"dp-max-clip": "0.5"}, dict(), 10, "without DP"),
    ({"dp-max-cohort": "100"}, dict(dp_noise_multiplier=1.0), 10**9, "cohort of 1000000000"),
    ({"dp-max-cohort": "nan"}, dict(), 10, "must be finite"),
])
def test_a_node_refuses_a_round_below_its_own_privacy_floor(node, round_cfg, cohort, refused):
    from fedpa.client.app import NodePolicyError, check_node_policy

    cfg = FederationConfig(**round_cfg)
    if refused is None:
        check_node_policy(node, cfg, cohort)
    else:
        with pytest.raises(NodePolicyError, match=refused):
            check_node_policy(node, cfg, cohort)


def test_a_resumed_run_without_a_store_is_refused_by_the_nodes(tiny, tiny_foundation, tmp_path_factory, tmp_path):
    """Without a personal store the users' private adapters lived in the killed process's memory: training on
    would silently restart them, so a node refuses and the round fails naming why."""
    from dataclasses import replace

    from fedpa.simulations.simulate import simulate

    # round 1 of 4 clients (2 a node) finished, no personal store
    cfg = replace(finished_run(tiny, tiny_foundation, tmp_path_factory, tmp_path / "run"), num_rounds=2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())   # as if killed after round 1 of 2
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "num-rounds": 2}))
    with pytest.raises(Exception, match="private state in memory only"):
        simulate(replace(cfg, resume=True), cohort_size=2)
    error = json.dumps((tmp_path / "run" / "error.txt").read_text())
    assert "personal store" in error


def test_the_feature_cache_key_follows_the_foundation_config_and_every_data_file(tiny, tiny_foundation, tmp_path):
    """A foundation whose config changed without its shapes, or a day file rewritten in place, must not
    reuse the features computed before."""
    import os
    import shutil

    from fedpa.client.feature_cache import cache_key

    fd, data = tmp_path / "fd", tmp_path / "data"
    shutil.copytree(tiny_foundation, fd)
    shutil.copytree(tiny, data)
    users = np.arange(4)

    def key():
        return cache_key(str(fd), str(data), "by-day", 99, 0, users)

    first = key()
    assert key() == first
    (fd / "config.json").write_text((fd / "config.json").read_text() + "\n")
    second = key()
    assert second != first
    from fedpa.recdata.interest_graph import save_graph  # an interest graph widens histories: other rows

    save_graph(np.full((3, 2), -1, np.int32), fd)
    assert key() != second
    (fd / "interest_graph.npy").unlink()
    assert key() == second
    day = sorted((data / "exposures").glob("*.arrow"))[0]
    st = day.stat()
    os.utime(day, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert key() != second
