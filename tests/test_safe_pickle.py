"""The restricted unpickler loads RecFlow-shaped pickles and runs nothing else."""

from __future__ import annotations

import os
import pickle
import re
import warnings

import numpy as np
import pytest

from fedpa.foundation.errors import FedpaError
from fedpa.recdata.safe_pickle import UnsafePickleError, load_restricted
from fedpa.recdata.store import DatasetError


def _seq_dict() -> dict:
    """A ``seq_effective_50_dict`` day: {request_id: int64 [50, 10]}, left-padded with zeros."""
    rng = np.random.default_rng(0)
    out = {}
    for request_id in (7, 8, 123456789012):
        seq = np.zeros((50, 10), dtype=np.int64)
        seq[-3:] = rng.integers(1, 1000, size=(3, 10))
        out[request_id] = seq
    return out


def _request_dict() -> dict:
    """A ``request_id_dict`` day: {request_id: {stage_label: int64 [n, 8]}}."""
    return {5: {"realshow": np.arange(16, dtype=np.int64).reshape(2, 8),
                "prerank_neg": np.zeros((0, 8), dtype=np.int64)}}


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _with_numpy_package(data: bytes, package: str) -> bytes:
    """Rewrite the GLOBAL opcodes of a protocol 2/3 pickle to numpy 1.x (``core``) or 2.x
    (``_core``) module paths, as the other numpy major version would have written them."""
    return re.sub(rb"cnumpy\._?core\.", b"cnumpy." + package.encode() + b".", data)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_loads_release_shaped_pickles_at_every_protocol(tmp_path, protocol):
    seq, req = _seq_dict(), _request_dict()
    id_cnt = {"user_id": 42, "video_id": np.int64(9_000_000), "author_id": 7}
    for name, obj in (("seq.pkl", seq), ("req.pkl", req), ("id_cnt.pkl", id_cnt)):
        _write(tmp_path, name, pickle.dumps(obj, protocol=protocol))

    got_seq = load_restricted(tmp_path / "seq.pkl")
    assert got_seq.keys() == seq.keys()
    for k in seq:
        assert got_seq[k].dtype == np.int64 and np.array_equal(got_seq[k], seq[k])
    got_req = load_restricted(tmp_path / "req.pkl")
    assert np.array_equal(got_req[5]["realshow"], req[5]["realshow"])
    assert got_req[5]["prerank_neg"].shape == (0, 8)
    assert load_restricted(tmp_path / "id_cnt.pkl") == {"user_id": 42, "video_id": 9_000_000, "author_id": 7}


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("package", ["core", "_core"])
def test_numpy_1x_and_2x_module_paths_both_load_without_warnings(tmp_path, protocol, package):
    seq = _seq_dict()
    data = _with_numpy_package(pickle.dumps({**seq, "n": np.int32(3)}, protocol=protocol), package)
    assert f"numpy.{package}.multiarray".encode() in data
    path = _write(tmp_path, "seq.pkl", data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2's numpy.core shim warns when imported
        got = load_restricted(path)
    assert got["n"] == 3 and all(np.array_equal(got[k], seq[k]) for k in seq)


class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_refused_global_runs_nothing_and_names_file_and_global(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({1: np.zeros(3, dtype=np.int64), 2: _WritesMarker(marker)})
    path = _write(tmp_path, "evil.pkl", data)
    with pytest.raises(UnsafePickleError) as err:
        load_restricted(path)
    assert not marker.exists()
    assert str(path) in str(err.value) and f"'{os.system.__module__}.system'" in str(err.value)
    assert isinstance(err.value, FedpaError) and isinstance(err.value, DatasetError)


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"),
                                          ("numpy", "load"), ("copyreg", "_reconstructor")])
def test_refuses_globals_outside_the_allow_list(tmp_path, module, name):
    marker = tmp_path / "pwned"
    # GLOBAL, MARK, STRING arg, TUPLE, REDUCE: module.name("touch <marker>")
    data = f"c{module}\n{name}\n(Vtouch {marker}\ntR.".encode()
    with pytest.raises(UnsafePickleError, match=re.escape(f"'{module}.{name}'")):
        load_restricted(_write(tmp_path, "evil.pkl", data))
    assert not marker.exists()


def test_codecs_encode_is_limited_to_latin1(tmp_path):
    data = b"c_codecs\nencode\n(Vabc\nVzlib\ntR."
    with pytest.raises(UnsafePickleError, match="codec 'zlib'"):
        load_restricted(_write(tmp_path, "zlib.pkl", data))


def test_bytes_cannot_be_asked_to_allocate(tmp_path):
    data = b"c__builtin__\nbytes\n(I1000000000000\ntR."  # bytes(10**12)
    with pytest.raises(DatasetError, match="not a readable pickle"):
        load_restricted(_write(tmp_path, "huge.pkl", data))


@pytest.mark.parametrize("value, expected", [
    (np.array([1, "a"], dtype=object), "dtype object"),
    (np.zeros(2, dtype=[("a", "i8")]), "dtype"),
    (np.array(["x"]), "dtype <U1"),
    (b"raw", "is a bytes"),
    ({1, 2}, "is a set"),
])
def test_refuses_non_numeric_content(tmp_path, value, expected):
    path = _write(tmp_path, "odd.pkl", pickle.dumps({3: {"realshow": value}}))
    with pytest.raises(UnsafePickleError, match=re.escape(expected)) as err:
        load_restricted(path)
    assert str(path) in str(err.value) and "[3]['realshow']" in str(err.value)


def test_self_referencing_list_is_walked_once(tmp_path):
    loop: list = [1]
    loop.append(loop)
    got = load_restricted(_write(tmp_path, "loop.pkl", pickle.dumps(loop)))
    assert got[0] == 1 and got[1] is got


@pytest.mark.parametrize("cut", [0, 1, 40, -1])
def test_truncated_or_empty_pickle_names_the_file(tmp_path, cut):
    data = pickle.dumps(_seq_dict(), protocol=4)
    path = _write(tmp_path, "cut.pkl", data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(DatasetError, match="not a readable pickle") as err:
        load_restricted(path)
    assert str(path) in str(err.value) and not isinstance(err.value, UnsafePickleError)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="file is missing"):
        load_restricted(tmp_path / "nope.pkl")
