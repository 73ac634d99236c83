"""`fedpa cache …`: list and prune the simulation's feature cache (client/feature_cache.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedpa.foundation.errors import FedpaError

from .common import app, out, user_errors

cache_app = typer.Typer(help="The simulation's cached tower inputs: what they hold, and removing them.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")

RootOption = Annotated[Path | None, typer.Option("--root", help="the cache root (default: "
                                                 "~/.cache/fedpa/features, as feature-cache=\"\")")]


def _root(root: Path | None) -> Path:
    from fedpa.client.feature_cache import default_root

    root = root or default_root()
    if root.exists() and not root.is_dir():
        raise FedpaError(f"{root}: not a directory")
    return root


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _age(t: float) -> str:
    s = max(time.time() - t, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit} ago"
    return f"{s:.0f} s ago"


def _short(path: str) -> str:
    """A path as a reader of a terminal table wants it: relative under the working directory, ~ under home."""
    if not path or path == "?":
        return path
    p = Path(path)
    for base, shown in ((Path.cwd(), ""), (Path.home(), "~")):
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        return str(Path(shown) / rel) if shown else str(rel)
    return path


@cache_app.command("list")
@user_errors
def list_cmd(root: RootOption = None):
    """Every entry, least recently used first: size, last use, and what its rows were made from. On a terminal a
    table; otherwise one tab-separated line per entry under a header, with full paths (for grep and awk)."""
    from fedpa.client.feature_cache import entries

    root = _root(root)
    listed = entries(root)
    title = f"{root}: {len(listed)} entries, {_gib(sum(e.bytes for e in listed))}"
    rows = [(e.key[:12], _gib(e.bytes), _age(e.last_used), str(e.source.get("split", "?")),
             str(e.source.get("seed", "?")), "yes" if e.in_use else "", str(e.source.get("data", "?")),
             str(e.source.get("foundation", "?"))) for e in listed]
    columns = ("entry", "size", "last used", "split", "seed", "open", "data", "foundation")
    if not out.is_terminal:
        print(f"# {title}")
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row))
        return
    t = Table(title=title)
    for col in columns[:6]:
        t.add_column(col, no_wrap=True)
    for col in columns[6:]:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row[:6], _short(row[6]), _short(row[7]))
    out.print(t)


@cache_app.command("prune")
@user_errors
def prune_cmd(
    root: RootOption = None,
    max_gb: Annotated[float | None, typer.Option("--max-gb", help="remove least recently used entries until "
                                                 "the rest hold at most this many GiB")] = None,
    unused_days: Annotated[float | None, typer.Option("--unused-days", help="remove every entry not used for "
                                                      "this many days")] = None,
    all_: Annotated[bool, typer.Option("--all", help="remove every entry not in use")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would be removed")] = False,
):
    """Remove entries least recently used first; entries a running simulation holds open are kept (a run
    rebuilds what it needs)."""
    from fedpa.client.feature_cache import prune

    if max_gb is None and unused_days is None and not all_:
        raise FedpaError("say what to remove: --max-gb, --unused-days or --all")
    for name, value in (("--max-gb", max_gb), ("--unused-days", unused_days)):
        if value is not None and not value >= 0:
            raise FedpaError(f"{name} must be >= 0, got {value}")
    root = _root(root)
    removed = prune(root, max_bytes=0 if all_ else None if max_gb is None else int(max_gb * 2**30),
                    unused_for_s=None if unused_days is None else unused_days * 86400, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        out.print(f"{verb} {e.key}  {_gib(e.bytes)}  last used {_age(e.last_used)}  {e.source.get('data', '')}")
    out.print(f"{verb} {len(removed)} entries, {_gib(sum(e.bytes for e in removed))}")
