"""Importing the real RecFlow release into the canonical dataset, one day at a time (the pickles through
the restricted unpickler).

Design notes: docs/design/import-recflow.md
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa

from .safe_pickle import load_restricted
from .schema import LABELS, STAGES
from .store import DatasetError, DatasetWriter

log = logging.getLogger(__name__)

REQUEST_FIELDS = ("request_id", "user_id", "request_timestamp")
PROFILE_FIELDS = ("device_id", "age", "gender", "province")
ITEM_FIELDS = ("author_id", "category_level_one", "category_level_two", "upload_type",
               "upload_timestamp", "duration")
STAGE_FLAGS = ("realshow", *STAGES)
POSITION_FIELDS = ("rank_index", "rerank_index")

ALL_STAGE_COLUMNS = (*REQUEST_FIELDS, "video_id", *POSITION_FIELDS, *STAGE_FLAGS, *PROFILE_FIELDS, *ITEM_FIELDS)
REALSHOW_COLUMNS = (*REQUEST_FIELDS, "video_id", *POSITION_FIELDS, "playing_time", *LABELS,
                    *PROFILE_FIELDS, *ITEM_FIELDS)
SEQUENCE_COLUMNS = ("video_id", "author_id", "category_level_two", "category_level_one", "upload_type",
                    "upload_timestamp", "duration", "request_timestamp", "playing_time", "request_id")
"""Column order of a ``seq_effective_50_dict`` array [50, 10] (REFERENCE.md §1)."""
_SEQ = {name: i for i, name in enumerate(SEQUENCE_COLUMNS)}

SEQUENCES_PER_BLOCK = 8192
"""Behaviour sequences stacked at once when filtering a day's pickle (bounds the extra memory)."""

Progress = Callable[[str, int, int], None]
"""Called with (what is happening, steps done, total steps), as the CLI's progress bar expects."""


def import_recflow(src: str | Path, out: str | Path, *, overwrite: bool = False,
                   days: Iterable[str] | None = None, progress: Progress | None = None) -> Path:
    """Convert the RecFlow release at ``src`` into a canonical dataset at ``out``; return its path.

    ``days`` selects days (``2024-01-13`` or ``20240113``; default: all the
    release has). ``progress`` is told about each day as it is read and
    written, and about the final tables; data quirks found on the way
    (conflicting profiles, unflagged rows) are logged as warnings and listed
    in the manifest's ``notes``.
    """
    report = progress or (lambda *step: None)
    release = _Release.scan(Path(src), days)
    steps = len(release.days) + 1
    release_vocab = _read_release_vocab(release.root / "others" / "id_cnt.pkl")
    users = _LatestRows("user_id", PROFILE_FIELDS)
    items = _LatestRows("video_id", ITEM_FIELDS)
    first_requests = _FirstRequests()
    history_parts: list[pa.Table] = []
    unflagged_rows = orphan_sequences = 0

    with DatasetWriter(out, source="recflow", overwrite=overwrite) as writer:
        for n, day in enumerate(release.days, 1):
            report(f"{day}: reading stage samples and exposures", n - 1, steps)
            stage_samples, unflagged = _read_stage_samples(release.all_stage[day], users, items)
            exposures = _read_exposures(release.realshow[day], users, items)
            requests = _requests_of(day, release, stage_samples, exposures)
            writer.write_day(day, requests=requests, exposures=exposures, stage_samples=stage_samples)
            unflagged_rows += unflagged
            first_requests.add(requests)
            report(f"{day}: {requests.num_rows:,} requests, {exposures.num_rows:,} exposures, "
                   f"{stage_samples.num_rows:,} stage samples; reading behaviour sequences", n - 1, steps)
            history, orphans = _pre_window_history(release.sequences[day], requests, first_requests, items)
            history_parts.append(history)
            orphan_sequences += orphans
            report(f"{day}: done", n, steps)

        video_info = release.root / "others" / "realshow_video_info.feather"
        if video_info.is_file():
            report(f"reading {video_info.name}", len(release.days), steps)
            for chunk in _feather_chunks(video_info, ("video_id", *ITEM_FIELDS)):
                items.add(chunk.append_column("seen_ms", pa.array(np.full(chunk.num_rows, -1, np.int64))))
        report("writing users, items and history", len(release.days), steps)
        writer.write_users(users.table())
        writer.write_items(items.table())
        writer.write_history(_dedup_history(history_parts))
        notes = _notes(users, items, unflagged_rows, orphan_sequences)
        for note in notes:
            log.warning("RecFlow import: %s", note)
        path = writer.commit(release_vocab=release_vocab, release_days=release.available_days, notes=notes)
    report("done", steps, steps)
    return path


# ----------------------------------------------------------------------------- release layout


class _Release:
    """The day files of a release, checked before anything is read."""

    def __init__(self, root: Path, days: list[str], available_days: list[str], realshow: dict[str, Path],
                 all_stage: dict[str, Path], sequences: dict[str, Path]):
        self.root, self.days, self.available_days = root, days, available_days
        self.realshow, self.all_stage, self.sequences = realshow, all_stage, sequences

    @classmethod
    def scan(cls, root: Path, days: Iterable[str] | None) -> _Release:
        if not root.is_dir():
            raise DatasetError(f"{root}: RecFlow release directory is missing")
        realshow = _day_files(root / "realshow", ".feather")
        all_stage = _day_files(root / "all_stage", ".feather")
        sequences = _day_files(root / "seq_effective_50_dict", ".pkl")
        available = sorted(set(realshow) | set(all_stage))
        if not available:
            raise DatasetError(f"{root / 'realshow'}: no day files (expected names like 2024-01-13.feather)")
        if days is None:
            chosen = available
        else:
            chosen = sorted({_parse_requested_day(d) for d in ([days] if isinstance(days, str) else days)})
            if not chosen:
                raise DatasetError("days: the filter selects no day")
            unknown = [d for d in chosen if d not in available]
            if unknown:
                raise DatasetError(f"{root}: no day {', '.join(unknown)} in the release "
                                   f"(it has {available[0]} .. {available[-1]})")
        for folder, files, suffix in (("realshow", realshow, ".feather"), ("all_stage", all_stage, ".feather"),
                                      ("seq_effective_50_dict", sequences, ".pkl")):
            for day in chosen:
                if day not in files:
                    raise DatasetError(f"{root / folder / (day + suffix)}: file is missing "
                                       f"(day {day} needs realshow, all_stage and seq_effective_50_dict)")
        return cls(root, chosen, available, realshow, all_stage, sequences)


def _day_of_name(stem: str, path: Path) -> str | None:
    """ISO day of a file stem ``2024-01-13`` or ``20240113``; None for other names."""
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", stem):
        iso = stem
    elif re.fullmatch(r"\d{8}", stem):
        iso = f"{stem[:4]}-{stem[4:6]}-{stem[6:]}"
    else:
        return None
    try:
        date.fromisoformat(iso)
    except ValueError:
        raise DatasetError(f"{path}: '{stem}' is not a valid date") from None
    return iso


def _parse_requested_day(day: str) -> str:
    iso = _day_of_name(str(day), Path("days"))
    if iso is None:
        raise DatasetError(f"days: '{day}' is not a day (YYYY-MM-DD or YYYYMMDD)")
    return iso


def _day_files(folder: Path, suffix: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: directory is missing (not a RecFlow release? expected all_stage/, "
                           "realshow/, seq_effective_50_dict/ and others/)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        day = _day_of_name(path.stem, path) if path.suffix == suffix else None
        if day is None:
            continue
        if day in files:
            raise DatasetError(f"{folder}: day {day} has two files, {files[day].name} and {path.name}")
        files[day] = path
    return files


def _read_release_vocab(path: Path) -> dict[str, int]:
    id_cnt = load_restricted(path)
    if not isinstance(id_cnt, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
            for k, v in id_cnt.items()):
        raise DatasetError(f"{path}: expected a dict of field name -> vocabulary size (non-negative int)")
    return {k: int(v) for k, v in sorted(id_cnt.items())}


# ----------------------------------------------------------------------------- feather reading


def _feather_chunks(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    """Yield ``path``'s record batches projected on ``columns``, as int64 tables.

    Checks names and types from the schema before any data is read, so that
    a string column fails fast; decompresses one batch at a time.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file is missing")
    with pa.memory_map(str(path), "r") as source:
        try:
            schema = pa.ipc.open_file(source).schema
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{path}: not a readable Feather file (empty or truncated?): {e}") from None
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
        for c in columns:
            if len(schema.get_all_field_indices(c)) > 1:
                raise DatasetError(f"{path}: column '{c}' appears more than once")
            t = schema.field(c).type
            if not (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)):
                raise DatasetError(f"{path}: column '{c}' has type {t}, expected integers")
        options = pa.ipc.IpcReadOptions(included_fields=[schema.get_field_index(c) for c in columns])
        reader = pa.ipc.open_file(source, options=options)
        rows = 0
        for i in range(reader.num_record_batches):
            try:
                batch = reader.get_batch(i)
            except (pa.ArrowInvalid, OSError) as e:
                raise DatasetError(f"{path}: record batch {i} is unreadable (truncated?): {e}") from None
            rows += batch.num_rows
            yield _as_int64(pa.Table.from_batches([batch]).select(list(columns)), path)
    if rows == 0:
        raise DatasetError(f"{path}: file has no rows")


def _as_int64(table: pa.Table, path: Path) -> pa.Table:
    cols = []
    for name, col in zip(table.column_names, table.columns):
        if col.null_count:
            raise DatasetError(f"{path}: column '{name}' has {col.null_count} missing value(s)")
        if pa.types.is_floating(col.type):
            values = col.to_numpy()
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                raise DatasetError(f"{path}: column '{name}' must hold integers, found non-integer values")
        try:
            cols.append(col.cast(pa.int64(), safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DatasetError(f"{path}: column '{name}' does not fit int64: {e}") from None
    return pa.table(cols, names=table.column_names)


def _check_binary(chunk: pa.Table, columns: Sequence[str], path: Path) -> None:
    for c in columns:
        values = chunk.column(c).to_numpy()
        if np.any((values != 0) & (values != 1)):
            raise DatasetError(f"{path}: column '{c}' holds values other than 0 and 1")


# ----------------------------------------------------------------------------- one day


def _read_stage_samples(path: Path, users: _LatestRows, items: _LatestRows) -> tuple[pa.Table, int]:
    """The day's stage samples (deepest flag wins, exposures left out) and how many rows had no flag."""
    parts, unflagged = [], 0
    for chunk in _feather_chunks(path, ALL_STAGE_COLUMNS):
        _check_binary(chunk, STAGE_FLAGS, path)
        _collect_users_and_items(chunk, users, items)
        stage = np.full(chunk.num_rows, -1, np.int8)
        for code, name in enumerate(STAGES):  # funnel order, so a deeper stage overwrites a shallower one
            stage[chunk.column(name).to_numpy() == 1] = code
        exposed = chunk.column("realshow").to_numpy() == 1
        keep = ~exposed & (stage >= 0)
        unflagged += int(np.count_nonzero(~exposed & (stage < 0)))
        samples = chunk.select([*REQUEST_FIELDS, "video_id", *POSITION_FIELDS]).filter(pa.array(keep))
        parts.append(samples.append_column("stage", pa.array(stage[keep])))
    return pa.concat_tables(parts), unflagged


def _read_exposures(path: Path, users: _LatestRows, items: _LatestRows) -> pa.Table:
    parts = []
    for chunk in _feather_chunks(path, REALSHOW_COLUMNS):
        _check_binary(chunk, LABELS, path)
        _collect_users_and_items(chunk, users, items)
        parts.append(chunk.select([*REQUEST_FIELDS, "video_id", *POSITION_FIELDS, "playing_time", "duration",
                                   *LABELS]))
    return pa.concat_tables(parts)


def _collect_users_and_items(chunk: pa.Table, users: _LatestRows, items: _LatestRows) -> None:
    seen_ms = chunk.column("request_timestamp")
    users.add(chunk.select(["user_id", *PROFILE_FIELDS]).append_column("seen_ms", seen_ms))
    items.add(chunk.select(["video_id", *ITEM_FIELDS]).append_column("seen_ms", seen_ms))


def _requests_of(day: str, release: _Release, stage_samples: pa.Table, exposures: pa.Table) -> pa.Table:
    requests = _distinct(pa.concat_tables([stage_samples.select(list(REQUEST_FIELDS)),
                                           exposures.select(list(REQUEST_FIELDS))]), REQUEST_FIELDS)
    ids = np.sort(requests.column("request_id").to_numpy())
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if repeated.size:
        raise DatasetError(f"{release.realshow[day]} / {release.all_stage[day]}: request_id {repeated[0]} "
                           "appears with more than one user_id or request_timestamp")
    return requests


def _distinct(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    return table.group_by(list(columns), use_threads=False).aggregate([]).select(list(columns))


# ----------------------------------------------------------------------------- accumulated tables


class _LatestRows:
    """Per key (a user or a video), the most recently seen row of some attribute columns.

    Rows come in with a ``seen_ms`` time; ``add`` reduces each chunk to its
    distinct rows and, once ``PENDING_ROWS`` of them wait, merges them into
    the kept table, so that memory holds one row per key plus a bounded
    backlog however large a day is. Keys seen with more than one distinct row
    are remembered as conflicting. Ties in time go to the largest attribute
    values, so the result is deterministic.
    """

    PENDING_ROWS = 2_000_000

    def __init__(self, key: str, fields: Sequence[str]):
        self.key, self.columns = key, [key, *fields]
        self._kept: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.conflicting = np.empty(0, np.int64)

    def add(self, rows: pa.Table) -> None:
        distinct = _latest_per_variant(rows, self.columns)
        self._pending.append(distinct)
        self._pending_rows += distinct.num_rows
        if self._pending_rows >= self.PENDING_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        parts = ([self._kept] if self._kept is not None else []) + self._pending
        variants = _latest_per_variant(pa.concat_tables(parts), self.columns)
        variants = variants.sort_by([(self.key, "ascending"), ("seen_ms", "ascending")]
                                    + [(c, "ascending") for c in self.columns[1:]])
        keys = variants.column(self.key).to_numpy()
        last = np.append(keys[1:] != keys[:-1], True)
        first = np.insert(keys[1:] != keys[:-1], 0, True)
        self.conflicting = np.union1d(self.conflicting, keys[last & ~first])
        self._kept, self._pending, self._pending_rows = variants.filter(pa.array(last)), [], 0

    def table(self) -> pa.Table:
        self.flush()
        return self._kept.select(self.columns)


def _latest_per_variant(rows: pa.Table, columns: list[str]) -> pa.Table:
    grouped = rows.group_by(columns, use_threads=False).aggregate([("seen_ms", "max")])
    return grouped.select([*columns, "seen_ms_max"]).rename_columns([*columns, "seen_ms"])


class _FirstRequests:
    """Each user's first request time in the imported days, as sorted arrays for lookup."""

    def __init__(self) -> None:
        self.user_ids = np.empty(0, np.int64)
        self.first_ms = np.empty(0, np.int64)

    def add(self, requests: pa.Table) -> None:
        users = np.concatenate([self.user_ids, requests.column("user_id").to_numpy()])
        times = np.concatenate([self.first_ms, requests.column("request_timestamp").to_numpy()])
        order = np.lexsort((times, users))
        users, times = users[order], times[order]
        first = np.insert(users[1:] != users[:-1], 0, True)
        self.user_ids, self.first_ms = users[first], times[first]

    def of(self, user_ids: np.ndarray) -> np.ndarray:
        """First request time of each of ``user_ids`` (all of which have requested)."""
        return self.first_ms[np.searchsorted(self.user_ids, user_ids)]


# ----------------------------------------------------------------------------- behaviour sequences


def _pre_window_history(path: Path, requests: pa.Table, first_requests: _FirstRequests,
                        items: _LatestRows) -> tuple[pa.Table, int]:
    """History rows from one day's sequence pickle, and how many sequences had no known request.

    Each sequence belongs to the request it is keyed by, hence to that
    request's user; its real rows before the user's first request are kept.
    """
    sequences = load_restricted(path)
    if not isinstance(sequences, dict):
        raise DatasetError(f"{path}: expected a dict {{request_id: int array [50, 10]}}, "
                           f"found a {type(sequences).__name__}")
    order = np.argsort(requests.column("request_id").to_numpy(), kind="stable")
    request_ids = requests.column("request_id").to_numpy()[order]
    request_users = requests.column("user_id").to_numpy()[order]
    keys = list(sequences)
    parts, orphans = [], 0
    for start in range(0, len(keys), SEQUENCES_PER_BLOCK):
        block = keys[start:start + SEQUENCES_PER_BLOCK]
        arrays = [_checked_sequence(sequences[k], k, path) for k in block]
        rows = np.concatenate(arrays) if arrays else np.empty((0, len(SEQUENCE_COLUMNS)), np.int64)
        owners = np.repeat(np.array(block, dtype=np.int64), [len(a) for a in arrays])
        pos = np.minimum(np.searchsorted(request_ids, owners), max(len(request_ids) - 1, 0))
        known = request_ids[pos] == owners
        orphans += len(set(owners[~known].tolist()))
        rows, users = rows[known], request_users[pos[known]]
        ts = rows[:, _SEQ["request_timestamp"]]
        before = (ts > 0) & (ts < first_requests.of(users))
        rows, users = rows[before], users[before]
        items.add(pa.table({"video_id": rows[:, _SEQ["video_id"]],
                            **{f: rows[:, _SEQ[f]] for f in ITEM_FIELDS},
                            "seen_ms": rows[:, _SEQ["request_timestamp"]]}))
        parts.append(pa.table({"user_id": users, "timestamp": rows[:, _SEQ["request_timestamp"]],
                               "video_id": rows[:, _SEQ["video_id"]],
                               "playing_time": rows[:, _SEQ["playing_time"]]}))
    return _dedup_history(parts), orphans


def _checked_sequence(value: object, key: object, path: Path) -> np.ndarray:
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise DatasetError(f"{path}: key {key!r} is not an integer request id")
    if (not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.ndim != 2
            or value.shape[1] != len(SEQUENCE_COLUMNS)):
        found = (f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray)
                 else type(value).__name__)
        raise DatasetError(f"{path}: request {key}: expected an integer array [50, {len(SEQUENCE_COLUMNS)}] "
                           f"({', '.join(SEQUENCE_COLUMNS)}), found {found}")
    return value.astype(np.int64, copy=False)


def _dedup_history(parts: list[pa.Table]) -> pa.Table:
    """One row per (user, timestamp, video); a view stored twice with different watch times keeps the longer."""
    history = pa.concat_tables(parts) if parts else pa.table(
        {c: pa.array([], pa.int64()) for c in ("user_id", "timestamp", "video_id", "playing_time")})
    grouped = history.group_by(["user_id", "timestamp", "video_id"], use_threads=False).aggregate(
        [("playing_time", "max")])
    table = grouped.select(["user_id", "timestamp", "video_id", "playing_time_max"]).rename_columns(
        ["user_id", "timestamp", "video_id", "playing_time"])
    return table.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("video_id", "ascending")])


def _notes(users: _LatestRows, items: _LatestRows, unflagged_rows: int, orphan_sequences: int) -> list[str]:
    notes = []
    for rows, what, kept in ((users, "user(s) appeared with more than one profile", "profile"),
                             (items, "video(s) appeared with more than one set of features", "features")):
        if rows.conflicting.size:
            examples = ", ".join(str(k) for k in rows.conflicting[:5])
            notes.append(f"{rows.conflicting.size} {what}; each keeps its most recently seen {kept} "
                         f"({rows.key} {examples}{', ...' if rows.conflicting.size > 5 else ''})")
    if unflagged_rows:
        notes.append(f"{unflagged_rows} all_stage row(s) carried no stage flag and were skipped")
    if orphan_sequences:
        notes.append(f"{orphan_sequences} behaviour sequence(s) belong to requests in neither realshow nor "
                     "all_stage and were skipped")
    return notes
