"""The Python API (simulations/api.py): the commands' functions from a notebook, run directories as DataFrames."""

from __future__ import annotations

import json
import math

import pytest

from fedpa.foundation.errors import FedpaError
from fedpa.simulations import api


def test_a_sweep_with_the_attack_asks_for_the_recipe_without_item_tables(tiny, tiny_foundation, tmp_path):
    base = dict(data_dir=str(tiny), foundation=str(tiny_foundation), num_rounds=1, max_clients=8)
    with pytest.raises(FedpaError, match="item_side=False"):
        api.privacy_sweep(api.config(**base), noises=[0], clips=[0.5], secagg=[False], seeds=[0], out=tmp_path)
    api.privacy_sweep(api.config(item_side=False, **base), noises=[1], clips=[0.5], secagg=[False], seeds=[0],
                      out=tmp_path / "sweep", attack_targets=6)
    points = api.load_sweep(tmp_path / "sweep")
    stored = {r["point"]: r for r in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]}
    assert list(points.index) == list(stored) == ["z1-C0.5-central-plain"]
    row = stored["z1-C0.5-central-plain"]
    assert 0 < points.loc["z1-C0.5-central-plain", "epsilon"] == row["epsilon"] < math.inf
    assert math.isclose(points.loc["z1-C0.5-central-plain", "gauc"], row["gauc"][0])


def test_bad_calls_are_named(tmp_path):
    with pytest.raises(FedpaError, match="unknown setting.*rounds"):
        api.config(rounds=3)
    for load, what in ((api.load_run, "not a run directory"), (api.load_compare, "not a comparison"),
                       (api.load_sweep, "not a privacy sweep")):
        with pytest.raises(FedpaError, match=what):
            load(tmp_path)


@pytest.fixture(scope="module")
def readme(tiny, tiny_foundation, tmp_path_factory):
    """The README's "From Python" block, executed once in a directory where its paths name this session's small
    data (two rounds of 12 clients instead of five rounds of all, to stay fast; and TensorBoard tracking on,
    which test_track_tensorboard reads from the same run instead of simulating one of its own); returns the
    directory and the block's variables."""
    import os
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"### From Python\n+```python\n(.*?)```", readme, re.S).group(1)
    root = tmp_path_factory.mktemp("readme")
    (root / "data").mkdir()
    (root / "runs").mkdir()
    (root / "data" / "small").symlink_to(tiny)
    (root / "runs" / "foundation").symlink_to(tiny_foundation)
    assert "num_rounds=5" in block
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exec(compile(block.replace("num_rounds=5", 'num_rounds=2, max_clients=12, track="tensorboard"'), "README.md",
                     "exec"), scope)
    finally:
        os.chdir(cwd)
    return root, scope


def test_track_tensorboard_logs_what_the_run_directory_holds(readme, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, scope = readme
    cfg, summary = scope["cfg"], scope["summary"]
    assert cfg.track == "tensorboard"
    rounds, _ = api.load_run(root / cfg.run_dir)
    acc = EventAccumulator(str(root / cfg.run_dir / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("val/gauc")}
    assert sorted(logged) == [0, 1, 2]
    for step, value in logged.items():
        assert math.isclose(value, rounds.loc[step, "val.gauc"], rel_tol=1e-6)      # float32 in the event file
    assert math.isclose(acc.Scalars("final/test/auc")[0].value, summary["test"]["auc"], rel_tol=1e-6)
    assert {"config/text_summary", "summary/text_summary"} <= set(acc.Tags()["tensors"])
    with pytest.raises(FedpaError, match="tensorboard"):
        api.config(data_dir=str(tiny), track="wandb")


def test_the_readmes_python_example_runs_as_it_stands(readme, tiny, monkeypatch):
    """The README's "From Python" block (the `readme` fixture runs it); then what its tables hold."""
    tmp_path, scope = readme
    monkeypatch.chdir(tmp_path)
    cfg, summary, rounds = scope["cfg"], scope["summary"], scope["rounds"]
    assert cfg.item_popularity and cfg.use_user_bias            # fedpa's recipe below what was given
    assert api.config(data_dir=str(tiny), use_user_bias=False).use_user_bias is False   # given beats the recipe
    assert list(rounds.index) == [0, 1, 2]
    assert summary == json.loads((tmp_path / "runs" / "nb" / "summary.json").read_text())
    assert math.isclose(rounds.loc[summary["best_round"], "test.gauc"], summary["test"]["gauc"])
    assert rounds.loc[2, "clients_ok"] == 12 and rounds.loc[2, "stage_s.train"] > 0
    with open(tmp_path / "runs" / "nb" / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "ev')                               # a crash mid-append
    assert len(api.load_run("runs/nb")[0]) == 3

    table = scope["table"]
    stored = json.loads((tmp_path / "runs" / "nb-compare" / "compare.json").read_text())["table"]
    assert list(table.index) == ["fedpa", "local"] and (tmp_path / "runs" / "nb-compare" / "compare.html").exists()
    assert math.isclose(table.loc["local", "gauc"], stored["local"]["gauc"][0])
    assert table.loc["fedpa", "gauc_std"] == 0.0 and table.loc["fedpa", "seeds"] == [0]
    groups = scope["groups"]
    for (name, group), row in groups.iterrows():
        assert math.isclose(row["share_worse"], stored[name]["by_activity"][group]["share_worse"][0])
    seed0 = json.loads((tmp_path / "runs" / "nb-compare" / "fedpa" / "seed-0" / "summary.json").read_text())
    assert groups["users"].groupby(level="algorithm").sum()["fedpa"] == seed0["test"]["per_user"]["users"] > 0
