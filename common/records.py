"""Named numpy arrays in and out of Flower's records, and the size of a message on the wire."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.serde import message_to_proto


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def message_bytes(msg: Message) -> int:
    """Bytes of the serialized message (protobuf), i.e. what travels on the wire."""
    return message_to_proto(msg).ByteSize()
