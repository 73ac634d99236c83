"""A tiny RecFlow release in the exact published layout, for importer tests.

Three days, three users, six requests. Every number a test asserts follows
from the tables below:

* each request exposes two videos (``realshow``; slot 0 is an effective view
  watched 20 s, slot 1 is skipped) and carries six stage samples, one per
  stage code 0..5 (slot 5 has rank_pos + rerank_neg, slot 6 rank_pos +
  rerank_pos: the deepest flag must win);
* request 1001 has one extra all_stage row with no flag at all;
* user 1 moves from province 6 (day 1) to province 7 (day 2);
* video 10010 (exposed in request 1001) comes back in request 3001 with
  another duration, and once more in ``realshow_video_info.feather``;
* behaviour sequences hold each user's views before the window (user 0: 3,
  user 1: 60 of which the sequences keep the last 50, user 2: 2, one of them
  during day 1, before user 2's first request on day 2) plus the effective
  views of the user's earlier requests in the window;
* day 3's sequence pickle has one sequence for a request that exists nowhere.
"""

from __future__ import annotations

import pickle
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

DAYS = ("2024-01-13", "2024-01-14", "2024-01-15")
HOUR_MS = 3_600_000
PROFILES = {0: (100, 2, 1, 5), 1: (101, 3, 2, 6), 2: (102, 1, 1, 8)}  # device_id, age, gender, province
MOVED_PROVINCE = 7  # user 1's province from day 2 on
# request_id: (day index, user_id, hours after midnight UTC)
REQUESTS = {1001: (0, 0, 1), 1002: (0, 1, 2), 1003: (0, 0, 3), 2001: (1, 1, 1), 2002: (1, 2, 2),
            3001: (2, 0, 1)}
ORPHAN_REQUEST = 9999
CHANGED_VIDEO, CHANGED_DURATION = 10010, 99_999
VIDEO_INFO_ONLY = 777
ID_CNT = {"user_id": 3, "device_id": 103, "video_id": 40_000, "author_id": np.int64(7), "province": 8}

# slot -> stage flags set on that all_stage row, and its rank / rerank index
STAGE_SLOTS = {2: (("prerank_neg",), -1, -1), 3: (("coarse_neg",), -1, -1), 4: (("rank_neg",), 50, -1),
               7: (("rank_pos",), 9, -1), 5: (("rank_pos", "rerank_neg"), 3, 20),
               6: (("rank_pos", "rerank_pos"), 4, 5)}
FLAGS = ("realshow", "rerank_pos", "rerank_neg", "rank_pos", "rank_neg", "coarse_neg", "prerank_neg")
LABELS = ("effective_view", "long_view", "like", "follow", "forward", "comment")
SEQ_COLUMNS = 10


def day_start_ms(day: str) -> int:
    d = date.fromisoformat(day)
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)


def request_ms(request_id: int) -> int:
    day, _, hour = REQUESTS[request_id]
    return day_start_ms(DAYS[day]) + hour * HOUR_MS


def video_features(video_id: int) -> dict[str, int]:
    return {"author_id": video_id % 7, "category_level_one": video_id % 3, "category_level_two": video_id % 11,
            "upload_type": video_id % 2, "upload_timestamp": 1_700_000_000 + video_id,
            "duration": 10_000 + video_id}


def pre_window_views() -> dict[int, list[tuple[int, int]]]:
    """user -> [(timestamp ms, video_id)] before the window, oldest first."""
    t0 = day_start_ms(DAYS[0])
    return {0: [(t0 - 3 * 24 * HOUR_MS, 900), (t0 - 2 * 24 * HOUR_MS, 901), (t0 - HOUR_MS, 902)],
            1: [(t0 - (100 - i) * HOUR_MS, 910 + i) for i in range(60)],
            2: [(t0 - 5 * HOUR_MS, 980), (t0 + 5 * HOUR_MS, 981)]}


def profile(user_id: int, day: int) -> tuple[int, int, int, int]:
    device, age, gender, province = PROFILES[user_id]
    return device, age, gender, MOVED_PROVINCE if (user_id == 1 and day >= 1) else province


def _row(request_id: int, video_id: int, **values: int) -> dict[str, int]:
    day, user, _ = REQUESTS[request_id]
    device, age, gender, province = profile(user, day)
    row = {"request_id": request_id, "request_timestamp": request_ms(request_id), "user_id": user,
           "device_id": device, "age": age, "gender": gender, "province": province, "video_id": video_id,
           **video_features(video_id), **{f: 0 for f in FLAGS}, "rank_index": -1, "rerank_index": -1,
           "playing_time": 0, **{lab: 0 for lab in LABELS}}
    row.update(values)
    return row


def exposure_rows(request_id: int) -> list[dict[str, int]]:
    effective = _row(request_id, request_id * 10, realshow=1, rerank_pos=1, rank_pos=1, rank_index=0,
                     rerank_index=0, playing_time=20_000, effective_view=1, long_view=request_id % 2,
                     like=int(request_id == 1001), forward=int(request_id == 2002))
    skipped = _row(request_id, request_id * 10 + 1, realshow=1, rerank_pos=1, rank_pos=1, rank_index=1,
                   rerank_index=1, playing_time=1_000)
    return [effective, skipped]


def stage_rows(request_id: int) -> list[dict[str, int]]:
    rows = []
    for slot, (flags, rank_index, rerank_index) in STAGE_SLOTS.items():
        video = request_id * 10 + slot
        extra = {}
        if request_id == 3001 and slot == 2:
            video, extra = CHANGED_VIDEO, {"duration": CHANGED_DURATION}
        rows.append(_row(request_id, video, rank_index=rank_index, rerank_index=rerank_index,
                         **{f: 1 for f in flags}, **extra))
    if request_id == 1001:
        rows.append(_row(request_id, request_id * 10 + 8))  # no stage flag at all
    return rows


def _table(rows: list[dict[str, int]], flag_type: pa.DataType = pa.int64()) -> pa.Table:
    columns = {c: [r[c] for r in rows] for c in rows[0]}
    return pa.table({c: pa.array(v, flag_type if c in FLAGS else pa.int64()) for c, v in columns.items()})


def sequence(request_id: int) -> np.ndarray:
    """The last 50 effective views before the request, left-padded with zero rows."""
    _, user, _ = REQUESTS[request_id]
    views = [(ts, video, 30_000, 1) for ts, video in pre_window_views()[user]]
    views += [(request_ms(r), r * 10, 20_000, r) for r in sorted(REQUESTS)
              if REQUESTS[r][1] == user and request_ms(r) < request_ms(request_id)]
    views = sorted(views)[-50:]
    seq = np.zeros((50, SEQ_COLUMNS), dtype=np.int64)
    for i, (ts, video, playing, view_request) in enumerate(views, start=50 - len(views)):
        f = video_features(video)
        seq[i] = (video, f["author_id"], f["category_level_two"], f["category_level_one"], f["upload_type"],
                  f["upload_timestamp"], f["duration"], ts, playing, view_request)
    return seq


def write_release(root: Path, *, compact_dates: bool = False, with_video_info: bool = True) -> Path:
    """Write the release under ``root``; day files named 2024-01-13 or, with compact_dates, 20240113."""
    for folder in ("all_stage", "realshow", "seq_effective_50_dict", "others"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index, day in enumerate(DAYS):
        stem = day.replace("-", "") if compact_dates else day
        requests = sorted(r for r, (d, _, _) in REQUESTS.items() if d == index)
        exposures = [row for r in requests for row in exposure_rows(r)]
        all_stage = exposures + [row for r in requests for row in stage_rows(r)]
        feather.write_feather(_table(all_stage, pa.int8()), root / "all_stage" / f"{stem}.feather")
        feather.write_feather(_table(exposures), root / "realshow" / f"{stem}.feather")
        sequences = {r: sequence(r) for r in requests}
        if index == 2:
            sequences[ORPHAN_REQUEST] = sequence(3001)
        with open(root / "seq_effective_50_dict" / f"{stem}.pkl", "wb") as f:
            pickle.dump(sequences, f)
    with open(root / "others" / "id_cnt.pkl", "wb") as f:
        pickle.dump(ID_CNT, f)
    if with_video_info:
        info = [{"video_id": v, **video_features(v), **({"duration": 1} if v == CHANGED_VIDEO else {})}
                for v in (CHANGED_VIDEO, VIDEO_INFO_ONLY)]
        feather.write_feather(pa.table({c: [r[c] for r in info] for c in info[0]}),
                              root / "others" / "realshow_video_info.feather")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "realshow" / "README.txt").write_text("not a day file")
    return root
