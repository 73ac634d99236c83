"""Statistics of a canonical dataset, computed by streaming its day tables."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from .schema import LABELS, STAGES
from .store import Dataset


def dataset_stats(ds: Dataset) -> dict:
    m = ds.manifest
    rows = m.get("rows", {})
    n_requests = int(rows.get("requests", 0))
    label_pos = dict.fromkeys(LABELS, 0)
    label_seen = dict.fromkeys(LABELS, 0)
    per_user = np.zeros(int(ds.vocab.get("user_id", 0)), dtype=np.int64)
    per_day = {}
    per_domain: dict[int, list[int]] = {}   # code -> [exposures, effective views, users]
    users_of: dict[int, set] = {}
    for day, t in ds.iter_days("exposures", ["user_id", "video_id", *LABELS]):
        per_day[day] = t.num_rows
        if ds.domains:
            code = ds.domain_of(t.column("video_id").to_numpy())
            ev = t.column("effective_view").to_numpy() == 1
            uid = t.column("user_id").to_numpy()
            for c in np.unique(code):
                row = per_domain.setdefault(int(c), [0, 0])
                row[0] += int((code == c).sum())
                row[1] += int((ev & (code == c)).sum())
                users_of.setdefault(int(c), set()).update(np.unique(uid[code == c]).tolist())
        per_user += np.bincount(t.column("user_id").to_numpy(), minlength=len(per_user))[: len(per_user)]
        for lab in LABELS:
            col = t.column(lab)
            seen = pc.sum(pc.greater_equal(col, 0)).as_py() or 0
            label_seen[lab] += seen
            label_pos[lab] += pc.sum(pc.equal(col, 1)).as_py() or 0
    stage_counts = {s: int(m.get("stage_samples_per_stage", {}).get(s, 0)) for s in STAGES}
    active = per_user[per_user > 0]
    qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    return {
        "path": str(ds.path),
        "source": ds.source,
        "days": len(ds.days),
        "first_day": ds.days[0],
        "last_day": ds.days[-1],
        "users": int(rows.get("users", 0)),
        "users_with_exposures": int(len(active)),
        "items": int(rows.get("items", 0)),
        "requests": n_requests,
        "exposures": int(rows.get("exposures", 0)),
        "exposures_per_request": rows.get("exposures", 0) / n_requests if n_requests else 0.0,
        "stage_samples": int(rows.get("stage_samples", 0)),
        "stage_samples_per_stage": stage_counts,
        "stage_samples_per_request": {s: (c / n_requests if n_requests else 0.0) for s, c in stage_counts.items()},
        "label_rates": {lab: (label_pos[lab] / label_seen[lab] if label_seen[lab] else None) for lab in LABELS},
        "exposures_per_user_quantiles": {f"p{int(q * 100)}": float(np.quantile(active, q)) if len(active) else 0.0
                                         for q in qs},
        "exposures_per_day": per_day,
        "history_views": int(rows.get("history", 0)),
        "vocab": ds.vocab,
        "user_features": ds.user_features,
        "domains": {name: {"exposures": per_domain.get(code, [0, 0])[0],
                           "effective_view_rate": (per_domain[code][1] / per_domain[code][0]
                                                   if per_domain.get(code, [0])[0] else None),
                           "users": len(users_of.get(code, ()))}
                    for name, code in ds.domains.items()},
    }
