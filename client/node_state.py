"""A node's users' private states within a run, kept in its Flower context: packed, one record per write.

A simulated node serves hundreds of users. Kept as one record per user, encoding and decoding their states was a
fifth of a returning round of 500 RecFlow-sized users (`benchmarks/bench_node_round.py`, 2026-12-06: ≈ 96 µs to
write and 45 µs to read each). Here a train message writes one record for all the users it trained (users whose
states have the same names, dtypes and shapes are stacked; another layout gets a record of its own), under
``private-states/<n>`` with ``n`` counting up; a user's state is its row in the newest record that holds it.

A record whose users have all trained again since is dropped. With a fraction of the users per round, records keep
a few current rows each; once they hold more than twice as many rows as there are users, the current rows are
rewritten as one record, so memory stays within twice the users' states. Nothing is written until the message's
training is done (`flush`): a message that fails leaves the states it started from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
from flwr.app import RecordDict

from fedpa.common.records import arrays_to_record, record_to_arrays
from fedpa.foundation.errors import FedpaError

PREFIX = "private-states/"
USERS = "@users"
"""The name of each record's user ids (a private state's names are a model's parameter names: never '@...')."""


class NodePrivateStates:
    """The private states of the users a node serves, read from and written to its context's ``state``."""

    def __init__(self, state: RecordDict):
        self._state = state
        self._records: dict[int, dict[str, np.ndarray]] = {}
        for key in list(state.keys()):
            if key.startswith(PREFIX):
                self._records[_number(key)] = _checked(key, state[key])
        self._where: dict[int, tuple[int, int]] = {}     # user id -> (record number, row)
        for n in sorted(self._records):
            for row, uid in enumerate(self._records[n][USERS].tolist()):
                self._where[uid] = (n, row)
        self._pending: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._where.keys() | self._pending.keys())

    def get(self, uid: int) -> dict[str, np.ndarray] | None:
        """User ``uid``'s private state (a copy), or None when this node has kept none for it."""
        if uid in self._pending:
            return {k: v.copy() for k, v in self._pending[uid].items()}
        at = self._where.get(uid)
        if at is None:
            return None
        n, row = at
        return {k: v[row].copy() for k, v in self._records[n].items() if k != USERS}

    def put(self, uid: int, private: Mapping[str, np.ndarray]) -> None:
        """Keep ``private`` as user ``uid``'s state; written by `flush`."""
        if any(k.startswith("@") for k in private):
            raise ValueError(f"private state names starting with '@' are reserved: {sorted(private)}")
        self._pending[int(uid)] = {k: np.asarray(v) for k, v in private.items()}

    def flush(self) -> None:
        """Write what `put` kept: one record per layout; then drop or merge the records no longer needed."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._write(pending)
        self._compact()

    def _write(self, states: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        layouts: dict[tuple, list[int]] = {}
        for uid, private in states.items():
            layouts.setdefault(tuple((k, v.dtype.str, v.shape) for k, v in sorted(private.items())), []).append(uid)
        n = max(self._records, default=-1) + 1
        for layout, uids in layouts.items():
            arrays = {USERS: np.asarray(uids, dtype=np.int64),
                      **{k: np.stack([states[u][k] for u in uids]) for k, _, _ in layout}}
            self._state[f"{PREFIX}{n}"] = arrays_to_record(arrays)
            self._records[n] = arrays
            for row, uid in enumerate(uids):
                self._where[uid] = (n, row)
            n += 1

    def _compact(self) -> None:
        live = Counter(n for n, _ in self._where.values())
        for n in [n for n in self._records if not live[n]]:
            self._drop(n)
        rows = sum(len(a[USERS]) for a in self._records.values())
        if len(self._records) > 1 and rows > 2 * len(self._where):
            current = {uid: self.get(uid) for uid in self._where}
            for n in list(self._records):
                self._drop(n)
            self._where.clear()
            self._write(current)

    def _drop(self, n: int) -> None:
        del self._state[f"{PREFIX}{n}"]
        del self._records[n]


def _number(key: str) -> int:
    try:
        return int(key[len(PREFIX):])
    except ValueError:
        raise FedpaError(f"node context: {key!r} is not a private-state record name ({PREFIX}<number>)") from None


def _checked(key: str, record) -> dict[str, np.ndarray]:
    try:
        arrays = record_to_arrays(record)
    except (ValueError, AttributeError, TypeError) as e:
        raise FedpaError(f"node context: {key} is not a packed record of private states: {e}") from None
    users = arrays.get(USERS)
    if users is None or users.ndim != 1 or users.dtype != np.int64:
        raise FedpaError(f"node context: {key} has no one-dimensional int64 '{USERS}' array of user ids")
    if len(np.unique(users)) != len(users):
        raise FedpaError(f"node context: {key} names a user twice")
    if bad := [k for k, v in arrays.items() if v.ndim < 1 or v.shape[0] != len(users)]:
        raise FedpaError(f"node context: {key}: {bad} do not hold one row per user ({len(users)})")
    return arrays
