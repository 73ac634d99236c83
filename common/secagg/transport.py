"""SecAgg+ protocol messages (plain dicts) in and out of Flower records.

Arrays travel in an ArrayRecord, everything else (ints, floats, bytes, lists of
them) in a ConfigRecord, so the protocol code stays free of Flower.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

FIELDS, ARRAYS = "secagg", "secagg-arrays"
SETUP, KEYS = "secagg-setup", "secagg-keys"
"""Where a train or evaluate request carries the SecAgg+ setup (phase 1) for the vector it leaves on the node, and
where the reply carries the node's answer: one message exchange less per secure sum."""


TRAIN_SLOT, EVAL_SLOT = FIELDS, "secagg-eval"
"""The record names of the two secure sums a node can hold at once: its training update's and its evaluation
sums'. One message can carry a phase of each (the server runs an evaluation's phases beside the next round's)."""
SLOTS = (TRAIN_SLOT, EVAL_SLOT)


def pack(msg: Mapping, into: RecordDict | None = None, slot: str = TRAIN_SLOT) -> RecordDict:
    rd = into if into is not None else RecordDict()
    scalars = {k: (list(v) if isinstance(v, tuple) else v) for k, v in msg.items() if not isinstance(v, np.ndarray)}
    arrays = OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in msg.items() if isinstance(v, np.ndarray))
    rd[slot] = ConfigRecord(scalars)
    if arrays:
        rd[f"{slot}-arrays"] = ArrayRecord(array_dict=arrays)
    return rd


def unpack(rd: RecordDict, slot: str = TRAIN_SLOT) -> dict:
    msg = dict(rd[slot])
    if f"{slot}-arrays" in rd:
        msg.update({k: rd[f"{slot}-arrays"][k].numpy() for k in rd[f"{slot}-arrays"].keys()})
    return msg


def is_secagg(rd: RecordDict) -> bool:
    return any(slot in rd for slot in SLOTS)


def detach(rd: RecordDict, name: str) -> dict | None:
    """The protocol message packed under ``name`` into another message (the setup and its answer; None when
    there is none)."""
    return unpack(rd, name) if name in rd else None
