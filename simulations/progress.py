"""Progress of long commands: rich bars on a terminal, plain lines elsewhere (a CI log, `nohup`, a pipe).

Both kinds offer the part of `rich.progress.Progress` the experiments use (``add_task``, ``update``,
``advance``, ``task_ids``, a context manager), so an experiment reports progress the same way whether a
person watches it or a log file keeps it. Plain mode prints a line when a task starts, at every step of a
short task (rounds, runs) and at every tenth of a long one (training steps, days), and when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

SHORT_TASK = 50  # a task with at most this many steps prints every step in plain mode

console = Console(stderr=True)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    started: float = field(default_factory=time.time)
    printed_at: float = -1.0


class PlainProgress:
    """`rich.progress.Progress`'s interface, printing plain lines instead of redrawing bars."""

    def __init__(self, out: Console):
        self.out = out
        self.tasks: dict[int, _Task] = {}

    @property
    def task_ids(self) -> list[int]:
        return list(self.tasks)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        for t in self.tasks.values():
            if t.total is not None and t.completed != t.printed_at:
                self._print(t)

    def add_task(self, description: str, total: float | None = None, **_: object) -> int:
        tid = len(self.tasks)
        self.tasks[tid] = task = _Task(description, total)
        self._print(task, started=True)
        return tid

    def update(self, task_id: int, *, description: str | None = None, completed: float | None = None,
               total: float | None = None, advance: float | None = None, **_: object) -> None:
        t = self.tasks[task_id]
        if description is not None:
            t.description = description
        if total is not None:
            t.total = total
        before = t.completed
        if completed is not None:
            t.completed = completed
        if advance:
            t.completed += advance
        if t.completed != before and self._worth_a_line(t, before):
            self._print(t)

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _worth_a_line(self, t: _Task, before: float) -> bool:
        if not t.total or t.total <= SHORT_TASK or t.completed >= t.total:
            return True
        return int(10 * t.completed / t.total) > int(10 * before / t.total)

    def _print(self, t: _Task, started: bool = False) -> None:
        elapsed = time.time() - t.started
        if started:
            self.out.print(f"{t.description}: started", highlight=False, soft_wrap=True)
            return
        of = f"/{t.total:g}" if t.total else ""
        self.out.print(f"{t.description}: {t.completed:g}{of} ({elapsed:.0f} s)", highlight=False, soft_wrap=True)
        t.printed_at = t.completed


VERBOSITY = {"level": 0}   # -1 quiet, 0 normal, 1 verbose (the CLI's --quiet / --verbose)


def set_verbosity(level: int) -> None:
    """-1: no progress at all; 1: Flower's and fedpa's log lines shown on stderr (INFO) as well."""
    import logging

    VERBOSITY["level"] = level
    if level > 0:   # Flower's logger has its own handler; fedpa's gets one (other libraries stay as they are)
        fedpa = logging.getLogger("fedpa")
        if not fedpa.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            fedpa.addHandler(h)
        for name in ("flwr", "fedpa"):
            logging.getLogger(name).setLevel(logging.INFO)


def verbose() -> bool:
    return VERBOSITY["level"] > 0


class NullProgress(PlainProgress):
    """--quiet: the same interface, nothing printed."""

    def _print(self, *a, **k) -> None:
        return None


def progress_bar(out: Console | None = None) -> Progress | PlainProgress:
    """Bars on a terminal, plain lines otherwise, nothing with --quiet."""
    out = out or console
    if VERBOSITY["level"] < 0:
        return NullProgress(out)
    if not out.is_terminal:
        return PlainProgress(out)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=out, transient=False)


def day_progress(progress: Progress | PlainProgress, what: str) -> Callable[[str, int, int], None]:
    """A callback for work done day by day (synthesis, imports): ``update(label, done, total)``."""
    task = progress.add_task(what, total=None)

    def update(label: str, done: int, total: int) -> None:
        progress.update(task, description=f"{what}: {label}", completed=done, total=total)

    return update


def round_progress(progress: Progress | PlainProgress, label: str, total: int) -> Callable[..., None]:
    """A callback for federated rounds: ``update(round, rounds, evaluation)``, showing validation metrics."""
    task = progress.add_task(label, total=total)

    def update(r: int, rounds: int, ev) -> None:
        extra = ""
        if ev:
            v = ev.get("val", {})
            extra = "  ".join(f"val {k} {v[k]:.4f}" for k in ("auc", "gauc", "hr@10") if k in v and v[k] == v[k])
        progress.update(task, completed=r, total=rounds, description=f"{label} {extra}".rstrip())

    return update
