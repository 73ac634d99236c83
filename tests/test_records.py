"""Named arrays in Flower records: packed into one buffer per dtype, so a message is a handful of objects."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedpa.common.records import LAYOUT, arrays_to_record, record_to_arrays


def test_round_trip_keeps_names_order_dtypes_shapes_and_values():
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(3, 4)).astype(np.float32), "count/global": np.array([7], np.int64),
              "scalar": np.array(2.5), "b": rng.normal(size=5).astype(np.float32),
              "empty": np.zeros((0, 3), np.float32)}
    record = arrays_to_record(arrays)
    # one buffer per dtype plus the table of contents, whatever the number of arrays
    assert sorted(record.keys()) == sorted(["packed:<f4", "packed:<i8", "packed:<f8", LAYOUT])
    back = record_to_arrays(record)
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    back["w"] += 1                                   # a caller may update an array in place without touching others
    np.testing.assert_array_equal(back["b"], arrays["b"])
    assert record_to_arrays(arrays_to_record({})) == {}


def test_a_hundred_tensors_travel_as_three_arrays():
    state = {f"layer{i}.lora_A": np.full((4, 8), i, np.float32) for i in range(100)}
    record = arrays_to_record(state)
    assert len(record) == 2
    assert all(np.array_equal(record_to_arrays(record)[k], v) for k, v in state.items())


def test_records_of_one_array_per_name_still_read():
    record = ArrayRecord(array_dict={"a": Array(np.arange(3, dtype=np.float32))})
    np.testing.assert_array_equal(record_to_arrays(record)["a"], [0, 1, 2])


def test_reserved_names_and_malformed_packing_are_refused():
    with pytest.raises(ValueError, match="reserved"):
        arrays_to_record({"packed:x": np.zeros(2)})
    record = arrays_to_record({"a": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)})
    short = ArrayRecord(array_dict={"packed:<f4": Array(np.zeros(5, np.float32)), LAYOUT: record[LAYOUT]})
    with pytest.raises(ValueError, match="malformed packed array record: b: 2 values"):
        record_to_arrays(short)
    extra = ArrayRecord(array_dict={"packed:<f4": Array(np.zeros(7, np.float32)), LAYOUT: record[LAYOUT]})
    with pytest.raises(ValueError, match="values the table of contents does not name"):
        record_to_arrays(extra)
    toc = np.frombuffer(b'[["a", "<f4", [-1]], ["b", "<f4", [2]]]', np.uint8).copy()
    negative = ArrayRecord(array_dict={"packed:<f4": Array(np.zeros(6, np.float32)), LAYOUT: Array(toc)})
    with pytest.raises(ValueError, match=r"a: shape \[-1\] is not a list of sizes"):
        record_to_arrays(negative)
    garbage = ArrayRecord(array_dict={LAYOUT: Array(np.frombuffer(b"{not json", np.uint8).copy())})
    with pytest.raises(ValueError, match="malformed packed array record"):
        record_to_arrays(garbage)


def test_packed_buffers_are_flowers_own_serialization_and_read_back_writable():
    """The buffers are written as Flower's `Array(ndarray)` writes them (any reader of the record decodes them with
    `Array.numpy()`), and the fast reading path returns the same writable arrays as Flower's."""
    from fedpa.common.records import _vector, _vector_array

    for a in (np.arange(7, dtype=np.float32), np.zeros(0, np.int64), np.frombuffer(b"xyz", np.uint8), np.arange(3.0)):
        mine, flowers = _vector_array(a), Array(a)
        assert (mine.data, mine.dtype, mine.shape, mine.stype) == (flowers.data, flowers.dtype, flowers.shape,
                                                                    flowers.stype)
        back = _vector(flowers)
        np.testing.assert_array_equal(back, a)
        assert back.dtype == a.dtype and back.flags.writeable
    square = Array(np.asfortranarray(np.arange(6.0).reshape(2, 3)))   # not a plain vector: Flower's decoding
    np.testing.assert_array_equal(_vector(square), np.arange(6.0).reshape(2, 3))


def test_a_corrupt_buffer_is_refused_by_name():
    record = arrays_to_record({"a": np.zeros(4, np.float32)})
    good = record["packed:<f4"]
    cut = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-3])
    with pytest.raises(ValueError, match="malformed packed array record"):
        record_to_arrays(ArrayRecord(array_dict={"packed:<f4": cut, LAYOUT: record[LAYOUT]}))
    bad_header = Array(dtype=good.dtype, shape=good.shape, stype=good.stype,
                       data=good.data[:10] + b"{'descr': <f4 garbage" + good.data[31:])
    with pytest.raises(ValueError, match="malformed packed array record"):
        record_to_arrays(ArrayRecord(array_dict={"packed:<f4": bad_header, LAYOUT: record[LAYOUT]}))
    empty = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"")
    with pytest.raises(ValueError, match="malformed packed array record"):
        record_to_arrays(ArrayRecord(array_dict={"packed:<f4": empty, LAYOUT: record[LAYOUT]}))
