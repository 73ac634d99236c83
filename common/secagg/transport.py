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


def pack(msg: Mapping, into: RecordDict | None = None) -> RecordDict:
    rd = into if into is not None else RecordDict()
    scalars = {k: (list(v) if isinstance(v, tuple) else v) for k, v in msg.items() if not isinstance(v, np.ndarray)}
    arrays = OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in msg.items() if isinstance(v, np.ndarray))
    rd[FIELDS] = ConfigRecord(scalars)
    if arrays:
        rd[ARRAYS] = ArrayRecord(array_dict=arrays)
    return rd


def unpack(rd: RecordDict) -> dict:
    msg = dict(rd[FIELDS])
    if ARRAYS in rd:
        msg.update({k: rd[ARRAYS][k].numpy() for k in rd[ARRAYS].keys()})
    return msg


def is_secagg(rd: RecordDict) -> bool:
    return FIELDS in rd
