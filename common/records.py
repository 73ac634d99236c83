"""Named numpy arrays in and out of Flower's records, and the size of a message on the wire."""

from __future__ import annotations

import functools
import io
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
        packed[f"packed:{dt}"] = _vector_array(np.concatenate(flat))
    packed[LAYOUT] = _vector_array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8))
    return ArrayRecord(array_dict=packed)


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named arrays from `arrays_to_record`'s packing (or from a record of one Array per name)."""
    if LAYOUT not in record:
        return {k: record[k].numpy() for k in record.keys()}
    try:
        layout = json.loads(_vector(record[LAYOUT]).tobytes())
        buffers = {k[len("packed:"):]: _vector(record[k]) for k in record.keys() if k != LAYOUT}  # decoded once
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
    except (KeyError, TypeError, ValueError, EOFError) as e:
        raise ValueError(f"malformed packed array record: {e}") from None


# A node keeps each of its users' private state as a packed record, so a round of a few hundred users decodes and
# encodes ~1,000 of these buffers: Flower's `Array` does both through np.save / np.load, whose header parsing
# (`ast.literal_eval`) cost more than the training of a RecFlow-sized user. The buffers are one-dimensional and
# their headers repeat (one per dtype and length), so each distinct header is written or parsed once, by numpy.

@functools.lru_cache(maxsize=1024)
def _npy_header(dtype: str, n: int) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": (n,)})
    return out.getvalue()


def _vector_array(flat: np.ndarray) -> Array:
    """A 1-D array as Flower's `Array` in its .npy serialization (what `Array(ndarray)` makes)."""
    flat = np.ascontiguousarray(flat)
    return Array(dtype=str(flat.dtype), shape=(int(flat.size),), stype="numpy.ndarray",
                 data=_npy_header(np.lib.format.dtype_to_descr(flat.dtype), int(flat.size)) + flat.tobytes())


@functools.lru_cache(maxsize=1024)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def _vector(array: Array) -> np.ndarray:
    """`Array.numpy()` for a plain (not Fortran-ordered, not object) array, with its header parsed once per
    distinct header; anything else, or a header that does not parse, goes to Flower's own decoding."""
    data = array.data
    if array.stype != "numpy.ndarray" or len(data) < 12 or data[:6] != b"\x93NUMPY":
        return array.numpy()
    size_bytes = 2 if data[6] == 1 else 4
    end = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    try:
        shape, fortran, dtype = _parse_npy_header(bytes(data[:end]))
    except ValueError:
        return array.numpy()
    count = int(np.prod(shape, dtype=np.int64))
    if fortran or dtype.hasobject or len(data) - end != count * dtype.itemsize:
        return array.numpy()
    return np.frombuffer(data, dtype, count, offset=end).reshape(shape).copy()


def message_bytes(msg: Message) -> int:
    """Bytes of the serialized message (protobuf), i.e. what travels on the wire."""
    return message_to_proto(msg).ByteSize()


def record_bytes(rd: RecordDict) -> int:
    """Bytes of the serialized records (protobuf): their share of a message that carries others too."""
    return recorddict_to_proto(rd).ByteSize()
