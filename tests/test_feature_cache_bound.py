"""The feature cache's root stays bounded: least recently used entries go first, entries a process holds
open never do, and leftovers of killed builds are cleaned up (client/feature_cache.py, `fedpa cache`)."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedpa.client.feature_cache import SPLITS, FeatureCache, entries, prune

MIB = 2**20


def make_entry(root: Path, key: str, mib: int, used_hours_ago: float, data: str = "") -> Path:
    """A complete entry of about ``mib`` MiB (valid arrays for two users, padded), last used that long ago."""
    d = root / key
    d.mkdir(parents=True)
    for s in SPLITS:
        np.save(d / f"{s}.features.npy", np.zeros((4, 3), np.float32))
        np.save(d / f"{s}.labels.npy", np.zeros((4, 1), np.float32))
        np.save(d / f"{s}.items.npy", np.zeros((4, 2), np.int64))
        np.save(d / f"{s}.offsets.npy", np.array([0, 2, 4]))
    (d / "pad.bin").write_bytes(b"\0" * (mib * MIB))
    (d / "meta.json").write_text(json.dumps({"users": [0, 1], "group_size": 1, "format": 2,
                                             "source": {"data": data, "split": "loo", "seed": 0}}))
    t = time.time() - used_hours_ago * 3600
    os.utime(d / "meta.json", (t, t))
    return d


def keys(listed) -> list[str]:
    return [e.key for e in listed]


def test_entries_are_listed_least_recently_used_first_with_their_size_and_source(tmp_path):
    make_entry(tmp_path, "new", 1, 0.1, data="/d/new")
    make_entry(tmp_path, "old", 2, 5.0, data="/d/old")
    (tmp_path / ".old.tmp-x").mkdir()     # a build in progress is not an entry
    listed = entries(tmp_path)
    assert keys(listed) == ["old", "new"]
    assert 2 * MIB <= listed[0].bytes < 2 * MIB + 4096
    assert listed[0].source["data"] == "/d/old"
    assert not any(e.in_use for e in listed)
    assert entries(tmp_path / "absent") == []


def test_prune_to_a_size_removes_the_least_recently_used_and_keeps_what_is_open_or_kept(tmp_path):
    oldest = make_entry(tmp_path, "a-oldest", 3, 10)
    held = make_entry(tmp_path, "b-held", 3, 8)
    kept = make_entry(tmp_path, "c-kept", 3, 6)
    make_entry(tmp_path, "d-middle", 3, 4)
    make_entry(tmp_path, "e-newest", 3, 1)
    cache = FeatureCache(held)            # opening touches it: it becomes the most recently used
    assert keys(entries(tmp_path))[-1] == "b-held"
    assert [e.key for e in entries(tmp_path) if e.in_use] == ["b-held"]
    os.utime(held / "meta.json", (time.time() - 9 * 3600,) * 2)   # ... make it the oldest again
    # 15 MiB held, at most 7 allowed: everything removable goes, oldest first, except the open and kept ones
    removed = prune(tmp_path, max_bytes=7 * MIB, keep=[kept])
    assert keys(removed) == ["a-oldest", "d-middle", "e-newest"]
    assert not oldest.exists()
    assert sorted(keys(entries(tmp_path))) == ["b-held", "c-kept"]
    assert cache.user(1)[0].features.shape == (2, 3)   # the open entry still reads
    del cache
    gc.collect()                          # closing releases the lock: now it may go
    assert keys(prune(tmp_path, max_bytes=4 * MIB, keep=[kept])) == ["b-held"]
    assert keys(entries(tmp_path)) == ["c-kept"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no trash left behind"


def test_prune_stops_as_soon_as_the_rest_fits(tmp_path):
    for i, key in enumerate("abcd"):
        make_entry(tmp_path, key, 2, 10 - i)
    assert keys(prune(tmp_path, max_bytes=5 * MIB)) == ["a", "b"]
    assert keys(prune(tmp_path, max_bytes=5 * MIB)) == []


def test_prune_by_idle_time_and_dry_run(tmp_path):
    make_entry(tmp_path, "week", 1, 24 * 8)
    make_entry(tmp_path, "day", 1, 24 * 2)
    make_entry(tmp_path, "hour", 1, 1)
    assert keys(prune(tmp_path, unused_for_s=3 * 86400, dry_run=True)) == ["week"]
    assert len(entries(tmp_path)) == 3, "a dry run removes nothing"
    assert keys(prune(tmp_path, unused_for_s=86400)) == ["week", "day"]
    assert keys(entries(tmp_path)) == ["hour"]


def test_prune_cleans_up_after_killed_builds_and_removals_but_not_a_running_build(tmp_path):
    make_entry(tmp_path, "e", 1, 1)
    stale, running, trash = tmp_path / ".k1.tmp-a", tmp_path / ".k2.tmp-b", tmp_path / ".trash-k3-99"
    for d in (stale, running, trash):
        d.mkdir()
        (d / "train.features.npy").write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    assert prune(tmp_path, max_bytes=10 * MIB) == []
    assert not stale.exists() and not trash.exists()
    assert running.exists() and (tmp_path / "e").exists()


def test_an_entry_held_open_by_another_process_is_in_use_until_that_process_ends(tmp_path):
    entry = make_entry(tmp_path, "shared", 1, 1)
    code = ("import sys, time; from pathlib import Path; from fedpa.client.feature_cache import FeatureCache; "
            f"c = FeatureCache(Path({str(entry)!r})); print('open', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        assert [e.in_use for e in entries(tmp_path)] == [True]
        assert prune(tmp_path, max_bytes=0) == []
        assert entry.exists()
    finally:
        proc.kill()
        proc.wait()
    assert keys(prune(tmp_path, max_bytes=0)) == ["shared"]


def test_a_simulation_bounds_the_cache_after_building_an_entry(tiny, tiny_foundation, tmp_path, caplog):
    """ensure_feature_cache builds this run's entry, records what it was made from, and removes the least
    recently used others beyond feature-cache-limit-gb — never its own."""
    from fedpa.client.runtime import ensure_feature_cache
    from fedpa.common.config import FederationConfig

    root = tmp_path / "cache"
    make_entry(root, "stale", 2, 48)
    cfg = FederationConfig(data_dir=str(tiny), foundation=str(tiny_foundation), feature_cache=str(root),
                           max_clients=6, feature_cache_limit_gb=1 / 1024)   # 1 MiB
    with caplog.at_level(logging.WARNING, logger="fedpa.client"):
        first = ensure_feature_cache(cfg)
    assert keys(entries(root)) == [first.path.name], "the stale entry is gone, this run's stays"
    assert "removed 1 least recently used entries" in caplog.text
    src = entries(root)[0].source
    assert src["data"] == str(Path(tiny).resolve()) and src["seed"] == 0 and src["users"] == len(first.users)
    room = 1.5 * entries(root)[0].bytes / 2**30     # one entry fits, two do not
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedpa.client"):
        second = ensure_feature_cache(replace(cfg, seed=1, feature_cache_limit_gb=room))
    assert sorted(keys(entries(root))) == sorted([first.path.name, second.path.name]), "the first is open"
    assert "what remains is in use or this run's own entry" in caplog.text
    del first
    gc.collect()                                      # closed: now the least recently used one that may go
    third = ensure_feature_cache(replace(cfg, seed=2, feature_cache_limit_gb=room))
    assert sorted(keys(entries(root))) == sorted([second.path.name, third.path.name])
    unbounded = ensure_feature_cache(replace(cfg, seed=3, feature_cache_limit_gb=0.0))
    assert len(entries(root)) == 3 and unbounded.path.name in keys(entries(root))


@pytest.mark.parametrize("args, words", [
    ([], "say what to remove"),
    (["--max-gb", "-1"], "--max-gb must be >= 0"),
])
def test_fedpa_cache_prune_refuses_a_request_that_says_nothing_or_nonsense(tmp_path, args, words):
    from typer.testing import CliRunner

    from fedpa.simulations.cli import app

    make_entry(tmp_path, "e", 1, 1)
    r = CliRunner().invoke(app, ["cache", "prune", "--root", str(tmp_path), *args])
    assert r.exit_code == 2 and words in r.output
    assert (tmp_path / "e").exists()


def test_fedpa_cache_list_and_prune(tmp_path):
    from typer.testing import CliRunner

    from fedpa.simulations.cli import app

    make_entry(tmp_path, "old", 1, 36, data="/data/ml")
    make_entry(tmp_path, "new", 1, 1)
    runner = CliRunner()
    r = runner.invoke(app, ["cache", "list", "--root", str(tmp_path)])   # not a terminal: one line per entry
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(f"# {tmp_path}: 2 entries") and lines[1].split("\t")[0] == "entry"
    old = lines[2].split("\t")
    assert old[0] == "old" and old[2] == "1.5 d ago" and old[6] == "/data/ml" and len(lines) == 4
    from fedpa.simulations.cli.cache import _short

    assert _short(str(Path.cwd() / "data" / "ml")) == "data/ml"
    assert _short("/elsewhere/ml") == "/elsewhere/ml"
    r = runner.invoke(app, ["cache", "prune", "--root", str(tmp_path), "--unused-days", "1", "--dry-run"])
    assert r.exit_code == 0 and "would remove 1 entries" in r.output and (tmp_path / "old").exists()
    r = runner.invoke(app, ["cache", "prune", "--root", str(tmp_path), "--all"])
    assert r.exit_code == 0 and "removed 2 entries" in r.output
    assert entries(tmp_path) == []
