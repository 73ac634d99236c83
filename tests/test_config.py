"""One configuration, declared once: everything that spells its keys derives from FederationConfig's fields."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpa.common.config import (
    FIELDS,
    NODE_KEYS,
    ConfigValueError,
    FederationConfig,
    parse_run_config,
    pyproject_table,
    reference_markdown,
)

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_key_with_its_default():
    """Flower only accepts --run-config keys that pyproject.toml declares: all of them, as generated."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == FederationConfig().to_run_config()
    assert tomllib.loads(pyproject_table())["tool"]["flwr"]["app"]["config"] == table


def test_the_reference_page_is_generated_from_the_fields():
    assert (REPO / "docs" / "configuration.md").read_text() == reference_markdown(), \
        "run `python -m fedpa.common.config --write`"
    for key in FIELDS:
        assert f"| `{key}` |" in reference_markdown()


def test_every_offered_key_is_an_option_of_simulate_with_its_help():
    from fedpa.simulations.cli import app

    text = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "400"}, terminal_width=400).output
    for key, f in FIELDS.items():
        if key == "resume":  # simulate's own --resume takes the run directory to continue
            continue
        option = f.metadata["option"] or f"--{key}"
        assert bool(re.search(re.escape(option) + r"(?![\w-])", text)) == f.metadata["cli"], key
    assert "the federated algorithm (fedpa | local" in text


def test_the_runtime_key_holds_every_field_that_builds_the_runtime():
    base = FederationConfig()
    for f in dataclasses.fields(FederationConfig):
        value = getattr(base, f.name)
        other = (not value) if isinstance(value, bool) else (value + 1 if isinstance(value, (int, float))
                                                             else value + "x")
        changed = dataclasses.replace(base, **{f.name: other})
        assert (changed.runtime_key() != base.runtime_key()) == f.metadata["runtime"], f.name


def test_node_keys_are_the_personal_store_its_key_and_the_device_data():
    assert NODE_KEYS == ("personal-store", "personal-store-key-file", "device-data")


@pytest.mark.parametrize("key", ["lr", "dp-noise-multiplier", "dp-clip", "clients-per-round", "round-timeout",
                                 "dp-delta", "foundation-logit-scale", "item-bias-prior"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan"])
def test_a_non_finite_number_is_refused(key, value):
    with pytest.raises(ConfigValueError, match=key):
        FederationConfig.from_run_config({key: value})


def test_choices_come_from_the_field():
    with pytest.raises(ConfigValueError, match=r"unknown split .weekly. \(by-day, chrono, loo, last\)"):
        FederationConfig.from_run_config({"split": "weekly"})
    with pytest.raises(ConfigValueError, match="unknown configuration key"):
        FederationConfig.from_run_config({"num-round": 3})


def test_a_run_config_is_parsed_once_per_process_and_copied():
    rc = {"num-rounds": 3, "lr": 0.05}
    a, b = parse_run_config(rc), parse_run_config(dict(rc))
    assert a == b and a is not b
    a.num_rounds = 99
    assert parse_run_config(rc).num_rounds == 3


def test_cli_settings_layer_file_then_set_then_options(tmp_path):
    from fedpa.simulations.cli.common import Settings

    f = tmp_path / "run.toml"
    f.write_text('lr = 0.5\nrank = 8\nalgorithm = "local"\n')
    cfg = Settings(f, ["rank=16", "item-bias-fields=upload_type", "secagg=true"], {"algorithm": "ditto"}).resolve()
    assert (cfg.lr, cfg.rank, cfg.algorithm, cfg.item_bias_fields, cfg.secagg) == (0.5, 16, "ditto", "upload_type",
                                                                                    True)
    with pytest.raises(ConfigValueError, match="--set takes KEY=VALUE"):
        Settings(None, ["rank"], {}).resolve()


def test_simulate_reports_a_bad_setting_in_one_line(tmp_path):
    from fedpa.simulations.cli import app

    res = CliRunner().invoke(app, ["simulate", "--lr", "nan", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "lr must be a finite number" in res.output and "Traceback" not in res.output
