import base64
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedpa.client.personal_store import (
    HEADER_BYTES,
    MAGIC,
    PersonalStore,
    StoreCorruptError,
    StoreKeyError,
    StoreWrongKeyError,
    generate_key_file,
)
from fedpa.foundation.errors import FedpaError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
REPO = Path(__file__).resolve().parents[1]


def state(v: int):
    return ({"lora.A": np.full((4, 3), v, np.float32), "lora.B": np.full(5, v, np.float64)},
            {"round": v, "algorithm": "fedpa"})


def assert_same(arrays, expected):
    assert arrays.keys() == expected.keys()
    for k, a in expected.items():
        b = arrays[k]
        assert (b.dtype, b.shape) == (a.dtype, a.shape), k
        assert b.tobytes() == np.ascontiguousarray(a).tobytes(), k


def flip_byte(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(tmp_path):
    store = PersonalStore(tmp_path / "s", KEY)
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((7, 5)).astype(np.float32),
        "f64": np.array([np.nan, -0.0, np.inf, 1e-310]),
        "f16": rng.standard_normal(9).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "strided": rng.standard_normal((6, 6))[::2, ::3],  # not contiguous
    }
    meta = {"round": 12, "algorithm": "fedpa", "foundation": "sha256:ab12", "lr": 0.01,
            "nested": {"a": [1, 2.5, None, "x"]}, "unicode": "héllo"}
    store.save("alice", arrays, meta)
    got_arrays, got_meta = PersonalStore(tmp_path / "s", KEY).load("alice")
    assert_same(got_arrays, arrays)
    assert got_meta == meta
    assert store.last_recovery is None


def test_unknown_user_is_none_and_users_lists_them(tmp_path):
    store = PersonalStore(tmp_path / "s", KEY)
    assert store.load("nobody") is None and store.users() == []
    for uid in ("alice", 7, "Bob", "../x", "a/b", "ü ser", ".."):
        store.save(uid, *state(1))
    assert store.users() == sorted(["alice", "7", "Bob", "../x", "a/b", "ü ser", ".."])
    assert store.load("7") is not None  # int and str ids are the same user
    assert store.load("bob") is None    # ids are case-sensitive, even on case-insensitive file systems


def test_user_ids_cannot_escape_the_directory(tmp_path):
    d = tmp_path / "s"
    store = PersonalStore(d, KEY)
    for uid in ("../x", "../../etc/passwd", "a/b", "/abs", "..", ".", "x\x00y", "C:\\x"):
        store.save(uid, *state(2))
        arrays, meta = store.load(uid)
        assert meta["round"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    for p in d.iterdir():
        assert p.parent == d and p.is_file()
        assert p.name == ".lock" or p.name.startswith(("u_", "x_")), p.name
    with pytest.raises(FedpaError, match="empty"):
        store.save("", *state(1))
    with pytest.raises(FedpaError, match="at most"):
        store.save("x" * 101, *state(1))
    with pytest.raises(TypeError):
        store.save(True, *state(1))


def test_file_format_header_and_nothing_in_clear(tmp_path):
    store = PersonalStore(tmp_path, KEY)
    arrays, meta = state(3)
    meta["marker"] = "very-private-marker"
    store.save("alice", arrays, meta)
    current, prev = store.paths("alice")
    blob1 = current.read_bytes()
    assert blob1[:8] == MAGIC and int.from_bytes(blob1[8:10], "big") == 1 and blob1[10] == 1
    assert blob1[12:20].hex() == store.key_id
    assert int.from_bytes(blob1[32:40], "big") == len(blob1) - HEADER_BYTES
    assert b"very-private-marker" not in blob1 and b"lora.A" not in blob1
    store.save("alice", arrays, meta)
    blob2 = current.read_bytes()
    assert blob1[20:32] != blob2[20:32]  # fresh nonce per write
    assert prev.read_bytes() == blob1    # previous version kept
    assert stat.S_IMODE(current.stat().st_mode) & 0o077 == 0


# ----------------------------------------------------------------------------- damage and recovery


@pytest.mark.parametrize("offset", [HEADER_BYTES + 100, -1, 25, 34],
                         ids=["ciphertext", "tag", "nonce", "length"])
def test_tampered_current_falls_back_to_previous(tmp_path, caplog, offset):
    store = PersonalStore(tmp_path, KEY)
    store.save("alice", *state(1))
    store.save("alice", *state(2))
    current, prev = store.paths("alice")
    flip_byte(current, offset if offset >= 0 else current.stat().st_size + offset)
    with caplog.at_level(logging.WARNING, logger="fedpa.client"):
        arrays, meta = store.load("alice")
    assert meta["round"] == 1
    assert_same(arrays, state(1)[0])
    rec = store.last_recovery
    assert rec is not None and rec.used == prev and rec.bad[0][0] == current
    assert current.name in caplog.text and prev.name in caplog.text
    # a clean load resets it
    store.load("nobody")
    assert store.last_recovery is None


def test_truncated_current_is_a_framing_error(tmp_path):
    store = PersonalStore(tmp_path, KEY)
    store.save("alice", *state(1))
    store.save("alice", *state(2))
    current, _ = store.paths("alice")
    current.write_bytes(current.read_bytes()[:-10])
    assert store.load("alice")[1]["round"] == 1
    assert "framing" in store.last_recovery.bad[0][1]


def test_both_tampered_is_store_corrupt_naming_the_files(tmp_path):
    store = PersonalStore(tmp_path, KEY)
    store.save("alice", *state(1))
    store.save("alice", *state(2))
    current, prev = store.paths("alice")
    flip_byte(current, HEADER_BYTES + 3)
    flip_byte(prev, HEADER_BYTES + 3)
    with pytest.raises(StoreCorruptError, match="wrong key or corrupted store") as e:
        store.load("alice")
    assert str(current) in str(e.value) and str(prev) in str(e.value)
    assert not isinstance(e.value, StoreWrongKeyError)
    assert isinstance(e.value, FedpaError)


def test_damaged_current_never_evicts_a_good_previous(tmp_path):
    store = PersonalStore(tmp_path, KEY)
    store.save("alice", *state(1))
    store.save("alice", *state(2))
    current, prev = store.paths("alice")
    flip_byte(current, HEADER_BYTES + 3)
    store.save("alice", *state(3))  # current (damaged) is overwritten, prev (v1) kept
    assert store.load("alice")[1]["round"] == 3
    current.unlink()
    assert store.load("alice")[1]["round"] == 1


def test_a_redone_round_never_rotates_out_the_version_it_started_from(tmp_path):
    """Round 2 crashes after the save and before its checkpoint, twice: the version from round 1 survives."""
    store = PersonalStore(tmp_path, KEY)
    store.save("alice", *state(1))
    store.save("alice", *state(2))                               # attempt 1 of round 2; prev = round 1

    def redoes_2(meta):
        return meta["round"] >= 2

    for _ in range(2):                                           # attempts 2 and 3 of round 2
        assert store.load("alice", skip=redoes_2)[1]["round"] == 1
        store.save("alice", *state(2), supersedes=redoes_2)
    assert store.load("alice", skip=redoes_2)[1]["round"] == 1
    store.save("alice", *state(3), supersedes=lambda m: m["round"] >= 3)   # round 2 committed: rotates
    assert store.load("alice", skip=lambda m: m["round"] >= 3)[1]["round"] == 2


def test_wrong_key_is_a_clear_error_and_save_refuses(tmp_path):
    PersonalStore(tmp_path, KEY).save("alice", *state(1))
    PersonalStore(tmp_path, KEY).save("alice", *state(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    wrong = PersonalStore(tmp_path, OTHER_KEY)
    with pytest.raises(StoreWrongKeyError, match="wrong key") as e:
        wrong.load("alice")
    assert isinstance(e.value, StoreCorruptError) and isinstance(e.value, StoreKeyError)
    with pytest.raises(StoreWrongKeyError, match="refusing to overwrite"):
        wrong.save("alice", *state(9))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert PersonalStore(tmp_path, KEY).load("alice")[1]["round"] == 2


def test_file_renamed_to_another_user_fails_to_authenticate(tmp_path):
    store = PersonalStore(tmp_path, KEY)
    store.save("alice", *state(1))
    alice, _ = store.paths("alice")
    bob, bob_prev = store.paths("bob")
    os.replace(alice, bob)
    with pytest.raises(StoreCorruptError, match="authentication failed"):
        store.load("bob")
    # with a previous version of his own, bob gets that instead
    store.save("carol", *state(5))
    store.save("carol", *state(6))
    carol, _ = store.paths("carol")
    store.paths("bob")[0].unlink()
    store.save("bob", *state(4))
    store.save("bob", *state(5))
    os.replace(carol, bob)
    assert store.load("bob")[1]["round"] == 4 and store.last_recovery.used == bob_prev


def test_delete(tmp_path):
    store = PersonalStore(tmp_path, KEY)
    store.save("alice", *state(1))
    store.save("alice", *state(2))
    assert store.delete("alice") is True
    assert store.load("alice") is None and store.users() == []
    assert store.delete("alice") is False


# ----------------------------------------------------------------------------- keys


def test_env_key_missing_malformed_and_valid(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDPA_STORE_KEY", raising=False)
    with pytest.raises(StoreKeyError, match="FEDPA_STORE_KEY is not set"):
        PersonalStore.from_env(tmp_path)
    monkeypatch.setenv("FEDPA_STORE_KEY", "  ")
    with pytest.raises(StoreKeyError, match="empty"):
        PersonalStore.from_env(tmp_path)
    secret_like = "zz" + KEY.hex()[2:]
    for bad in (secret_like, KEY.hex()[:-2], base64.urlsafe_b64encode(KEY[:16]).decode(), "not a key"):
        monkeypatch.setenv("FEDPA_STORE_KEY", bad)
        with pytest.raises(StoreKeyError, match="not a 32-byte key") as e:
            PersonalStore.from_env(tmp_path)
        assert bad not in str(e.value)  # never echo a secret
    ref = PersonalStore(tmp_path, KEY).key_id
    b64 = base64.urlsafe_b64encode(KEY).decode()
    for good in (KEY.hex(), KEY.hex().upper(), b64, b64.rstrip("=")):
        monkeypatch.setenv("MY_KEY", good)
        assert PersonalStore.from_env(tmp_path, var="MY_KEY").key_id == ref
    with pytest.raises(StoreKeyError, match="32 bytes"):
        PersonalStore(tmp_path, KEY[:16])


def test_generate_key_file_mode_0600_and_no_overwrite(tmp_path):
    path = generate_key_file(tmp_path / "keys" / "store.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert len(raw) == 32
    with pytest.raises(StoreKeyError, match="refusing to overwrite"):
        generate_key_file(path)
    assert path.read_bytes() == raw
    store = PersonalStore.from_key_file(tmp_path / "s", path)
    assert store.key_id == PersonalStore(tmp_path / "t", raw).key_id


def test_key_file_inside_store_dir_is_refused(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    for inside in (d / "store.key", d / "sub" / "k", d / ".." / "s" / "k"):
        inside.parent.mkdir(parents=True, exist_ok=True)
        inside.write_bytes(KEY)
        with pytest.raises(StoreKeyError, match="inside the store directory"):
            PersonalStore.from_key_file(d, inside)
    # a link from inside the store to a key elsewhere is refused too
    outside = tmp_path / "k"
    outside.write_bytes(KEY)
    (d / "link").symlink_to(outside)
    with pytest.raises(StoreKeyError, match="inside the store directory"):
        PersonalStore.from_key_file(d, d / "link")
    # and a store directory reached through a link
    (tmp_path / "alias").symlink_to(d)
    with pytest.raises(StoreKeyError, match="inside the store directory"):
        PersonalStore.from_key_file(tmp_path / "alias", d / "store.key")
    with pytest.raises(StoreKeyError, match="not found"):
        PersonalStore.from_key_file(d, tmp_path / "missing.key")
    assert PersonalStore.from_key_file(d, outside).key_id == PersonalStore(d, KEY).key_id


# ----------------------------------------------------------------------------- crash safety

# Runs in its own interpreter: forks a writer that saves versions 1, 2, 3, ...
# (arrays filled with the version number, 1-4 MB), SIGKILLs it 0-50 ms after it
# starts writing, then opens the store with a fresh instance and reports what
# it found, one JSON line per kill.
CRASH_HELPER = textwrap.dedent(r"""
    import json, os, random, signal, sys, time
    import numpy as np
    from fedpa.client.personal_store import PersonalStore

    directory, seed, kills = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    key = bytes(range(32))

    def version(v):
        n = (1 + v % 4) * 2 ** 18            # 1-4 MB of float32
        return ({"big": np.full(n, v, np.float32), "small": np.full((3, 5), v, np.float64)},
                {"version": v, "round": v, "algorithm": "fedpa", "n": n})

    def writer(fd, v):
        store = PersonalStore(directory, key)
        while True:
            os.write(fd, b"S%d\n" % v)
            store.save("alice", *version(v))
            os.write(fd, b"D%d\n" % v)
            v += 1

    rng = random.Random(seed)
    started, last_done, next_v = set(), 0, 1
    for i in range(kills):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                writer(w, next_v)
            finally:
                os._exit(3)
        os.close(w)
        buf = os.read(r, 64)                 # the writer has started its first save
        delay = rng.uniform(0, 0.05)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(r, 65536):
            buf += chunk
        os.close(r)
        for line in buf.decode().split():
            (started.add if line[0] == "S" else lambda v: None)(int(line[1:]))
            if line[0] == "D":
                last_done = max(last_done, int(line[1:]))
        next_v = max(started) + 1
        store = PersonalStore(directory, key)
        cur, prev = store.paths("alice")
        rec = {"i": i, "delay_ms": round(delay * 1000, 1), "last_done": last_done,
               "max_started": max(started), "current_present": cur.exists(), "error": None}
        try:
            got = store.load("alice")
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        else:
            rec["recovery"] = None if store.last_recovery is None else str(store.last_recovery)
            if got is None:
                rec["loaded"] = None
            else:
                arrays, meta = got
                v = meta["version"]
                want_arrays, want_meta = version(v)
                rec["loaded"] = v
                rec["in_started"] = v in started
                rec["meta_ok"] = meta == want_meta
                rec["arrays_ok"] = all(
                    arrays[k].dtype == a.dtype and arrays[k].shape == a.shape and bool(np.all(arrays[k] == v))
                    for k, a in want_arrays.items()) and arrays.keys() == want_arrays.keys()
        print(json.dumps(rec), flush=True)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_sigkill_during_saves_always_leaves_a_complete_version(tmp_path):
    d = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CRASH_HELPER, str(d), "1234", "40"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 40
    prev_loaded = 0
    for rec in records:
        assert rec["error"] is None, rec
        assert rec["recovery"] is None, rec          # a crash never leaves a file that fails to authenticate
        if rec["loaded"] is None:                    # only before the first save ever returned
            assert rec["last_done"] == 0, rec
            continue
        assert rec["in_started"] and rec["arrays_ok"] and rec["meta_ok"], rec
        assert rec["loaded"] >= rec["last_done"], rec  # a committed save is never lost
        assert rec["loaded"] >= prev_loaded, rec
        prev_loaded = rec["loaded"]
    assert records[-1]["max_started"] > 40  # the writer did get through many saves
    # the next save cleans up what killed writers left behind
    store = PersonalStore(d, KEY)
    arrays, meta = state(10**6)
    store.save("alice", arrays, meta)
    assert sorted(p.name for p in d.iterdir()) == [".lock", "u_alice.prev", "u_alice.state"]
    assert store.load("alice")[1] == meta
