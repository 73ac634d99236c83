"""Reading and writing canonical datasets (layout in `schema`).

Writes are atomic: everything goes to a hidden temporary directory next to
the target, which replaces the target only after every file is written and
fsynced. A failed or interrupted write leaves the previous dataset untouched.

Reads are lazy: tables are memory-mapped Arrow IPC files; one user's rows are
found by binary search on the sorted ``user_id`` column, so a client reads its
own slice and never the whole day.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedpa.foundation.errors import FedpaError

from .schema import DAY_TABLES, DOMAIN_COLUMN, FORMAT_VERSION, ITEM_COLUMNS, LABELS, SCHEMAS, STAGES, USER_COLUMNS

# Extra columns named orig_* carry a source's original ids: kept, never used as features.
CARRIED_PREFIX = "orig_"

MANIFEST = "manifest.json"


class DatasetError(FedpaError):
    """A dataset file is missing, malformed or inconsistent."""


# ----------------------------------------------------------------------------- validation


def conform(name: str, table: pa.Table, where: str) -> pa.Table:
    """Return ``table`` with the canonical columns of ``name`` (extra integer columns kept for users/items, and
    carried original ids, ``orig_*``, as integers or text), cast safely; raise DatasetError naming ``where`` and
    the field."""
    schema = SCHEMAS[name]
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DatasetError(f"{where}: missing column(s) {', '.join(missing)} for table '{name}'")
    extra = [c for c in table.column_names if c not in schema.names]
    if extra and name not in ("users", "items"):
        table = table.select(schema.names)
        extra = []
    cols, fields = [], []
    carried_text = [c for c in extra if c.startswith(CARRIED_PREFIX) and is_text_type(table.column(c).type)]
    for f in list(schema) + [pa.field(c, pa.string() if c in carried_text else pa.int64(), nullable=False)
                             for c in extra]:
        col = table.column(f.name)
        if f.name in carried_text:   # a source's original ids as text (reviewer ids, ASINs): kept as they are
            if col.null_count:
                raise DatasetError(f"{where}: column '{f.name}' has {col.null_count} missing value(s)")
            cols.append(col.cast(pa.string()))
            fields.append(f)
            continue
        if col.null_count:
            raise DatasetError(f"{where}: column '{f.name}' has {col.null_count} missing value(s)")
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            raise DatasetError(f"{where}: column '{f.name}' has type {col.type}, expected {f.type}")
        if pa.types.is_floating(col.type):
            arr = col.to_numpy()
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise DatasetError(f"{where}: column '{f.name}' must hold integers, found non-integer values")
        try:
            col = col.cast(f.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DatasetError(f"{where}: column '{f.name}' does not fit {f.type}: {e}") from None
        cols.append(col)
        fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def is_text_type(t: pa.DataType) -> bool:
    """Arrow text: string, large string, or a dictionary of either (how Parquet often stores categories)."""
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)))


def _check_day(day: str, where: str) -> str:
    try:
        canonical = date.fromisoformat(day).isoformat() == day  # 3.11 also parses 20240113, 2024-W02-6
    except ValueError:
        canonical = False
    if not canonical:
        raise DatasetError(f"{where}: '{day}' is not an ISO date (YYYY-MM-DD)")
    return day


# ----------------------------------------------------------------------------- writing


def _write_ipc(path: Path, table: pa.Table) -> None:
    # One record batch per file: the reader then views user_id as one zero-copy array.
    table = table.combine_chunks()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=max(table.num_rows, 1)):
            w.write_batch(batch)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Stats:
    rows: dict[str, int] = field(default_factory=dict)
    vocab: dict[str, int] = field(default_factory=dict)
    stage_counts: dict[str, int] = field(default_factory=dict)

    def add_rows(self, name: str, n: int) -> None:
        self.rows[name] = self.rows.get(name, 0) + n

    def see_max(self, table: pa.Table, columns: Iterable[str]) -> None:
        for c in columns:
            if c in table.column_names and table.num_rows:
                m = pc.max(table.column(c)).as_py()
                self.vocab[c] = max(self.vocab.get(c, 0), int(m) + 1)


class DatasetWriter:
    """Builds a dataset in a temporary directory and moves it into place on `commit`.

    Use as a context manager: leaving the block with an exception removes the
    temporary directory and leaves any existing dataset at ``out`` as it was.
    """

    def __init__(self, out: str | Path, *, source: str, overwrite: bool = False):
        self.out = Path(out).resolve()
        if self.out.exists() and not overwrite:
            raise DatasetError(f"{self.out}: already exists (pass --overwrite to replace it)")
        if self.out.exists() and not (self.out / MANIFEST).exists():
            raise DatasetError(f"{self.out}: exists and is not a fedpa dataset; refusing to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        for t in DAY_TABLES:
            (self.tmp / t).mkdir()
        self.source = source
        self.days: list[str] = []
        self.stats = _Stats()
        self.user_features: list[str] = []
        self.item_features: list[str] = []
        self.has_history = False
        self.domains: dict[str, str] = {}
        self._done = False

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def write_users(self, table: pa.Table) -> None:
        table = conform("users", table, "users")
        check_values("users", table, "users")
        table = table.sort_by("user_id")
        self.user_features = [c for c in table.column_names
                              if c != "user_id" and not c.startswith(CARRIED_PREFIX)]
        self.stats.see_max(table, ["user_id", *self.user_features])
        self.stats.add_rows("users", table.num_rows)
        _write_ipc(self.tmp / "users.arrow", table)

    def write_items(self, table: pa.Table, domains: Mapping[int, str] | None = None) -> None:
        """The item table; ``domains`` (code -> name) when its ``domain`` column tells surfaces apart."""
        table = conform("items", table, "items")
        check_values("items", table, "items")
        self.domains = _check_domains(table, domains)
        table = table.sort_by("video_id")
        self.item_features = [c for c in table.column_names
                              if c != "video_id" and not c.startswith(CARRIED_PREFIX)]
        cats = [c for c in ["video_id", *self.item_features]
                if c not in ("upload_timestamp", "duration") and c in {f.name for f in ITEM_COLUMNS}]
        self.stats.see_max(table, cats)
        self.stats.add_rows("items", table.num_rows)
        _write_ipc(self.tmp / "items.arrow", table)

    def write_day(self, day: str, *, requests: pa.Table, exposures: pa.Table,
                  stage_samples: pa.Table | None = None) -> None:
        _check_day(day, "day")
        if day in self.days:
            raise DatasetError(f"day {day} written twice")
        if stage_samples is None:
            stage_samples = SCHEMAS["stage_samples"].empty_table()
        parts = {"requests": requests, "exposures": exposures, "stage_samples": stage_samples}
        for name, t in parts.items():
            t = conform(name, t, f"{name}/{day}")
            t = t.sort_by([("user_id", "ascending"), ("request_timestamp", "ascending")])
            check_values(name, t, f"{name}/{day}")
            self.stats.add_rows(name, t.num_rows)
            self.stats.see_max(t, ["user_id", "video_id", "request_id"])
            if name == "stage_samples" and t.num_rows:
                vc = pc.value_counts(t.column("stage")).to_pylist()
                for entry in vc:
                    s = STAGES[entry["values"]]
                    self.stats.stage_counts[s] = self.stats.stage_counts.get(s, 0) + entry["counts"]
            _write_ipc(self.tmp / name / f"{day}.arrow", t)
        self.days.append(day)

    def write_history(self, table: pa.Table) -> None:
        table = conform("history", table, "history")
        table = table.sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
        check_values("history", table, "history")
        self.stats.add_rows("history", table.num_rows)
        _write_ipc(self.tmp / "history.arrow", table)
        self.has_history = True

    def write_extra(self, relpath: str, table: pa.Table | None = None, obj: Any = None) -> None:
        """Write an auxiliary file (e.g. the synthetic oracle) as Arrow or JSON."""
        p = self.tmp / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        if table is not None:
            _write_ipc(p, table)
        else:
            p.write_text(json.dumps(obj, indent=2, sort_keys=True))

    def commit(self, **meta: Any) -> Path:
        if not (self.tmp / "users.arrow").exists() or not (self.tmp / "items.arrow").exists():
            raise DatasetError("a dataset needs a users and an items table")
        if not self.days:
            raise DatasetError("a dataset needs at least one day")
        vocab = dict(self.stats.vocab)
        manifest = {
            "format": "fedpa-dataset",
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "days": sorted(self.days),
            "user_features": self.user_features,
            "item_features": self.item_features,
            "vocab": vocab,
            "rows": self.stats.rows,
            "stage_samples_per_stage": self.stats.stage_counts,
            "has_history": self.has_history,
            **({"domains": self.domains} if self.domains else {}),
            **meta,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_dir(self.tmp)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.out


def _check_domains(items: pa.Table, domains: Mapping[int, str] | None) -> dict[str, str]:
    """The manifest's ``domains`` (code as text -> name) for an item table, refusing a ``domain`` column without
    names, names without the column, and codes outside the named ones."""
    col = DOMAIN_COLUMN.name
    if not domains:
        if col in items.column_names:
            raise DatasetError(f"items: column '{col}' needs the names of its domains (code -> name)")
        return {}
    if col not in items.column_names:
        raise DatasetError(f"items: domains {dict(domains)} are named but the table has no '{col}' column")
    names = {int(k): str(v) for k, v in domains.items()}
    if len(names) < 2 or min(names) < 1 or len(set(names.values())) != len(names):
        raise DatasetError(f"items: domains must name at least two codes >= 1, each once (got {dict(domains)})")
    codes = items.column(col).to_numpy()
    unknown = np.setdiff1d(np.unique(codes), list(names))
    if len(unknown):
        raise DatasetError(f"items: column '{col}' has code(s) {unknown[:5].tolist()} that the domains "
                           f"{names} do not name")
    return {str(k): v for k, v in sorted(names.items())}


def check_values(name: str, table: pa.Table, where: str, vocab: dict[str, int] | None = None) -> None:
    """Refuse what the canonical format forbids and a cast cannot see: negative ids (or ids beyond the
    manifest's vocabulary, which would size an embedding table), labels outside -1/0/1, unknown stage
    codes, a day or history table not sorted by user (a user's rows would be found in another user's
    slice), duplicate ids in users/items. (One item twice in one request is kept: an interaction log may hold
    it, and nothing downstream assumes otherwise.)"""
    if not table.num_rows:
        return
    cols = set(table.column_names)
    for c in sorted(cols & {"user_id", "video_id", "request_id", "author_id", "device_id"}):
        lo, hi = pc.min_max(table.column(c)).values()
        if lo.as_py() < 0:
            raise DatasetError(f"{where}: column '{c}' holds a negative id ({lo.as_py()})")
        if vocab and c in vocab and hi.as_py() >= vocab[c]:
            raise DatasetError(f"{where}: column '{c}' holds id {hi.as_py()}, beyond the manifest's vocabulary "
                               f"of {vocab[c]} (the file was changed after the dataset was written)")
    for c in sorted(cols & set(LABELS)):
        lo, hi = pc.min_max(table.column(c)).values()
        if lo.as_py() < -1 or hi.as_py() > 1:
            raise DatasetError(f"{where}: label '{c}' must be -1 (not observed), 0 or 1, found "
                               f"{lo.as_py() if lo.as_py() < -1 else hi.as_py()}")
    if "stage" in cols:
        lo, hi = pc.min_max(table.column("stage")).values()
        if lo.as_py() < 0 or hi.as_py() >= len(STAGES):
            raise DatasetError(f"{where}: stage code outside 0..{len(STAGES) - 1}")
    if name in ("users", "items"):
        _unique(table, "user_id" if name == "users" else "video_id", where)
    if name in DAY_TABLES or name == "history":
        uid = table.column("user_id").to_numpy()
        if np.any(uid[1:] < uid[:-1]):
            raise DatasetError(f"{where}: rows are not sorted by user_id (row {int(np.argmax(uid[1:] < uid[:-1])) + 1}"
                               "); the canonical format keeps each user's rows together")


def _unique(table: pa.Table, col: str, where: str) -> None:
    # by sorting, not pyarrow's count_distinct: its hash table left ~35 MiB resident after a 100,000-item
    # catalogue was checked (mimalloc keeps the pages), a tenth of what a device may hold
    ids = np.sort(table.column(col).to_numpy())
    dup = int(np.count_nonzero(ids[1:] == ids[:-1]))
    if dup:
        raise DatasetError(f"{where}: column '{col}' has {dup} duplicate id(s)")


# ----------------------------------------------------------------------------- reading


def _read_ipc(path: Path) -> pa.Table:
    if not path.exists():
        raise DatasetError(f"{path}: file is missing")
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"{path}: not a readable Arrow file ({e})") from None


class Dataset:
    """A canonical dataset opened for lazy, column-projected reading."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir() or not mpath.exists():
            raise DatasetError(f"{self.path}: not a fedpa dataset (no {MANIFEST})")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{mpath}: malformed JSON ({e})") from None
        if self.manifest.get("format") != "fedpa-dataset":
            raise DatasetError(f"{mpath}: not a fedpa dataset manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{mpath}: format version {self.manifest.get('format_version')} "
                               f"is not supported (expected {FORMAT_VERSION})")
        self.days: list[str] = list(self.manifest["days"])
        self._tables: dict[tuple[str, str], pa.Table] = {}
        self._uid: dict[tuple[str, str], np.ndarray] = {}
        self._item_domains: np.ndarray | None = None

    # -- whole small tables
    @property
    def source(self) -> str:
        return self.manifest["source"]

    @property
    def vocab(self) -> dict[str, int]:
        return self.manifest["vocab"]

    @property
    def user_features(self) -> list[str]:
        return self.manifest["user_features"]

    def users(self, columns: list[str] | None = None) -> pa.Table:
        return self._table("users", "", columns)

    @property
    def domains(self) -> dict[str, int]:
        """Domain name -> its code in ``items.domain`` (empty: a one-domain dataset)."""
        return {name: int(code) for code, name in self.manifest.get("domains", {}).items()}

    def domain_codes(self, names: str | Iterable[str]) -> list[int]:
        """The codes of domains given by name (a comma-separated string or a list), refusing unknown names."""
        names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
        if names and not self.domains:
            raise DatasetError(f"{self.path}: has one domain (no items.domain): cannot choose domains "
                               f"{', '.join(names)}")
        unknown = [n for n in names if n not in self.domains]
        if unknown:
            raise DatasetError(f"{self.path}: unknown domain(s) {', '.join(unknown)} (it has "
                               f"{', '.join(self.domains)})")
        return [self.domains[n] for n in names]

    def item_domains(self) -> np.ndarray:
        """[max video_id + 1] domain code of every item (0 for an id the items table lacks); read once."""
        if not self.domains:
            raise DatasetError(f"{self.path}: has one domain (no items.domain)")
        if self._item_domains is None:
            items = self.items(["video_id", DOMAIN_COLUMN.name])
            vid = items.column("video_id").to_numpy()
            out = np.zeros(max(int(self.vocab.get("video_id", 0)), int(vid.max()) + 1 if len(vid) else 0), np.int64)
            out[vid] = items.column(DOMAIN_COLUMN.name).to_numpy()
            self._item_domains = out
        return self._item_domains

    def domain_of(self, video_ids: np.ndarray) -> np.ndarray:
        """The domain code of each video id (0 for an id beyond the items table)."""
        table = self.item_domains()
        video_ids = np.asarray(video_ids)
        return np.where(video_ids < len(table), table[np.clip(video_ids, 0, max(len(table) - 1, 0))], 0)

    def items(self, columns: list[str] | None = None) -> pa.Table:
        return self._table("items", "", columns)

    def history(self, columns: list[str] | None = None) -> pa.Table:
        if not self.manifest.get("has_history"):
            return SCHEMAS["history"].empty_table().select(columns or SCHEMAS["history"].names)
        return self._table("history", "", columns)

    # -- day tables
    def check_day(self, day: str) -> str:
        if not self.days:
            raise DatasetError(f"{self.path}: the dataset has no days")
        if day not in self.days:
            raise DatasetError(f"{self.path}: no day '{day}' (days: {self.days[0]} .. {self.days[-1]})")
        return day

    def day(self, name: str, day: str, columns: list[str] | None = None) -> pa.Table:
        if name not in DAY_TABLES:
            raise DatasetError(f"unknown day table '{name}' (one of {', '.join(DAY_TABLES)})")
        return self._table(name, self.check_day(day), columns)

    def iter_days(self, name: str, columns: list[str] | None = None,
                  days: Iterable[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        for d in days if days is not None else self.days:
            yield d, self.day(name, d, columns)

    def user_rows(self, name: str, user_id: int, columns: list[str] | None = None,
                  days: Iterable[str] | None = None) -> pa.Table:
        """All rows of day table ``name`` for one user (zero-copy slices, then concatenated)."""
        parts = []
        for d in days if days is not None else self.days:
            s = self._user_slice(name, self.check_day(d), user_id)
            if s.num_rows:
                parts.append(s.select(columns) if columns else s)
        if not parts:
            schema = SCHEMAS[name]
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        return pa.concat_tables(parts)

    def history_rows(self, user_id: int) -> pa.Table:
        if not self.manifest.get("has_history"):
            return SCHEMAS["history"].empty_table()
        return self._user_slice("history", "", user_id)

    # -- internals
    def _user_slice(self, name: str, day: str, user_id: int) -> pa.Table:
        """One user's rows of a table sorted by user_id: a zero-copy slice found by binary search."""
        t = self._table(name, day, None)
        lo, hi = np.searchsorted(self._user_index(name, day, t), [user_id, user_id + 1])
        return t.slice(int(lo), int(hi - lo))

    def _file(self, name: str, day: str) -> Path:
        return self.path / name / f"{day}.arrow" if day else self.path / f"{name}.arrow"

    def _table(self, name: str, day: str, columns: list[str] | None) -> pa.Table:
        key = (name, day)
        t = self._tables.get(key)
        if t is None:
            path = self._file(name, day)
            t = _read_ipc(path)
            if name in SCHEMAS:
                missing = [c for c in SCHEMAS[name].names if c not in t.column_names]
                if missing:
                    raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
                wrong = [f"'{f.name}' is {t.schema.field(f.name).type}, expected {f.type}" for f in SCHEMAS[name]
                         if t.schema.field(f.name).type != f.type]
                if wrong:
                    raise DatasetError(f"{path}: column {wrong[0]}")
                check_values(name, t, str(path), self.vocab if name != "history" else None)
            self._tables[key] = t
        if columns:
            bad = [c for c in columns if c not in t.column_names]
            if bad:
                raise DatasetError(f"{self._file(name, day)}: no column(s) {', '.join(bad)}")
            return t.select(columns)
        return t

    def _user_index(self, name: str, day: str, t: pa.Table) -> np.ndarray:
        key = (name, day)
        uid = self._uid.get(key)
        if uid is None:
            col = t.column("user_id")
            uid = col.chunk(0).to_numpy() if col.num_chunks == 1 else col.to_numpy()
            self._uid[key] = uid
        return uid


def open_dataset(path: str | Path) -> Dataset:
    return Dataset(path)


REQUIRED_PROFILE = [c.name for c in USER_COLUMNS if c.name != "user_id"]
REQUIRED_ITEM = [c.name for c in ITEM_COLUMNS if c.name != "video_id"]
