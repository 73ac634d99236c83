"""Experiment tracking: a run's configuration, per-round metrics and summary in TensorBoard's own files.

TensorBoard because it is what the field's PyTorch users already run, offline, reading local files (`tensorboard
--logdir runs/`): forty run directories side by side, a long run followed live. Written through
`torch.utils.tensorboard` into RUN/tensorboard; scalar tags are the metrics' keys (``val/auc``, ``test/gauc``,
``train_loss``, ``epsilon``, ``stage_s/train``, …), the configuration and the summary are text. Every value also
stays in the run directory's own JSON files, which remain the record (a tracker never decides anything).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedpa.foundation.errors import FedpaError

TRACKERS = ("tensorboard",)


def _scalars(prefix: str, d: dict, out: dict[str, float]) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _scalars(f"{prefix}{k}/", v, out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[f"{prefix}{k}"] = float(v)


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FedpaError("--track tensorboard needs the tensorboard package: pip install 'fedpa[analysis]' "
                             "(or tensorboard)") from None
        self.dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def config(self, config: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, sort_keys=True, default=str) + "\n```")
        self.writer.flush()

    def round(self, record: dict[str, Any]) -> None:
        values: dict[str, float] = {}
        _scalars("", {k: v for k, v in record.items() if k not in ("round", "eval")}, values)
        _scalars("", record.get("eval", {}), values)
        step = int(record["round"])
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()     # a long run can be followed live

    def summary(self, summary: dict) -> None:
        values: dict[str, float] = {}
        _scalars("final/", {k: summary[k] for k in ("val", "test") if k in summary}, values)
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, int(summary.get("best_round", 0)))
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n```")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tracker(kind: str, run_dir: Path):
    if not kind:
        return None
    if kind not in TRACKERS:
        raise FedpaError(f"unknown tracker '{kind}' (one of {', '.join(TRACKERS)})")
    return TensorBoardTracker(run_dir)
