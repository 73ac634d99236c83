"""What every `fedpa` command shares: the Typer app, the consoles, one-line errors, and the configuration
options derived from `FederationConfig`'s fields."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import tomllib
import typing
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpa.common.config import FIELDS, SECTIONS, ConfigValueError, FederationConfig, field_type, with_recipe
from fedpa.foundation.errors import FedpaError
from fedpa.simulations.progress import console, set_verbosity

app = typer.Typer(help="fedpa: federated personalization of recommenders with adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Create, import and inspect canonical datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Piped output (a log file, CI, `| less`) is read in full later: rich's 80 columns off a terminal would cut a
# results table's cells ("pretrai…"), so it gets room unless COLUMNS says otherwise.
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)


@app.callback()
def _verbosity(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines, only results and errors")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also Flower's and fedpa's log lines")] = False,
):
    """fedpa: federated personalization of recommenders with adapters."""
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose contradict each other")
    set_verbosity(-1 if quiet else 1 if verbose else 0)

# OS and value errors a user's input can cause (an unwritable output, a file where a folder belongs, ...):
# reported in one line like fedpa's own errors.
USER_ERRORS = (FedpaError, OSError)


def user_errors(fn):
    """Report a user's mistake as one clear line and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            console.print(f"[bold red]error:[/] {_one_line(e)}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


# ----------------------------------------------------------------------------- configuration options


def config_options(*, exclude: Iterable[str] = ()):
    """Give a command one option per configuration key (every `FederationConfig` field offered to the CLI,
    grouped by section in --help), plus ``--config FILE`` and ``--set KEY=VALUE``. The command receives them
    as one argument, ``settings`` (`Settings`), which `Settings.resolve` turns into a validated configuration.
    ``exclude``: dashed keys the command sets itself or offers under its own name."""
    skipped = set(exclude)
    unknown = skipped - set(FIELDS)
    assert not unknown, unknown

    def deco(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # the command's own options, resolved in its module
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name != "settings"]
        taken = {p.name for p in own}
        added = [
            inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                Path | None, typer.Option(help="TOML file with configuration keys (docs/configuration.md)",
                                          rich_help_panel="Configuration")]),
            inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                list[str] | None, typer.Option("--set", help="KEY=VALUE: any configuration key (repeatable)",
                                               rich_help_panel="Configuration")]),
        ]
        keys = []
        for key, f in FIELDS.items():
            if key in skipped or not f.metadata["cli"]:
                continue
            name = f.name
            assert name not in taken, f"{fn.__name__}: option {name} collides with a configuration key"
            keys.append(key)
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                           annotation=_option(key, f)))

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            given = {k: kwargs.pop(FIELDS[k].name) for k in keys}
            settings = Settings(kwargs.pop("config"), kwargs.pop("set_") or [],
                                {k: v for k, v in given.items() if v is not None})
            return fn(*args, settings=settings, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + added, return_annotation=inspect.Signature.empty)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return deco


def _option(key: str, f) -> Any:
    m, typ = f.metadata, field_type(f)
    text = m["help"]
    if m["choices"] is not None:
        text += " (" + " | ".join(c if c else '""' for c in m["choices"]) + ")"
    text = escape(text)
    decls = [m["option"] or f"--{key}"]
    if typ is bool:
        decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
    panel = SECTIONS[m["section"]].split(":")[0]
    return Annotated[typ | None, typer.Option(*decls, help=text, rich_help_panel=panel, show_default=False)]


class Settings:
    """The configuration a user gave one command: a TOML file, ``--set`` items and explicit options, in
    increasing precedence."""

    def __init__(self, config_file: Path | None, set_items: list[str], options: dict[str, Any]):
        self.config_file, self.set_items, self.options = config_file, set_items, options

    @property
    def keys(self) -> set[str]:
        """The configuration keys the user set (dashed), wherever: what an algorithm's recipe never replaces."""
        keys = set(self.options)
        if self.config_file is not None:
            keys |= set(read_toml(self.config_file))
        keys |= {item.partition("=")[0].strip() for item in self.set_items}
        return keys

    @property
    def given(self) -> list[str]:
        """The command-line options given (as typed), for commands that refuse them in some modes."""
        out = [f"--{k}" for k in self.options]
        if self.config_file is not None:
            out.append("--config")
        if self.set_items:
            out.append("--set")
        return out

    def resolve(self, recipe: bool = True, item_side: bool = True, **defaults: Any) -> FederationConfig:
        """The validated configuration; ``defaults`` (dashed or underscored keys) sit below everything the
        user gave, and with ``recipe`` the algorithm's own settings (`with_recipe`) below that too."""
        base = {k.replace("_", "-"): v for k, v in defaults.items() if v is not None}
        if self.config_file is not None:
            base.update(read_toml(self.config_file))
        for item in self.set_items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigValueError(f"--set takes KEY=VALUE, got '{item}'")
            base[key.strip()] = _toml_value(value.strip())
        base.update(self.options)
        cfg = FederationConfig.from_run_config(base)
        return with_recipe(cfg, self.keys | {k.replace("_", "-") for k in defaults}, item_side) if recipe else cfg


def read_toml(path: Path) -> dict:
    if not path.exists():
        raise FedpaError(f"{path}: no such configuration file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FedpaError(f"{path}: not valid TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FedpaError(f"{path}: cannot be read ({e})") from None


def _toml_value(text: str) -> Any:
    """A --set value: a TOML value when it parses as one (1, 0.5, true, "x"), else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def print_summary(summary: dict, run_dir: str) -> None:
    t = Table(title=f"{summary['algorithm']}: test at best validation round {summary['best_round']}")
    t.add_column("metric")
    t.add_column("value")
    for k, v in summary["test"].items():
        if isinstance(v, dict):
            continue
        whole = k in ("n", "gauc_users", "cases")
        t.add_row(k, f"{v:,.0f}" if whole else f"{v:.4f}" if isinstance(v, float) else str(v))
    spread = summary["test"].get("per_user")
    if spread and "p50" in spread:
        metric = "NDCG@10" if "hr@10" in summary["test"] else "AUC"
        t.add_row(f"per-user {metric} p10 / p50 / p90",
                  f"{spread['p10']:.4f} / {spread['p50']:.4f} / {spread['p90']:.4f} ({spread['users']:,.0f} users)")
    if spread and "share_worse" in spread:
        t.add_row("users worse / better than the foundation",
                  f"{spread['share_worse']:.1%} / {spread['share_better']:.1%} "
                  f"(mean change {spread['change_mean']:+.4f})")
    for g in (spread or {}).get("by_activity", []):
        if "share_worse" in g:
            t.add_row(f"  users with {g['group']} training rows",
                      f"{g['users']:,.0f}: worse / better {g['share_worse']:.1%} / {g['share_better']:.1%} "
                      f"(mean change {g['change_mean']:+.4f})")
    t.add_row("bytes up / client / round", f"{summary['bytes_up_per_client_round']:,.0f}")
    t.add_row("bytes down / client / round", f"{summary['bytes_down_per_client_round']:,.0f}")
    t.add_row("seconds / round", f"{summary['seconds_per_round']:.2f}")
    mia = summary.get("membership_inference")
    if mia:
        t.add_row("membership-inference attack AUC", f"{mia['auc']:.4f} (0.5 = nothing learned; per user "
                                                     f"{mia['per_user_auc']:.4f})")
    dp = summary.get("differential_privacy")
    if dp:
        t.add_row("privacy", f"ε = {dp['epsilon']:.3f} at δ = {dp['delta']:.2g} ({dp.get('mode', 'central')}, "
                             f"z = {dp['noise_multiplier']}, C = {dp['clip']}, {dp['rounds_accounted']} rounds)")
    out.print(t)
    for w in summary.get("warnings") or []:
        out.print(f"[yellow]warning: {w}[/]")
    out.print(f"run directory: [bold]{run_dir}[/]")


def check_variants(variants: list[str]) -> None:
    from fedpa.recmodels.algorithms import ALGORITHMS
    from fedpa.simulations.compare import ABLATIONS

    for v in variants:
        ok = (v in ALGORITHMS or v in ABLATIONS
              or (v.startswith("fedpa-rank") and v.removeprefix("fedpa-rank").isdigit()))
        if not ok:
            raise FedpaError(f"unknown algorithm or ablation '{v}' (algorithms: {', '.join(ALGORITHMS)}; "
                             f"ablations: {', '.join(ABLATIONS)}, fedpa-rankR)")


assert {f.metadata["section"] for f in fields(FederationConfig)} <= set(SECTIONS)
