"""Importing a generic interaction log (CSV or Parquet, optional user and item feature tables) into the
canonical dataset through a column mapping (TOML).

Design notes: docs/design/import-interactions.md
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedpa.foundation.errors import FedpaError

from .schema import ITEM_COLUMNS, LABELS, USER_COLUMNS
from .store import DatasetError, DatasetWriter, is_text_type

Progress = Callable[[str, int, int], None]
VOCABULARIES = "vocabularies.json"   # text features' values by code: {"users": {column: [value of code 1, ...]}, ...}
TIME_UNITS = ("ms", "s", "iso")
ITEM_FIELDS_MAPPABLE = tuple(c.name for c in ITEM_COLUMNS if c.name != "video_id")
USER_CANONICAL = tuple(c.name for c in USER_COLUMNS if c.name != "user_id")


DEFAULT_LABEL = "label"
_THRESHOLD = re.compile(r"^\s*(?P<column>[^<>=!]+?)\s*(?P<op>>=|>)\s*(?P<value>[-+]?(\d+(\.\d*)?|\.\d+))\s*$")


@dataclass(frozen=True)
class LabelSource:
    """Where a label comes from: a 0/1 column (``is_click``), or a numeric column above a threshold
    (``rating >= 4``: explicit ratings turned into positives and negatives, as FedPA's protocol on MovieLens)."""

    column: str
    op: str | None = None       # ">=" | ">" | None (the column holds 0/1)
    threshold: float = 0.0

    @classmethod
    def parse(cls, spec: str, canonical: str) -> LabelSource:
        if not isinstance(spec, str) or not spec.strip():
            raise FedpaError(f"label {canonical}: the source must be a column name or 'column >= value', got {spec!r}")
        m = _THRESHOLD.match(spec)
        if m:
            return cls(m["column"], m["op"], float(m["value"]))
        if any(c in spec for c in "<>=!"):
            raise FedpaError(f"label {canonical}: cannot read {spec!r}; write a column name (0/1 values) or "
                             f"'column >= value' / 'column > value'")
        return cls(spec.strip())

    def describe(self) -> str:
        return self.column if self.op is None else f"{self.column} {self.op} {self.threshold:g}"


@dataclass
class Mapping:
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    time_unit: str = "ms"
    labels: dict[str, str] = field(default_factory=lambda: {"effective_view": DEFAULT_LABEL})  # canonical -> source
    # (a 0/1 column, or "column >= value" / "column > value" over a numeric one: `LabelSource`)
    user_id: str | None = None            # id column of the user table (default: `user`)
    user_features: list[str] | None = None  # None: every other column
    item_id: str | None = None            # id column of the item table (default: `item`)
    item_columns: dict[str, str] = field(default_factory=dict)  # canonical or extra name -> source column
    domains: dict[int, str] = field(default_factory=dict)  # items.domain code -> name (several surfaces)
    implicit: bool = False                # every interaction is a positive of the primary label (no label column)

    def validate(self) -> None:
        if self.time_unit not in TIME_UNITS:
            raise FedpaError(f"time_unit must be one of {', '.join(TIME_UNITS)}, got {self.time_unit!r}")
        if self.implicit and self.labels.get(LABELS[0], DEFAULT_LABEL) != DEFAULT_LABEL:
            raise FedpaError(f"the mapping is implicit (every interaction is a positive of {LABELS[0]}) and also "
                             f"names a column for {LABELS[0]} ({self.labels[LABELS[0]]!r}): keep one")
        if not self.implicit and not self.label_sources():
            raise FedpaError("the mapping names no label column (e.g. labels.effective_view = \"is_click\", "
                             "\"rating >= 4\", or implicit = true)")
        unknown = sorted(set(self.labels) - set(LABELS))
        if unknown:
            raise FedpaError(f"unknown label(s) {', '.join(unknown)} in the mapping (labels: {', '.join(LABELS)})")
        for canonical, spec in self.label_sources().items():
            LabelSource.parse(spec, canonical)

    def label_sources(self) -> dict[str, str]:
        """Canonical label -> its source spec; an implicit log's primary label is not read from a column."""
        if not self.implicit:
            return dict(self.labels)
        return {k: v for k, v in self.labels.items() if k != LABELS[0]}

    @classmethod
    def from_toml(cls, path: str | Path) -> Mapping:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise FedpaError(f"{p}: no such mapping file") from None
        except tomllib.TOMLDecodeError as e:
            raise FedpaError(f"{p}: not valid TOML ({e})") from None
        inter, users, items = raw.get("interactions", {}), raw.get("users", {}), raw.get("items", {})
        unknown = sorted(set(raw) - {"interactions", "users", "items"})
        if unknown:
            raise FedpaError(f"{p}: unknown section(s) {', '.join(unknown)} (interactions, users, items)")
        try:
            m = cls(user=inter.get("user", "user_id"), item=inter.get("item", "item_id"),
                    timestamp=inter.get("timestamp", "timestamp"), time_unit=inter.get("time_unit", "ms"),
                    labels=dict(inter.get("labels", {"effective_view": "label"})),
                    user_id=users.get("id"), user_features=users.get("features"),
                    item_id=items.get("id"), item_columns=dict(items.get("columns", {})),
                    domains={int(k): str(v) for k, v in dict(items.get("domains", {})).items()},
                    implicit=bool(inter.get("implicit", False)))
        except (TypeError, ValueError) as e:
            raise FedpaError(f"{p}: malformed mapping ({e})") from None
        m.validate()
        return m


KUAISAR_R = Mapping(user="user_id", item="video_id", timestamp="timestamp", time_unit="ms", user_id="user_id",
                    item_id="video_id",
                    labels={"effective_view": "is_click"},
                    user_features=["onehot_feat1", "onehot_feat2", "search_active_level", "reco_active_level"],
                    item_columns={"upload_type": "upload_type", "category_level_one": "first_level_category_name",
                                  "category_level_two": "second_level_category_name", "item_type": "item_type",
                                  "category_level_three": "third_level_category_name",
                                  "category_level_four": "fourth_level_category_name"})
"""KuaiSAR-R (../shared/data/kuaisar-r): df.csv + user_features.csv + video_features.csv."""


# ----------------------------------------------------------------------------- reading


def read_table(path: str | Path) -> pa.Table:
    """A table from CSV, TSV (``.tsv``, ``.tab``), Parquet or newline-delimited JSON (Amazon's and Yelp's review
    dumps), by the file's suffix; the text formats may be compressed (``.gz``, ``.bz2``)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: file is missing")
    suffixes = [x.lower() for x in p.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes = suffixes[:-1]
    kind = ("Parquet" if suffixes[-1:] in ([".parquet"], [".pq"])
            else "JSON lines" if suffixes[-1:] in ([".json"], [".jsonl"], [".ndjson"])
            else "TSV" if suffixes[-1:] in ([".tsv"], [".tab"]) else "CSV")
    try:
        if kind == "Parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p)
        if kind == "JSON lines":
            import pyarrow.json as pjson

            return pjson.read_json(p)
        import pyarrow.csv as pcsv

        return pcsv.read_csv(p, parse_options=pcsv.ParseOptions(delimiter="\t" if kind == "TSV" else ","))
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"{p}: cannot read as {kind} ({str(e).splitlines()[0]})") from None


def _column(table: pa.Table, name: str, where: Path, role: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DatasetError(f"{where}: column '{name}' ({role}) is missing; columns: {', '.join(table.column_names)}")
    col = table.column(name)
    if col.null_count:
        raise DatasetError(f"{where}: column '{name}' ({role}) has {col.null_count} empty value(s)")
    return col


def _integers(col: pa.ChunkedArray, name: str, where: Path, role: str, *, nonnegative: bool = False) -> np.ndarray:
    """Integer values; floats are accepted when they are whole (CSV readers often type ids as double)."""
    t = col.type
    if pa.types.is_integer(t):
        v = col.to_numpy().astype(np.int64)
    elif pa.types.is_floating(t):
        f = col.to_numpy()
        whole = np.isfinite(f) & (f == np.round(f))
        if not whole.all():
            bad = float(f[~whole][0])
            raise DatasetError(f"{where}: column '{name}' ({role}) holds {bad!r}, not an integer")
        v = f.astype(np.int64)
    else:
        try:
            v = pc.cast(col, pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            sample = next((x for x in col.to_pylist() if not str(x).lstrip("-").isdigit()), col[0].as_py())
            raise DatasetError(f"{where}: column '{name}' ({role}) holds {sample!r}, not an integer") from None
    if nonnegative and len(v) and v.min() < 0:
        raise DatasetError(f"{where}: column '{name}' ({role}) holds {int(v.min())}; values must be >= 0")
    return v


def _timestamps_ms(col: pa.ChunkedArray, name: str, where: Path, unit: str) -> np.ndarray:
    if unit == "iso":
        try:
            ts = pc.cast(col, pa.timestamp("ms")) if not pa.types.is_timestamp(col.type) else col
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            sample = col[0].as_py()
            raise DatasetError(f"{where}: column '{name}' (timestamp) holds {sample!r}, not an ISO date-time") from None
        return pc.cast(ts, pa.timestamp("ms")).cast(pa.int64()).to_numpy()
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DatasetError(f"{where}: column '{name}' (timestamp in {unit}) holds {col[0].as_py()!r}, not a number "
                           "(use time_unit = \"iso\" for date-times)")
    v = col.to_numpy().astype(np.float64)
    if not np.isfinite(v).all():
        raise DatasetError(f"{where}: column '{name}' (timestamp) holds a non-finite value")
    return np.rint(v * (1000.0 if unit == "s" else 1.0)).astype(np.int64)


def _keys(col: pa.ChunkedArray, name: str, where: Path, role: str) -> np.ndarray:
    """Ids as they are in the source: integers (whole floats too), or text (Amazon's reviewer ids and ASINs,
    hashes, names), kept as numpy strings. Either kind is renumbered 0..n-1 in sorted order."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return _integers(col, name, where, role)
    return np.asarray(_id_text(col, name, where, role).to_numpy(zero_copy_only=False), dtype=str)


def _undictionary(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A dictionary-encoded column (Parquet's strings often are) as its plain values."""
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _id_text(col: pa.ChunkedArray, name: str, where: Path, role: str) -> pa.ChunkedArray:
    """A non-numeric id column as Arrow strings, or an error naming it."""
    try:
        return pc.cast(_undictionary(col), pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DatasetError(f"{where}: column '{name}' ({role}) has type {col.type}, neither integers nor "
                           f"text") from None


@dataclass(frozen=True)
class _LogIds:
    """One id column of the interaction log: its distinct original ids, sorted (integers or text), and each row's
    place among them. The rows never become numpy strings: a text column is hashed by Arrow once (`_log_ids`), and
    what follows (the row filter, matching the feature tables, the new ids) works on the distinct ids and the
    rows' integer codes. (Numpy strings cost 4 bytes a character per row and compare slowly: on 5 million
    Amazon-like rows, codes took an import from 45 s to 29 s and its peak from 1.61 GB to 1.33 GB.)"""

    values: np.ndarray   # the distinct ids, sorted
    codes: np.ndarray    # int64 per row: its id is values[code]

    def rows(self, keep: np.ndarray) -> _LogIds:
        return _LogIds(self.values, self.codes[keep])

    def seen(self) -> np.ndarray:
        """The distinct ids the rows name, sorted."""
        return self.values[np.unique(self.codes)]


def _log_ids(col: pa.ChunkedArray, name: str, where: Path, role: str) -> _LogIds:
    """The id column of the log (`_keys`' kinds) as distinct values and per-row codes."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        values, codes = np.unique(_integers(col, name, where, role), return_inverse=True)
        return _LogIds(values, codes.reshape(-1).astype(np.int64))
    text = _id_text(col, name, where, role)
    distinct = pc.unique(text)
    codes = pc.index_in(text, value_set=distinct).to_numpy(zero_copy_only=False).astype(np.int64)
    values = np.asarray(distinct.to_numpy(zero_copy_only=False), dtype=str)
    order = np.argsort(values, kind="stable")   # numpy's order, which the feature tables' ids are matched in
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return _LogIds(values[order], rank[codes])


def _same_kind(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids of two tables compared as text when either is text (a CSV reader types "123" as an integer in a file
    whose ids are all digits and as text beside "A12" in another)."""
    if (a.dtype.kind == "U") == (b.dtype.kind == "U"):
        return a, b
    return a.astype(str), b.astype(str)


def _show(value) -> str:
    return repr(str(value)) if isinstance(value, (str, np.str_)) else str(int(value))


def _renumber(ids: np.ndarray, where: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique original ids, new id for each input row); duplicates are an error here."""
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DatasetError(f"{where}: {what} id {_show(uniq[counts > 1][0])} appears {int(counts[counts > 1][0])} "
                           f"times")
    return uniq, np.searchsorted(uniq, ids)


def _lookup(ids: _LogIds, known: np.ndarray, where: Path, what: str, table: Path) -> np.ndarray:
    """Each row's new id: the place of its original id among ``known`` (the feature table's sorted ids)."""
    values, known = _same_kind(ids.values, known)
    pos = np.minimum(np.searchsorted(known, values), max(len(known) - 1, 0))
    missing = known[pos] != values if len(known) else np.ones(len(values), bool)
    rows_missing = missing[ids.codes]
    if rows_missing.any():
        raise DatasetError(f"{where}: {int(rows_missing.sum())} interaction(s) name a {what} that {table} lacks "
                           f"(e.g. {what} {_show(ids.values[ids.codes[rows_missing][0]])})")
    return pos[ids.codes]


def _labels(log: pa.Table, mapping: Mapping, src: Path) -> dict[str, np.ndarray]:
    """0/1 per row for every mapped label; an implicit log's primary label is 1 on every row."""
    labels = {LABELS[0]: np.ones(log.num_rows, np.int8)} if mapping.implicit else {}
    for canonical, spec in mapping.label_sources().items():
        source = LabelSource.parse(spec, canonical)
        role = f"label {canonical}"
        col = _column(log, source.column, src, role)
        if source.op is None:
            v = _integers(col, source.column, src, role)
            bad = (v != 0) & (v != 1)
            if bad.any():
                raise DatasetError(f"{src}: column '{source.column}' ({role}) holds {int(v[bad][0])}; labels must "
                                   f"be 0 or 1 (or map a threshold: '{source.column} >= value')")
        else:
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                raise DatasetError(f"{src}: column '{source.column}' ({role}: {source.describe()}) holds "
                                   f"{col[0].as_py()!r}, not a number")
            x = col.to_numpy().astype(np.float64)
            if not np.isfinite(x).all():
                raise DatasetError(f"{src}: column '{source.column}' ({role}) holds a non-finite value")
            v = x >= source.threshold if source.op == ">=" else x > source.threshold
        labels[canonical] = v.astype(np.int8)
    return labels


# ----------------------------------------------------------------------------- the import


@dataclass(frozen=True)
class RowFilter:
    """Which interactions to keep, for implicit-feedback protocols (PFedRec's: clicks only, users with at least
    three, the catalogue = the clicked items; the field's k-core: users and items with at least k each)."""

    positives_only: bool = False    # keep the rows whose primary label is 1 (the other rows are dropped)
    min_user_positives: int = 0     # drop users with fewer positive rows
    interacted_only: bool = False   # users and items = those in the kept rows (renumbered 0..n-1)
    min_item_positives: int = 0     # drop items with fewer positive rows (with the users' bound: a k-core)

    def apply(self, primary: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """A boolean mask of the rows to keep. With both bounds, users and items are dropped in turn until every
        kept user and item has its share of kept positive rows (dropping an item can take a user below its bound,
        and the reverse), as k-core filtering does. ``users``, ``items``: each row's, as ids or codes of them."""
        keep = primary == 1 if self.positives_only else np.ones(len(primary), bool)
        positive = primary == 1
        bounds = [(users, self.min_user_positives), (items, self.min_item_positives)]
        bounds = [(ids, n) for ids, n in bounds if n > 0]
        while bounds:
            before = int(keep.sum())
            for ids, n in bounds:
                held, counts = np.unique(ids[keep & positive], return_counts=True)
                keep &= np.isin(ids, held[counts >= n])
            if int(keep.sum()) == before or len(bounds) == 1:   # one bound: one pass settles it
                break
        return keep


def import_interactions(interactions: str | Path, out: str | Path, mapping: Mapping, *,
                        users: str | Path | None = None, items: str | Path | None = None,
                        overwrite: bool = False, progress: Progress | None = None,
                        rows: RowFilter | None = None) -> Path:
    """Convert the files into a canonical dataset at ``out``; return its path. ``rows`` keeps a subset of the
    interactions (and, with ``interacted_only``, of the users and items)."""
    mapping.validate()
    report = progress or (lambda *step: None)
    src = Path(interactions)
    report(f"reading {src.name}", 0, 1)
    log = read_table(src)
    if log.num_rows == 0:
        raise DatasetError(f"{src}: no interactions")
    u_ids = _log_ids(_column(log, mapping.user, src, "user id"), mapping.user, src, "user id")
    i_ids = _log_ids(_column(log, mapping.item, src, "item id"), mapping.item, src, "item id")
    ts = _timestamps_ms(_column(log, mapping.timestamp, src, "timestamp"), mapping.timestamp, src, mapping.time_unit)
    labels = _labels(log, mapping, src)
    rows = rows or RowFilter()
    if rows != RowFilter():
        primary = labels.get(LABELS[0], next(iter(labels.values())))
        keep = rows.apply(primary, u_ids.codes, i_ids.codes)
        if not keep.any():
            raise DatasetError(f"{src}: no interaction is left after the row filter ({rows})")
        u_ids, i_ids, ts = u_ids.rows(keep), i_ids.rows(keep), ts[keep]
        labels = {k: v[keep] for k, v in labels.items()}

    u_seen, i_seen = u_ids.seen(), i_ids.seen()
    user_table, user_orig, user_vocab = _users(users, mapping, u_seen)
    item_table, item_orig, item_vocab = _items(items, mapping, i_seen)
    if rows.interacted_only:
        user_table, user_orig = _restrict(user_table, user_orig, u_seen, "user_id")
        item_table, item_orig = _restrict(item_table, item_orig, i_seen, "video_id")
    uid = _lookup(u_ids, user_orig, src, "user", Path(users) if users else src)
    vid = _lookup(i_ids, item_orig, src, "item", Path(items) if items else src)
    durations = item_table.column("duration").to_numpy()[vid]

    # requests: one per (user, timestamp), numbered in (time, original user id) order; the new ids follow the
    # original ids' order (both tables are renumbered in sorted order), so they sort text ids the same way
    order = np.lexsort((vid, uid, ts))
    file_row = order.copy()  # each row's place in the file, which lists a request's items in the order shown
    uid, vid, ts, durations = uid[order], vid[order], ts[order], durations[order]
    labels = {k: v[order] for k, v in labels.items()}
    # unique (time, user) pairs, in that order, are the requests
    _, request_of_row = np.unique(np.stack([ts, uid], axis=1), axis=0, return_inverse=True)
    request_of_row = request_of_row.reshape(-1)
    position = _positions(request_of_row, file_row)
    day = ts // 86_400_000
    days, starts = np.unique(day, return_index=True)
    bounds = [*starts.tolist(), len(day)]
    with DatasetWriter(out, source=f"interactions:{src.name}", overwrite=overwrite) as writer:
        writer.write_users(user_table)
        writer.write_items(item_table, domains=mapping.domains or None)
        if user_vocab or item_vocab:   # what each code of a text feature stands for
            writer.write_extra(VOCABULARIES, obj={"users": user_vocab, "items": item_vocab})
        for n, (d, lo, hi) in enumerate(zip(days, bounds[:-1], bounds[1:]), 1):
            iso = str(np.datetime64(int(d), "D"))
            rid = request_of_row[lo:hi].astype(np.int64)
            _, first = np.unique(rid, return_index=True)
            requests = pa.table({"request_id": rid[first], "user_id": uid[lo:hi][first],
                                 "request_timestamp": ts[lo:hi][first]})
            m = hi - lo
            exposures = pa.table({
                "request_id": rid, "user_id": uid[lo:hi], "request_timestamp": ts[lo:hi], "video_id": vid[lo:hi],
                "rank_index": np.full(m, -1, np.int32), "rerank_index": position[lo:hi],
                "playing_time": np.full(m, -1, np.int64), "duration": durations[lo:hi].astype(np.int64),
                **{lab: (labels[lab][lo:hi] if lab in labels else np.full(m, -1, np.int8)) for lab in LABELS}})
            writer.write_day(iso, requests=requests, exposures=exposures)
            report(f"{iso}: {m:,} interaction(s)", n, len(days))
        return writer.commit(mapping={"user": mapping.user, "item": mapping.item, "timestamp": mapping.timestamp,
                                      "time_unit": mapping.time_unit, "implicit": mapping.implicit,
                                      "labels": mapping.label_sources(),
                                      "row_filter": dataclasses.asdict(rows),
                                      "user_features": user_table.column_names[2:],
                                      "item_columns": mapping.item_columns})


def _positions(request_of_row: np.ndarray, file_row: np.ndarray) -> np.ndarray:
    """Each row's position within its request in the file's order (0 = listed first): the list position the
    canonical format keeps as ``rerank_index`` (what was shown last before exposure)."""
    by = np.lexsort((file_row, request_of_row))
    starts = np.r_[0, np.nonzero(np.diff(request_of_row[by]))[0] + 1]
    pos = np.arange(len(by)) - np.repeat(starts, np.diff(np.r_[starts, len(by)]))
    out = np.empty(len(by), np.int32)
    out[by] = pos
    return out


def _restrict(table: pa.Table, orig: np.ndarray, seen: np.ndarray, new_id: str) -> tuple[pa.Table, np.ndarray]:
    """The rows of a feature table whose original id occurs in ``seen``, renumbered 0..n-1 in id order."""
    orig_kind, seen = _same_kind(orig, seen)
    keep = np.isin(orig_kind, np.unique(seen))
    table = table.filter(pa.array(keep))
    return table.set_column(table.column_names.index(new_id), new_id,
                            pa.array(np.arange(table.num_rows, dtype=np.int64))), orig[keep]


def _feature_table(path, id_col: str, columns: dict[str, str] | None, *, what: str, new_id: str,
                   defaults: tuple[str, ...], seen: np.ndarray) -> tuple[pa.Table, np.ndarray, dict[str, list[str]]]:
    """Renumbered ids (``new_id``, ``orig_<new_id>``), the ``defaults`` columns as zeros, and each
    ``columns`` entry (name -> source column; None: every column but the id, under its own name)
    read as non-negative integers, or as codes when it holds text (`_feature_codes`). Without a file: the ids
    ``seen`` in the interactions and zeros. Also returns the vocabulary of every text column."""
    reserved = (new_id, f"orig_{new_id}")
    vocabularies: dict[str, list[str]] = {}
    if path is None:
        orig = np.unique(seen)
        order, t, p = None, None, None
    else:
        p = Path(path)
        t = read_table(p)
        ids, _ = _same_kind(_keys(_column(t, id_col, p, f"{what} id"), id_col, p, f"{what} id"), seen)
        orig, _ = _renumber(ids, p, what)
        order = np.argsort(ids, kind="stable")
        if columns is None:
            columns = {c: c for c in t.column_names if c != id_col}
    cols: dict[str, np.ndarray] = {new_id: np.arange(len(orig), dtype=np.int64), reserved[1]: orig}
    cols.update({c: np.zeros(len(orig), np.int64) for c in defaults})
    for name, source in (columns or {}).items():
        if name in reserved:
            raise DatasetError(f"{p}: {what} column name '{name}' is reserved")
        role = f"{what} {name}"
        if source not in t.column_names:
            _column(t, source, p, role)   # names the missing column and the columns there are
        col = t.column(source)
        if is_text_type(col.type):
            codes, vocabularies[name] = _feature_codes(col)
            cols[name] = codes[order]
        else:
            cols[name] = _integers(_column(t, source, p, role), source, p, role, nonnegative=True)[order]
    return pa.table(cols), orig, vocabularies


def _feature_codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """A text feature (a category name, a brand, "F"/"M") as codes: 1 + its place among the sorted distinct
    values, and 0 for an empty or missing value (the canonical format's "unknown"). Returns the codes and the
    values in code order (code k is ``values[k - 1]``)."""
    text = np.asarray(pc.fill_null(_undictionary(col), "").to_numpy(zero_copy_only=False), dtype=str)
    values, inverse = np.unique(text, return_inverse=True)
    codes = inverse.astype(np.int64) + 1
    if len(values) and values[0] == "":
        codes -= 1
        values = values[1:]
    return codes, values.tolist()


def _users(path, mapping: Mapping, seen: np.ndarray) -> tuple[pa.Table, np.ndarray, dict[str, list[str]]]:
    features = None if mapping.user_features is None else {f: f for f in mapping.user_features}
    return _feature_table(path, mapping.user_id or mapping.user, features, what="user", new_id="user_id",
                          defaults=USER_CANONICAL, seen=seen)


def _items(path, mapping: Mapping, seen: np.ndarray) -> tuple[pa.Table, np.ndarray, dict[str, list[str]]]:
    if path is None and mapping.item_columns:
        raise FedpaError("the mapping names item columns but no item table was given (--items)")
    return _feature_table(path, mapping.item_id or mapping.item, mapping.item_columns if path else {}, what="item",
                          new_id="video_id", defaults=ITEM_FIELDS_MAPPABLE, seen=seen)
