"""Importing MovieLens 100K and 1M folders into the canonical dataset.

Design notes: docs/design/import-movielens.md
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fedpa.foundation.errors import FedpaError

from .schema import LABELS
from .store import DatasetError, DatasetWriter

GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western")
"""MovieLens genres in the order of 100K's flag columns (after its leading "unknown")."""

AGE_CODES_1M = (1, 18, 25, 35, 45, 50, 56)
"""1M age codes, each the lower bound of its range; the canonical age is 1 + the index here."""

OCCUPATIONS_100K = ("administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
                    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other",
                    "programmer", "retired", "salesman", "scientist", "student", "technician", "writer")
OCCUPATIONS_1M = ("other or not specified", "academic/educator", "artist", "clerical/admin",
                  "college/grad student", "customer service", "doctor/health care", "executive/managerial",
                  "farmer", "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
                  "scientist", "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed",
                  "writer")
GENDERS = {"M": 1, "F": 2}
LABEL_MODES = ("explicit", "implicit")

Progress = Callable[[str, int, int], None]
"""Called with (what is happening, steps done, total steps), as the CLI's progress bar expects."""


@dataclass(frozen=True)
class _Variant:
    name: str
    ratings: str
    users: str
    items: str
    ratings_separator: str
    occupations: tuple[str, ...]


ML_100K = _Variant("movielens-100k", "u.data", "u.user", "u.item", "\t", OCCUPATIONS_100K)
ML_1M = _Variant("movielens-1m", "ratings.dat", "users.dat", "movies.dat", "::", OCCUPATIONS_1M)


def import_movielens(src: str | Path, out: str | Path, *, label: str = "explicit", threshold: int = 4,
                     overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Convert the MovieLens 100K or 1M folder ``src`` into a canonical dataset at ``out``; return its path.

    ``label`` / ``threshold`` choose how a rating becomes ``effective_view``
    (see the module docstring); ``progress`` is told about reading the
    files, then about each day written.
    """
    if label not in LABEL_MODES:
        raise FedpaError(f"label must be one of {', '.join(LABEL_MODES)}, got {label!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= 5:
        raise FedpaError(f"threshold must be a rating from 1 to 5, got {threshold!r}")
    report = progress or (lambda *step: None)
    src = Path(src)
    variant = _detect(src)
    report(f"reading {variant.users}, {variant.items} and {variant.ratings}", 0, 1)
    if variant is ML_100K:
        users, user_index = _users_100k(src / variant.users)
        items, movie_index = _items_100k(src / variant.items)
    else:
        users, user_index = _users_1m(src / variant.users)
        items, movie_index = _items_1m(src / variant.items)
    ratings = _ratings(src / variant.ratings, variant.ratings_separator, user_index, movie_index)

    with DatasetWriter(out, source=variant.name, overwrite=overwrite) as writer:
        writer.write_users(users)
        writer.write_items(items)
        day_numbers = ratings.timestamp // 86_400
        days, starts = np.unique(day_numbers, return_index=True)
        bounds = [*starts.tolist(), len(day_numbers)]
        for n, (day, lo, hi) in enumerate(zip(days, bounds[:-1], bounds[1:]), 1):
            iso = str(np.datetime64(int(day), "D"))
            requests, exposures = _day_tables(ratings, lo, hi, label, threshold)
            writer.write_day(iso, requests=requests, exposures=exposures)
            report(f"{iso}: {hi - lo:,} rating(s)", n, len(days))
        return writer.commit(label=label, threshold=threshold if label == "explicit" else None,
                             genres=list(GENRES), occupations=list(variant.occupations),
                             age_buckets=["under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"])


def _detect(src: Path) -> _Variant:
    if not src.is_dir():
        raise DatasetError(f"{src}: MovieLens directory is missing")
    found = [v for v in (ML_100K, ML_1M) if (src / v.ratings).is_file()]
    if len(found) != 1:
        raise DatasetError(f"{src}: " + ("holds both u.data (100K) and ratings.dat (1M); point to one of them"
                                         if found else "not a MovieLens 100K or 1M folder (no u.data or ratings.dat)"))
    for name in (found[0].users, found[0].items):
        if not (src / name).is_file():
            raise DatasetError(f"{src / name}: file is missing ({found[0].name} needs it)")
    return found[0]


# ----------------------------------------------------------------------------- parsing


def _lines(path: Path, separator: str, n_fields: int) -> Iterator[tuple[str, list[str]]]:
    """Yield (``"path, line N"``, fields) for each non-blank line with exactly ``n_fields`` fields.

    Splits on "\\n" only: latin-1 titles may contain characters that
    ``str.splitlines`` would take for line breaks (\\x85, \\x1c).
    """
    text = path.read_text(encoding="latin-1")
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split(separator)
        where = f"{path}, line {number}"
        if len(fields) != n_fields:
            raise DatasetError(f"{where}: expected {n_fields} fields separated by {separator!r}, found {len(fields)}")
        yield where, fields


def _int(text: str, what: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{where}: {what} {text!r} is not an integer") from None


def _code(value: str, codes: dict, what: str, where: str) -> int:
    if value not in codes:
        raise DatasetError(f"{where}: unknown {what} {value!r} (expected one of {', '.join(map(str, codes))})")
    return codes[value]


def _age_bucket_100k(age: int, where: str) -> int:
    if age < 1:
        raise DatasetError(f"{where}: age {age} is not a positive number of years")
    return int(np.searchsorted(AGE_CODES_1M, age, side="right"))


def _numbered(rows: list[dict[str, int]], orig: str, new: str, file: Path) -> tuple[pa.Table, dict[int, int]]:
    """Renumber rows 0..n-1 in the order of their original id ``orig``; return the table and orig -> new.

    New ids grow with original ids, so ordering by either gives the same order.
    """
    if not rows:
        raise DatasetError(f"{file}: no rows")
    rows = sorted(rows, key=lambda r: r[orig])
    for a, b in zip(rows, rows[1:]):
        if a[orig] == b[orig]:
            raise DatasetError(f"{file}: id {a[orig]} appears twice")
    table = pa.table({new: np.arange(len(rows), dtype=np.int64),
                      **{c: pa.array([r[c] for r in rows], pa.int64()) for c in rows[0]}})
    return table, {r[orig]: i for i, r in enumerate(rows)}


def _user_row(orig_id: int, age: int, gender: int, occupation: int) -> dict[str, int]:
    return {"orig_user_id": orig_id, "device_id": 0, "age": age, "gender": gender, "province": 0,
            "occupation": occupation}


def _users_100k(path: Path) -> tuple[pa.Table, dict[int, int]]:
    occupations = {name: i + 1 for i, name in enumerate(OCCUPATIONS_100K)}
    rows = []
    for where, (uid, age, gender, occupation, _zip) in _lines(path, "|", 5):
        rows.append(_user_row(_int(uid, "user id", where), _age_bucket_100k(_int(age, "age", where), where),
                              _code(gender, GENDERS, "gender", where),
                              _code(occupation, occupations, "occupation", where)))
    return _numbered(rows, "orig_user_id", "user_id", path)


def _users_1m(path: Path) -> tuple[pa.Table, dict[int, int]]:
    ages = {str(code): i + 1 for i, code in enumerate(AGE_CODES_1M)}
    occupations = {str(code): code + 1 for code in range(len(OCCUPATIONS_1M))}
    rows = []
    for where, (uid, gender, age, occupation, _zip) in _lines(path, "::", 5):
        rows.append(_user_row(_int(uid, "user id", where), _code(age, ages, "age code", where),
                              _code(gender, GENDERS, "gender", where),
                              _code(occupation, occupations, "occupation code", where)))
    return _numbered(rows, "orig_user_id", "user_id", path)


def _item_row(orig_id: int, genres: list[int], year: int) -> dict[str, int]:
    return {"orig_movie_id": orig_id, "author_id": 0, "category_level_one": genres[0] + 1 if genres else 0,
            "category_level_two": 0, "upload_type": 0, "upload_timestamp": 0, "duration": 0,
            "genres": sum(1 << g for g in genres), "year": year}


def _items_100k(path: Path) -> tuple[pa.Table, dict[int, int]]:
    rows = []
    for where, fields in _lines(path, "|", 5 + 1 + len(GENRES)):
        movie, release = _int(fields[0], "movie id", where), fields[2]
        flags = [_code(f, {"0": 0, "1": 1}, "genre flag", where) for f in fields[6:]]  # fields[5]: "unknown"
        year = re.search(r"(\d{4})$", release)
        if release and not year:
            raise DatasetError(f"{where}: release date {release!r} does not end in a year")
        rows.append(_item_row(movie, [g for g, flag in enumerate(flags) if flag], int(year[1]) if year else 0))
    return _numbered(rows, "orig_movie_id", "video_id", path)


def _items_1m(path: Path) -> tuple[pa.Table, dict[int, int]]:
    genre_index = {name: i for i, name in enumerate(GENRES)}
    rows = []
    for where, (movie, title, genres) in _lines(path, "::", 3):
        year = re.search(r"\((\d{4})\)\s*$", title)
        codes = [_code(g, genre_index, "genre", where) for g in genres.split("|") if g]
        rows.append(_item_row(_int(movie, "movie id", where), codes, int(year[1]) if year else 0))
    return _numbered(rows, "orig_movie_id", "video_id", path)


@dataclass
class _Ratings:
    """All ratings as parallel arrays, sorted by (time, original user id, original movie id)."""
    user_id: np.ndarray
    video_id: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray


def _ratings(path: Path, separator: str, user_index: dict[int, int], movie_index: dict[int, int]) -> _Ratings:
    users, movies, ratings, times = [], [], [], []
    for where, (user, movie, rating, ts) in _lines(path, separator, 4):
        user, movie = _int(user, "user id", where), _int(movie, "movie id", where)
        rating, ts = _int(rating, "rating", where), _int(ts, "timestamp", where)
        if not 1 <= rating <= 5:
            raise DatasetError(f"{where}: rating {rating} is outside 1..5")
        if user not in user_index:
            raise DatasetError(f"{where}: user {user} is not in the user file")
        if movie not in movie_index:
            raise DatasetError(f"{where}: movie {movie} is not in the item file")
        users.append(user_index[user])
        movies.append(movie_index[movie])
        ratings.append(rating)
        times.append(ts)
    if not times:
        raise DatasetError(f"{path}: no ratings")
    user_id, video_id = np.array(users, np.int64), np.array(movies, np.int64)
    timestamp = np.array(times, np.int64)
    order = np.lexsort((video_id, user_id, timestamp))  # new ids sort like the original ones
    return _Ratings(user_id=user_id[order], video_id=video_id[order],
                    rating=np.array(ratings, np.int64)[order], timestamp=timestamp[order])


def _day_tables(ratings: _Ratings, lo: int, hi: int, label: str, threshold: int) -> tuple[pa.Table, pa.Table]:
    n = hi - lo
    request_id = np.arange(lo, hi, dtype=np.int64)
    request_ms = ratings.timestamp[lo:hi] * 1000
    user_id = ratings.user_id[lo:hi]
    positive = ratings.rating[lo:hi] >= threshold if label == "explicit" else np.ones(n, bool)
    unobserved = np.full(n, -1, np.int8)
    requests = pa.table({"request_id": request_id, "user_id": user_id, "request_timestamp": request_ms})
    exposures = pa.table({
        "request_id": request_id, "user_id": user_id, "request_timestamp": request_ms,
        "video_id": ratings.video_id[lo:hi], "rank_index": np.full(n, -1, np.int32),
        "rerank_index": np.full(n, -1, np.int32), "playing_time": np.full(n, -1, np.int64),
        "duration": np.zeros(n, np.int64), "effective_view": positive.astype(np.int8),
        **{lab: unobserved for lab in LABELS if lab != "effective_view"}})
    return requests, exposures
