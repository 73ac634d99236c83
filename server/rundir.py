"""The run directory: what every run leaves behind.

::

    RUN/config.json          resolved configuration
    RUN/metrics.jsonl        one JSON line per round (appended, flushed, fsynced)
    RUN/summary.json         final summary (test metrics at the best validation round, ...)
    RUN/curves.png           learning curves
    RUN/checkpoints/round-NNNN.safetensors   shared state after each round (+ .json sidecar)
    RUN/checkpoints/latest.json              pointer to the last completed round

Every file is written atomically (temp file, fsync, rename), so a run killed
at any moment leaves the last completed round readable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedpa.common.files import atomic_write_bytes, atomic_write_json, jsonable, save_figure  # noqa: F401
from fedpa.foundation.checkpoint import CheckpointError, seal_safetensors, verify_safetensors
from fedpa.foundation.errors import FedpaError
from fedpa.server.tracking import make_tracker

log = logging.getLogger("fedpa.server")


class RunDirError(FedpaError):
    pass


class RunDir:
    def __init__(self, path: str | Path, track: str = ""):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.path / "checkpoints"
        # an experiment tracker (server/tracking.py) gets what the run directory gets, after it is written
        self.tracker = make_tracker(track, self.path) if track else None

    # -- config / metrics / summary
    def write_config(self, config: dict) -> None:
        atomic_write_json(self.path / "config.json", config)
        if self.tracker:
            self.tracker.config(config)

    def read_config(self) -> dict:
        return self._read_json(self.path / "config.json")

    def append_metrics(self, record: dict) -> None:
        self._append_line("metrics.jsonl", record)
        if self.tracker:
            self.tracker.round(record)

    def read_metrics(self) -> list[dict]:
        """The metrics lines; a last line cut short (a crash in the middle of an append: no newline at its end)
        is left out, a malformed line anywhere else is an error."""
        return self._read_lines("metrics.jsonl", "metrics line")

    def append_privacy_event(self, event: dict) -> None:
        """One DP release (appended, flushed, fsynced before the release)."""
        self._append_line("privacy_ledger.jsonl", event)

    def read_privacy_ledger(self) -> list[dict]:
        # a last line cut short by a crash came before the release it would have preceded: nothing was released
        return self._read_lines("privacy_ledger.jsonl", "privacy ledger line")

    def _append_line(self, name: str, record: dict) -> None:
        """One JSON line, flushed and fsynced: on disk before the caller goes on."""
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record, sort_keys=True, default=jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _read_lines(self, name: str, what: str) -> list[dict]:
        p = self.path / name
        if not p.exists():
            return []
        lines = p.read_text().split("\n")
        partial = lines.pop()          # the text after the last newline: "" when the last append completed
        rows = []
        for i, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunDirError(f"{p}:{i}: malformed {what}") from None
        if partial:
            log.warning("%s: the last line is incomplete (an interrupted append): it is left out", p)
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (a resumed run recomputes them)."""
        rows = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        atomic_write_bytes(self.path / "metrics.jsonl",
                           "".join(json.dumps(r, sort_keys=True, default=jsonable) + "\n" for r in rows).encode())

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)
        if self.tracker:
            self.tracker.summary(summary)
            self.tracker.close()

    # -- checkpoints
    def save_checkpoint(self, round_: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        name = f"round-{round_:04d}"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".safetensors", dir=self.ckpt)
        os.close(fd)
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
            seal_safetensors(tmp)   # the SHA-256 of the tensor data, checked when the run resumes
            os.replace(tmp, self.ckpt / f"{name}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        atomic_write_json(self.ckpt / f"{name}.json", {"round": round_, **meta})
        atomic_write_json(self.ckpt / "latest.json", {"round": round_, "name": name})

    def latest_round(self) -> int | None:
        p = self.ckpt / "latest.json"
        return self._read_json(p)["round"] if p.exists() else None

    def load_checkpoint(self, round_: int | None = None) -> tuple[int, dict[str, np.ndarray], dict]:
        if round_ is None:
            round_ = self.latest_round()
            if round_ is None:
                raise RunDirError(f"{self.path}: no checkpoint to resume from")
        name = f"round-{round_:04d}"
        tensors = self.ckpt / f"{name}.safetensors"
        if not tensors.is_file():
            raise RunDirError(f"{tensors}: missing (the checkpoint latest.json names)")
        try:
            verify_safetensors(tensors)
            arrays = load_file(str(tensors))
        except CheckpointError as e:
            raise RunDirError(f"cannot read checkpoint: {e}") from None
        except Exception as e:  # safetensors raises several types for damaged files
            raise RunDirError(f"{tensors}: cannot read checkpoint ({e})") from None
        bad = sorted(k for k, v in arrays.items() if not np.all(np.isfinite(v)))
        if bad:
            raise RunDirError(f"{tensors}: entry '{bad[0]}' holds NaN or inf")
        return round_, arrays, self._read_json(self.ckpt / f"{name}.json")

    def keep_last_checkpoints(self, n: int) -> None:
        rounds = sorted(int(p.stem.split("-")[1]) for p in self.ckpt.glob("round-*.safetensors"))
        for r in rounds[:-n] if n > 0 else []:
            for suffix in (".safetensors", ".json"):
                (self.ckpt / f"round-{r:04d}{suffix}").unlink(missing_ok=True)

    @staticmethod
    def _read_json(p: Path) -> dict:
        if not p.exists():
            raise RunDirError(f"{p}: missing")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{p}: malformed JSON ({e})") from None


def plot_curves(run: RunDir, metrics: list[str] | None = None) -> Path | None:
    """Learning curves (validation and test metrics per round) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run.read_metrics() if "eval" in r]
    if not rows:
        return None
    keys = metrics or sorted({k for r in rows for k in r["eval"].get("val", {})
                              if isinstance(r["eval"]["val"][k], (int, float))})
    keys = [k for k in keys if k in ("auc", "gauc", "logloss", "hr@10", "ndcg@10", "f1")] or keys[:3]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for split, style in (("val", "-o"), ("test", "--s")):
            pts = [(r["round"], r["eval"][split].get(k)) for r in rows if split in r["eval"]]
            pts = [(x, y) for x, y in pts if y is not None and not (isinstance(y, float) and math.isnan(y))]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=3)
        ax.set_title(k if ax.lines else f"{k} (undefined here)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return save_figure(fig, run.path / "curves.png")
