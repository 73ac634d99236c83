"""The canonical fedpa dataset: one on-disk format that every source becomes.

A dataset is a directory::

    manifest.json              format version, source, days, vocabulary sizes, counts
    users.arrow                one row per user: id + categorical profile columns
    items.arrow                one row per item: id + categorical/numeric item columns
    requests/DAY.arrow         one row per request
    exposures/DAY.arrow        one row per exposed item (RecFlow's `realshow`) with feedback
    stage_samples/DAY.arrow    one row per funnel stage sample (items a stage filtered or kept)
    history.arrow              optional: effective views from before the first day
    oracle/                    synthetic only: the latent world, for oracle evaluation

Every table is an Arrow IPC file (Feather v2), uncompressed, so that a reader
memory-maps it and slices one user's rows without copying. Day tables are
sorted by (user_id, request_timestamp) for the same reason. DAY is ISO
(``2024-01-13``). Behaviour sequences are *derived*, never stored: the last
``SEQ_LEN`` effective views strictly before a request's timestamp, from
``history`` and the exposures (see ``recdata.sequences``), so they
can never leak the future.

This module is the single source of truth for column names and dtypes; the
README's data section is generated from the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from fedpa.foundation.batch import FUNNEL_LEVELS

FORMAT_VERSION = 1
SEQ_LEN = 50  # RecFlow keeps the last 50 effective views per request


@dataclass(frozen=True)
class Column:
    name: str
    dtype: pa.DataType
    meaning: str
    required: bool = True


def _schema(cols: list[Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.dtype, nullable=False) for c in cols])


USER_COLUMNS = [
    Column("user_id", pa.int64(), "user id, 0-based"),
    Column("device_id", pa.int64(), "device id (0 = unknown)"),
    Column("age", pa.int32(), "age bucket (0 = unknown)"),
    Column("gender", pa.int32(), "gender code (0 = unknown)"),
    Column("province", pa.int32(), "province code (0 = unknown)"),
]
"""Required user columns. A source may add more integer profile columns
(MovieLens `occupation`, KuaiSAR `onehot_feat1`, ...); the manifest lists all
profile columns under ``user_features``."""

ITEM_COLUMNS = [
    Column("video_id", pa.int64(), "item id, 0-based (MovieLens: movie id)"),
    Column("author_id", pa.int64(), "author / uploader id (0 = unknown)"),
    Column("category_level_one", pa.int32(), "top-level category (MovieLens: first genre)"),
    Column("category_level_two", pa.int32(), "second-level category (0 = unknown)"),
    Column("upload_type", pa.int32(), "upload type code (0 = unknown)"),
    Column("upload_timestamp", pa.int64(), "upload time, seconds since epoch (0 = unknown)"),
    Column("duration", pa.int64(), "duration in ms (0 = unknown)"),
]

DOMAIN_COLUMN = Column("domain", pa.int64(), "the surface the item is shown on (1, 2, ...: the manifest's "
                       "`domains` names them), for a dataset of several surfaces", required=False)
"""Optional item column of a dataset that spans surfaces (short video and live streaming, search and
recommendation): the row-level key by which training and evaluation rows are chosen per domain. With it
the manifest's ``domains`` maps each code to its name; a dataset without it is one domain."""

REQUEST_COLUMNS = [
    Column("request_id", pa.int64(), "request id, unique in the dataset"),
    Column("user_id", pa.int64(), "who asked"),
    Column("request_timestamp", pa.int64(), "request time, ms since epoch"),
]

LABELS = ("effective_view", "long_view", "like", "follow", "forward", "comment")
"""Binary feedback labels, RecFlow's. ``effective_view`` (watched >= 30%) is the
primary label; sources with one label (clicks, ratings) map it there."""

EXPOSURE_COLUMNS = [
    Column("request_id", pa.int64(), "request the item was exposed in"),
    Column("user_id", pa.int64(), "user"),
    Column("request_timestamp", pa.int64(), "request time, ms"),
    Column("video_id", pa.int64(), "exposed item"),
    Column("rank_index", pa.int32(), "position in the ranking stage output (-1 = unknown)"),
    Column("rerank_index", pa.int32(), "position in the re-ranking output (-1 = unknown)"),
    Column("playing_time", pa.int64(), "watch time in ms (-1 = unknown)"),
    Column("duration", pa.int64(), "item duration in ms (0 = unknown)"),
    *[Column(lab, pa.int8(), f"binary label {lab} (-1 = not observed)") for lab in LABELS],
]

# Funnel stage codes, in funnel order: a larger code survived longer.
STAGES = ("prerank_neg", "coarse_neg", "rank_neg", "rank_pos", "rerank_neg", "rerank_pos")
STAGE_CODE = {s: i for i, s in enumerate(STAGES)}
# Preference level for RecFlow's FS-LTR order:
# click > realshow > rerank/rank_pos > rerank/rank_neg > coarse_neg > prerank_neg > random.
STAGE_LEVEL = {s: FUNNEL_LEVELS[s] for s in STAGES}
LEVEL_RANDOM, LEVEL_REALSHOW, LEVEL_CLICK = FUNNEL_LEVELS["random"], FUNNEL_LEVELS["realshow"], FUNNEL_LEVELS["click"]

STAGE_SAMPLE_COLUMNS = [
    Column("request_id", pa.int64(), "request the sample belongs to"),
    Column("user_id", pa.int64(), "user"),
    Column("request_timestamp", pa.int64(), "request time, ms"),
    Column("video_id", pa.int64(), "candidate item"),
    Column("stage", pa.int8(), "stage label code: " + ", ".join(f"{i}={s}" for i, s in enumerate(STAGES))),
    Column("rank_index", pa.int32(), "position in the ranking output (-1 = not ranked)"),
    Column("rerank_index", pa.int32(), "position in the re-ranking output (-1 = not re-ranked)"),
]

HISTORY_COLUMNS = [
    Column("user_id", pa.int64(), "user"),
    Column("timestamp", pa.int64(), "time of the view, ms"),
    Column("video_id", pa.int64(), "viewed item"),
    Column("playing_time", pa.int64(), "watch time in ms (-1 = unknown)"),
]

TABLES: dict[str, list[Column]] = {
    "users": USER_COLUMNS,
    "items": ITEM_COLUMNS,
    "requests": REQUEST_COLUMNS,
    "exposures": EXPOSURE_COLUMNS,
    "stage_samples": STAGE_SAMPLE_COLUMNS,
    "history": HISTORY_COLUMNS,
}
DAY_TABLES = ("requests", "exposures", "stage_samples")
SCHEMAS: dict[str, pa.Schema] = {name: _schema(cols) for name, cols in TABLES.items()}

# How a user's rows split into train / validation / test (`recdata.partition`): by-day (RecFlow's protocol),
# chrono (60/20/20 per user), loo (leave one out against sampled negatives), last (MRFF: last pair per user).
SPLITS = ("by-day", "chrono", "loo", "last")
# loo: sampled negatives per training positive (PFedRec's protocol; with a negative pool, per positive and round)
TRAIN_NEGATIVES = 4

# Whose evaluation a run of several domains keeps (`recdata.partition.select_domains`): every user's, or only
# those with (cross-domain) or without (single-domain) training rows in a domain other than the evaluated ones.
EVAL_USERS = ("all", "cross-domain", "single-domain")
