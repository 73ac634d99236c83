"""A device's interaction log: what its user is shown, and the feedback that arrives afterwards.

SQLite, because it is the embedded database every phone and set-top box already ships (Android and iOS
expose it; nothing to install), it is crash-safe by design (a transaction is on disk or not at all), and a
writer (the app logging events) and a reader (the ClientApp training in another process) may work at once:
in WAL mode a reader sees one consistent snapshot while the writer goes on.

An *impression* is a row (request id, time, item, position); its labels start unobserved (-1) and arrive
later (a view completes after the item was shown: Moment&Cross's delayed labels). Each write takes the next
*sequence number* of the log, and each labelled row remembers the sequence number of its last label. A round
reads the log once, at its start (`snapshot`): a label written after that is not in the round and is counted
in the next one; a row is one training example however many labels reach it (never counted twice).

Crash safety: every append and every label is one transaction with ``synchronous=FULL``; a process killed
mid-write loses at most that write, never the log (tested with kill -9).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fedpa.foundation.errors import FedpaError
from fedpa.recdata.schema import LABELS, SCHEMAS

LOG_FILE = "events.sqlite"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    video_id INTEGER NOT NULL CHECK (video_id >= 0),
    position INTEGER NOT NULL DEFAULT 0,
    {", ".join(f"{lab} INTEGER NOT NULL DEFAULT -1 CHECK ({lab} IN (-1, 0, 1))" for lab in LABELS)},
    shown_seq INTEGER NOT NULL,
    labelled_seq INTEGER
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('seq', 0);
"""


class EventLogError(FedpaError):
    """An event the log cannot take (unknown event, a label outside 0/1, an id out of range)."""


@dataclass(frozen=True)
class Snapshot:
    """What one round reads: every impression with the labels that had arrived when it started."""

    seq: int                 # the log's sequence number at the snapshot
    exposures: pa.Table      # canonical exposure rows (recdata.partition.EXPOSURE_COLS) of the labelled events

    @property
    def labelled(self) -> int:
        return self.exposures.num_rows


class EventLog:
    """One device's log (one file). Open it where the app runs and where the ClientApp runs; both may write and
    read at once."""

    def __init__(self, path: str | Path, user_id: int, *, num_items: int | None = None):
        self.path = Path(path)
        self.user_id = int(user_id)
        self.num_items = num_items
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise EventLogError(f"{self.path}: not a usable event log ({e})") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_seq(self) -> int:
        self.db.execute("UPDATE meta SET value = value + 1 WHERE key = 'seq'")
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    def impression(self, video_id: int, *, timestamp_ms: int | None = None, request_id: int | None = None,
                   position: int = 0, **labels: int) -> int:
        """Log that ``video_id`` was shown (labels, when already known, may come with it); returns its event id."""
        video_id = int(video_id)
        if video_id < 0 or (self.num_items is not None and video_id >= self.num_items):
            raise EventLogError(f"video id {video_id} is outside the catalogue (0..{(self.num_items or 1) - 1})")
        self._check(labels)
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        with self.db:                                     # one transaction: the row and its sequence number
            self.db.execute("BEGIN IMMEDIATE")
            seq = self._next_seq()
            cur = self.db.execute(
                f"INSERT INTO events (request_id, timestamp_ms, video_id, position, shown_seq, labelled_seq"
                f"{''.join(', ' + k for k in labels)}) VALUES (?, ?, ?, ?, ?, ?{', ?' * len(labels)})",
                (ts if request_id is None else int(request_id), ts, video_id, int(position), seq,
                 seq if labels else None, *(int(v) for v in labels.values())))
            return int(cur.lastrowid)

    def label(self, event_id: int, **labels: int) -> None:
        """Feedback for an impression logged earlier (e.g. ``effective_view=1`` when the view completes)."""
        self._check(labels)
        if not labels:
            raise EventLogError("no label given (one of " + ", ".join(LABELS) + ")")
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self._next_seq()
            cur = self.db.execute(f"UPDATE events SET {', '.join(f'{k} = ?' for k in labels)}, labelled_seq = ? "
                                  "WHERE event_id = ?", (*(int(v) for v in labels.values()), seq, int(event_id)))
            if cur.rowcount != 1:
                raise EventLogError(f"{self.path}: no event {event_id} to label")

    @staticmethod
    def _check(labels: dict) -> None:
        for k, v in labels.items():
            if k not in LABELS:
                raise EventLogError(f"unknown label '{k}' (one of {', '.join(LABELS)})")
            if v not in (0, 1):
                raise EventLogError(f"label {k}={v!r}: a label is 0 or 1")

    def snapshot(self) -> Snapshot:
        """Every labelled impression as of now, as canonical exposure rows (one consistent read)."""
        with self.db:
            self.db.execute("BEGIN")
            seq = int(self.db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
            rows = self.db.execute(f"SELECT request_id, timestamp_ms, video_id, position, {', '.join(LABELS)} "
                                   "FROM events WHERE labelled_seq IS NOT NULL ORDER BY timestamp_ms, event_id"
                                   ).fetchall()
        cols = list(zip(*rows)) if rows else [[] for _ in range(4 + len(LABELS))]
        data = {"request_id": np.asarray(cols[0], np.int64), "user_id": np.full(len(rows), self.user_id, np.int64),
                "request_timestamp": np.asarray(cols[1], np.int64), "video_id": np.asarray(cols[2], np.int64),
                "rerank_index": np.asarray(cols[3], np.int64),
                **{lab: np.asarray(cols[4 + j], np.int8) for j, lab in enumerate(LABELS)}}
        schema = pa.schema([SCHEMAS["exposures"].field(k) for k in data])   # the dataset's types, not null
        table = pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in data.items()}, schema=schema)
        return Snapshot(seq, table)

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
