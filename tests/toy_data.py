"""A small hand-built canonical dataset for tests that need exact, known rows."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from fedpa.recdata.schema import LABELS
from fedpa.recdata.store import DatasetWriter

START = date(2024, 1, 13)
DAY_MS = 86_400_000


def day_start_ms(d: date) -> int:
    return (d - date(1970, 1, 1)).days * DAY_MS


def write_toy_dataset(path: Path, *, n_users: int = 6, n_days: int = 4, requests_per_day: int = 3,
                      exposures_per_request: int = 2, n_items: int = 40, seed: int = 0,
                      with_history: bool = False, overwrite: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    users = pa.table({
        "user_id": np.arange(n_users), "device_id": np.arange(n_users) % 3,
        "age": 1 + np.arange(n_users) % 4, "gender": 1 + np.arange(n_users) % 2,
        "province": 1 + np.arange(n_users) % 5,
    })
    items = pa.table({
        "video_id": np.arange(n_items), "author_id": np.arange(n_items) % 7,
        "category_level_one": 1 + np.arange(n_items) % 3, "category_level_two": 1 + np.arange(n_items) % 6,
        "upload_type": np.ones(n_items, dtype=np.int64),
        "upload_timestamp": np.full(n_items, 1_700_000_000), "duration": 10_000 + 1000 * np.arange(n_items),
    })
    rid = 0
    with DatasetWriter(path, source="toy", overwrite=overwrite) as w:
        w.write_users(users)
        w.write_items(items)
        if with_history:
            t0 = day_start_ms(START) - 3_600_000
            w.write_history(pa.table({
                "user_id": np.repeat(np.arange(n_users), 3),
                "timestamp": np.tile(t0 + np.arange(3) * 1000, n_users),
                "video_id": rng.integers(0, n_items, 3 * n_users),
                "playing_time": np.full(3 * n_users, 5000),
            }))
        for d in range(n_days):
            day = START + timedelta(days=d)
            req, exp = [], []
            for u in range(n_users):
                for r in range(requests_per_day):
                    ts = day_start_ms(day) + 3_600_000 * (1 + r + u % 3)
                    req.append((rid, u, ts))
                    for k in range(exposures_per_request):
                        vid = int(rng.integers(0, n_items))
                        ev = int(rng.random() < 0.5)
                        exp.append((rid, u, ts, vid, k, k, 5000 * (1 + ev), items["duration"][vid].as_py(), ev))
                    rid += 1
            req_t = pa.table({"request_id": [r[0] for r in req], "user_id": [r[1] for r in req],
                              "request_timestamp": [r[2] for r in req]})
            cols = list(zip(*exp))
            exp_t = {"request_id": cols[0], "user_id": cols[1], "request_timestamp": cols[2],
                     "video_id": cols[3], "rank_index": cols[4], "rerank_index": cols[5],
                     "playing_time": cols[6], "duration": cols[7], "effective_view": cols[8]}
            for lab in LABELS[1:]:
                exp_t[lab] = [0] * len(exp)
            w.write_day(day.isoformat(), requests=req_t, exposures=pa.table(exp_t))
        w.commit()
    return path


def assert_sequences_precede_requests(ex) -> None:
    """Every view in a row's behaviour sequence is the same user's and strictly older than the row's
    request (no look-ahead), and the batch has the contract's sequence shape."""
    import numpy as np

    from fedpa.foundation.batch import ITEM_FIELDS
    from fedpa.recdata.schema import SEQ_LEN

    b = ex.batch()
    assert b["hist_items"].shape == (len(ex), SEQ_LEN, len(ITEM_FIELDS))
    pos = np.clip(ex.view_hi[:, None] - SEQ_LEN + np.arange(SEQ_LEN)[None, :], 0, None)
    real = b["hist_mask"].numpy()
    ts, users = ex.views.timestamp[pos], ex.views.user_id[pos]
    assert np.all(ts[real] < np.repeat(ex.request_timestamp, SEQ_LEN).reshape(-1, SEQ_LEN)[real])
    assert np.all(users[real] == np.repeat(ex.user_id, SEQ_LEN).reshape(-1, SEQ_LEN)[real])
