import json

import numpy as np
import pyarrow as pa
import pytest
from toy_data import write_toy_dataset

from fedpa.recdata.store import Dataset, DatasetError, DatasetWriter


def test_round_trip_and_user_slices(tmp_path):
    path = write_toy_dataset(tmp_path / "ds", n_users=5, n_days=3)
    ds = Dataset(path)
    assert ds.days == ["2024-01-13", "2024-01-14", "2024-01-15"]
    assert ds.manifest["rows"]["exposures"] == 5 * 3 * 3 * 2
    assert ds.vocab["user_id"] == 5
    rows = ds.user_rows("exposures", 3)
    assert rows.num_rows == 3 * 3 * 2
    assert set(rows.column("user_id").to_pylist()) == {3}
    ts = rows.column("request_timestamp").to_numpy()
    assert np.all(np.diff(ts) >= 0)
    assert ds.user_rows("exposures", 99).num_rows == 0
    # column projection
    assert ds.day("requests", "2024-01-14", ["user_id"]).column_names == ["user_id"]


def test_unknown_day_and_table_are_named(tmp_path):
    ds = Dataset(write_toy_dataset(tmp_path / "ds"))
    with pytest.raises(DatasetError, match="no day '2030-01-01'"):
        ds.day("exposures", "2030-01-01")
    with pytest.raises(DatasetError, match="unknown day table"):
        ds.day("clicks", ds.days[0])
    with pytest.raises(DatasetError, match="no column"):
        ds.day("exposures", ds.days[0], ["nope"])


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="not a fedpa dataset"):
        Dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(DatasetError, match="malformed JSON"):
        Dataset(tmp_path)


def test_truncated_table_is_reported(tmp_path):
    path = write_toy_dataset(tmp_path / "ds")
    f = path / "exposures" / "2024-01-14.arrow"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DatasetError, match="2024-01-14.arrow"):
        Dataset(path).user_rows("exposures", 0)


def test_missing_column_and_bad_dtype_name_the_field(tmp_path):
    with DatasetWriter(tmp_path / "x", source="t") as w:
        with pytest.raises(DatasetError, match="missing column.*province"):
            w.write_users(pa.table({"user_id": [0], "device_id": [0], "age": [0], "gender": [0]}))
        with pytest.raises(DatasetError, match="'age' has type string"):
            w.write_users(pa.table({"user_id": [0], "device_id": [0], "age": ["old"], "gender": [0], "province": [0]}))
        with pytest.raises(DatasetError, match="duplicate"):
            w.write_users(pa.table({"user_id": [0, 0], "device_id": [0, 0], "age": [0, 0], "gender": [0, 0],
                                    "province": [0, 0]}))
        with pytest.raises(DatasetError, match="non-integer"):
            w.write_users(pa.table({"user_id": [0.5], "device_id": [0], "age": [0], "gender": [0], "province": [0]}))
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # temp dir cleaned up


def test_failed_write_keeps_existing_dataset(tmp_path):
    path = write_toy_dataset(tmp_path / "ds", n_users=4)
    before = json.loads((path / "manifest.json").read_text())
    with pytest.raises(RuntimeError):
        with DatasetWriter(path, source="new", overwrite=True) as w:
            w.write_users(pa.table({"user_id": [0], "device_id": [0], "age": [0], "gender": [0], "province": [0]}))
            raise RuntimeError("interrupted")
    assert json.loads((path / "manifest.json").read_text()) == before
    assert Dataset(path).user_rows("exposures", 1).num_rows > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_refuses_to_overwrite_without_flag_or_non_dataset(tmp_path):
    path = write_toy_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="already exists"):
        DatasetWriter(path, source="x")
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="not a fedpa dataset"):
        DatasetWriter(tmp_path / "other", source="x", overwrite=True)


def test_overwrite_replaces_atomically(tmp_path):
    path = write_toy_dataset(tmp_path / "ds", n_users=4)
    write_toy_dataset(path, n_users=7, overwrite=True)
    assert Dataset(path).manifest["rows"]["users"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def _rewrite(path, change):
    """Replace an Arrow file with ``change(table)``, as a hand edit or another tool would."""
    t = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()   # in memory: the file is rewritten
    t = change(t)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)


def _set(col, values):
    return lambda t: t.set_column(t.schema.get_field_index(col), col, pa.array(values, t.schema.field(col).type))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.take(np.arange(t.num_rows)[::-1].copy()), "not sorted by user_id"),
    (lambda t: _set("like", [2] + [0] * (t.num_rows - 1))(t), "label 'like' must be -1"),
    (lambda t: t.set_column(t.schema.get_field_index("like"), "like",
                            pa.array(np.zeros(t.num_rows, np.float32))), "'like' is float, expected int8"),
    (lambda t: _set("video_id", [-1] + t.column("video_id").to_pylist()[1:])(t), "negative id"),
    (lambda t: _set("video_id", [2 ** 40] + t.column("video_id").to_pylist()[1:])(t), "beyond the manifest"),
])
def test_a_day_file_changed_after_writing_is_refused_when_read(tmp_path, change, message):
    path = write_toy_dataset(tmp_path / "ds")
    f = path / "exposures" / "2024-01-14.arrow"
    _rewrite(f, change)
    with pytest.raises(DatasetError, match=message) as e:
        Dataset(path).day("exposures", "2024-01-14")
    assert str(f) in str(e.value)


def test_the_writer_refuses_labels_and_ids_out_of_range(tmp_path):
    path = write_toy_dataset(tmp_path / "ds")
    ex = Dataset(path).day("exposures", "2024-01-14")
    with DatasetWriter(tmp_path / "x", source="t") as w:
        for bad, message in ((_set("like", [5] * ex.num_rows)(ex), "label 'like'"),
                             (_set("user_id", [-3] * ex.num_rows)(ex), "negative id")):
            with pytest.raises(DatasetError, match=message):
                w.write_day("2024-01-01", requests=Dataset(path).day("requests", "2024-01-14"), exposures=bad)
