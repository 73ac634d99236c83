"""A dataset holding some users' rows and nothing of anyone else: what a device (or an edge node serving a
few users) keeps of the canonical dataset.

The subset is itself a canonical dataset (same schema, same days, the parent's vocabulary), so every reader —
splits, stage negatives, tower inputs — gives a user of the subset exactly what it gives that user in the
parent. Per-user tables (users, requests, exposures, stage_samples, history) keep the chosen users' rows only;
the item catalogue is kept whole: it is what the service shows everyone (not personal), and scoring and
negative sampling need its features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .schema import DAY_TABLES
from .store import Dataset, DatasetError, DatasetWriter


def _rows_of(table: pa.Table, users: np.ndarray) -> pa.Table:
    if not table.num_rows:
        return table
    return table.filter(pa.array(np.isin(table.column("user_id").to_numpy(), users)))


def write_user_subset(ds: Dataset, users, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the rows of ``users`` (user ids) of ``ds`` as a dataset at ``out`` (atomically: built aside and
    renamed into place; an existing dataset there stays as it was if anything fails)."""
    users = np.unique(np.asarray(users, dtype=np.int64))
    if not len(users):
        raise DatasetError("a user subset needs at least one user")
    table = ds.users()
    known = np.isin(users, table.column("user_id").to_numpy())
    if not known.all():
        raise DatasetError(f"{ds.path}: no user {int(users[~known][0])} in its users table")
    with DatasetWriter(out, source=ds.source, overwrite=overwrite) as w:
        w.write_users(_rows_of(table, users))
        w.write_items(ds.items(), domains={code: name for name, code in ds.domains.items()} or None)
        for day in ds.days:
            w.write_day(day, **{name: pa.concat_tables([ds.user_rows(name, int(u), days=[day]) for u in users])
                                for name in DAY_TABLES})
        if ds.manifest.get("has_history"):
            w.write_history(pa.concat_tables([ds.history_rows(int(u)) for u in users]))
        # the parent's vocabulary: embedding sizes and the item id range (negative sampling) stay the same
        return w.commit(vocab=dict(ds.vocab), subset_of={"source": ds.source, "users": users.tolist()})
