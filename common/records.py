"""Named numpy arrays in and out of Flower's records, and the size of a message on the wire."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.serde import message_to_proto, recorddict_to_proto

LAYOUT = "packed:layout"
"""A packed record's table of contents: JSON [[name, dtype, shape], ...] as uint8, in packing order."""


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """The arrays packed into one buffer per dtype plus a table of contents. Flower sends every Array of a
    message as its own object (one request each between SuperLink, SuperNode and ClientApp, two at a time): a
    model state of ~100 tensors cost seconds per message on a deployment, the same bytes in three objects do
    not."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if reserved := [k for k in arrays if k.startswith("packed:")]:
        raise ValueError(f"array names starting with 'packed:' are reserved: {reserved}")
    layout = [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]
    packed: OrderedDict[str, Array] = OrderedDict()
    for dt in dict.fromkeys(v.dtype.str for v in arrays.values()):
        flat = [v.ravel() for v in arrays.values() if v.dtype.str == dt]
        packed[f"packed:{dt}"] = Array(np.ascontiguousarray(np.concatenate(flat)))
    packed[LAYOUT] = Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy())
    return ArrayRecord(array_dict=packed)


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named arrays from `arrays_to_record`'s packing (or from a record of one Array per name)."""
    if LAYOUT not in record:
        return {k: record[k].numpy() for k in record.keys()}
    try:
        layout = json.loads(record[LAYOUT].numpy().tobytes())
        buffers = {k[len("packed:"):]: record[k].numpy() for k in record.keys() if k != LAYOUT}  # decoded once
        out, offset = {}, {}
        for name, dt, shape in layout:
            buf = buffers[dt]
            if not isinstance(shape, list) or any(not isinstance(d, int) or d < 0 for d in shape):
                raise ValueError(f"{name}: shape {shape!r} is not a list of sizes")
            n = int(np.prod(shape, dtype=np.int64))
            start = offset.get(dt, 0)
            if buf.dtype.str != dt or start + n > buf.size:
                raise ValueError(f"{name}: {n} values of {dt} past the packed buffer ({buf.size} of {buf.dtype.str})")
            out[name] = buf[start:start + n].reshape(shape)
            offset[dt] = start + n
        if any(buf.size != offset.get(dt, 0) for dt, buf in buffers.items()):
            raise ValueError("the packed buffers hold values the table of contents does not name")
        return out
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed packed array record: {e}") from None


def message_bytes(msg: Message) -> int:
    """Bytes of the serialized message (protobuf), i.e. what travels on the wire."""
    return message_to_proto(msg).ByteSize()


def record_bytes(rd: RecordDict) -> int:
    """Bytes of the serialized records (protobuf): their share of a message that carries others too."""
    return recorddict_to_proto(rd).ByteSize()
