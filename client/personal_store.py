"""The on-device personal store: one user's private state (adapters and metadata), encrypted at rest with
AES-256-GCM, written atomically, keeping the previous version.

Design notes: docs/design/personal-store.md
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedpa.common.files import jsonable
from fedpa.foundation.errors import FedpaError

try:  # POSIX only; without it writers are not serialised (single writer assumed)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("fedpa.client")

MAGIC = b"FEDPAPS\x00"
FORMAT_VERSION = 1
CIPHER_AES256GCM = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = struct.Struct(">8sHBB8s12sQ")  # magic, version, cipher, reserved, key id, nonce, N
HEADER_BYTES = _HEADER.size  # 40
MAX_USER_ID_BYTES = 100
CURRENT_SUFFIX = ".state"
PREV_SUFFIX = ".prev"
ENV_VAR = "FEDPA_STORE_KEY"

_SAFE_ID = re.compile(r"[a-z0-9_-]+")
_FILE_NAME = re.compile(r"(u_[a-z0-9_-]+|x_(?:[0-9a-f]{2})+)(\.state|\.prev)")


class PersonalStoreError(FedpaError):
    """A problem with the personal store (bad user id, unreadable directory, ...)."""


class StoreKeyError(PersonalStoreError):
    """The store key is missing, malformed, or misplaced."""


class StoreCorruptError(PersonalStoreError):
    """No version of a user's state could be read; the message names the files."""


class StoreWrongKeyError(StoreKeyError, StoreCorruptError):
    """Every file of a user was encrypted with another key.

    It is both a key error and, from ``load``'s point of view, a store that
    cannot be read, so ``except StoreCorruptError`` also catches it.
    """


@dataclass
class Recovery:
    """What ``load`` had to skip to find a valid version."""

    user_id: str
    used: Path | None  # the file that was loaded (None: none was valid)
    bad: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)

    def __str__(self) -> str:
        skipped = "; ".join(f"{p.name}: {why}" for p, why in self.bad)
        return f"user {self.user_id!r}: skipped {skipped}; loaded {self.used.name if self.used else 'nothing'}"


class _BadFile(Exception):
    def __init__(self, why: str, foreign_key: bool = False):
        super().__init__(why)
        self.why = why
        self.foreign_key = foreign_key


# ----------------------------------------------------------------------------- keys


def _hkdf(key: bytes, info: bytes, n: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(key)


def parse_key_text(text: str, source: str) -> bytes:
    """32 bytes from 64 hex characters or urlsafe base64 (padded or not). ``source`` names where it came from."""
    s = text.strip()
    if not s:
        raise StoreKeyError(f"{source} is empty; expected a 32-byte key as 64 hex characters or urlsafe base64")
    key = None
    if len(s) == 2 * KEY_BYTES:
        with contextlib.suppress(ValueError):
            key = bytes.fromhex(s)
    if key is None and len(s) in (43, 44):
        with contextlib.suppress(binascii.Error, ValueError):
            key = base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_", validate=True)
    if key is None or len(key) != KEY_BYTES:
        # never echo the value: it is (meant to be) a secret
        raise StoreKeyError(f"{source} is not a 32-byte key: expected 64 hex characters or the urlsafe "
                            f"base64 of 32 bytes (got {len(s)} characters)")
    return key


def generate_key_file(path: str | Path) -> Path:
    """Write 32 random bytes to ``path`` with mode 0600; refuse to overwrite an existing file."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise StoreKeyError(f"{path}: already exists; refusing to overwrite a key "
                            "(state encrypted with it would become unreadable)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # in case the umask is unusual
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _inside(path: str, directory: Path) -> bool:
    return Path(path) == directory or Path(path).is_relative_to(directory)


# ----------------------------------------------------------------------------- user ids


def _canonical_id(user_id: str | int) -> str:
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int, np.integer)):
        raise TypeError(f"user id must be str or int, not {type(user_id).__name__}")
    s = str(int(user_id)) if not isinstance(user_id, str) else user_id
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError:
        raise PersonalStoreError(f"user id {s!r} is not valid Unicode text") from None
    if not b:
        raise PersonalStoreError("user id is empty")
    if len(b) > MAX_USER_ID_BYTES:
        raise PersonalStoreError(f"user id {s[:20]!r}... is {len(b)} bytes long; at most {MAX_USER_ID_BYTES}")
    return s


def _stem(uid: str) -> str:
    return f"u_{uid}" if _SAFE_ID.fullmatch(uid) else "x_" + uid.encode("utf-8").hex()


def _uid_of_stem(stem: str) -> str | None:
    if stem.startswith("u_"):
        return stem[2:]
    try:
        return bytes.fromhex(stem[2:]).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be fsynced there
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PersonalStore:
    """One directory of per-user encrypted state; see the module docstring."""

    def __init__(self, directory: str | Path, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise StoreKeyError(f"the store key must be {KEY_BYTES} bytes"
                                + (f", got {len(key)}" if isinstance(key, (bytes, bytearray)) else
                                   f", got {type(key).__name__}"))
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise PersonalStoreError(f"{self.directory}: cannot create the store directory ({e})") from None
        if not self.directory.is_dir():
            raise PersonalStoreError(f"{self.directory}: not a directory")
        key = bytes(key)
        self._aead = AESGCM(_hkdf(key, b"fedpa personal-store v1 aes-256-gcm", KEY_BYTES))
        self._key_id = _hkdf(key, b"fedpa personal-store v1 key id", 8)
        self.last_recovery: Recovery | None = None

    # -- constructors
    @classmethod
    def from_key_file(cls, directory: str | Path, key_file: str | Path) -> PersonalStore:
        """Read the key from ``key_file`` (32 raw bytes, or 64 hex / base64 text); it must live outside
        ``directory``."""
        directory = Path(directory).expanduser()
        key_file = Path(key_file).expanduser()
        store_dir = directory.resolve()
        for candidate in (os.path.abspath(key_file), str(key_file.resolve())):
            if _inside(candidate, store_dir) or _inside(candidate, Path(os.path.abspath(directory))):
                raise StoreKeyError(f"{key_file}: the key file is inside the store directory {directory}; keep "
                                    "the key elsewhere (whoever copies the store must not get the key with it)")
        try:
            raw = key_file.read_bytes()
            mode = key_file.stat().st_mode
        except FileNotFoundError:
            raise StoreKeyError(f"{key_file}: key file not found (create one with generate_key_file)") from None
        except OSError as e:
            raise StoreKeyError(f"{key_file}: cannot read the key file ({e.strerror})") from None
        if os.name == "posix" and mode & 0o077:
            log.warning("%s: key file is readable by other users (mode %o); chmod 600 it", key_file, mode & 0o777)
        if len(raw) == KEY_BYTES:
            key = raw
        else:
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                raise StoreKeyError(f"{key_file}: not a key file: expected {KEY_BYTES} raw bytes, "
                                    f"got {len(raw)}") from None
            key = parse_key_text(text, f"key file {key_file}")
        return cls(directory, key)

    @classmethod
    def from_env(cls, directory: str | Path, var: str = ENV_VAR) -> PersonalStore:
        """Read the key from environment variable ``var`` (64 hex characters or urlsafe base64 of 32 bytes)."""
        text = os.environ.get(var)
        if text is None or not text.strip():
            raise StoreKeyError(f"environment variable {var} is {'empty' if text is not None else 'not set'}; set "
                                "it to a 32-byte key as 64 hex characters (e.g. python -c \"import secrets; "
                                "print(secrets.token_hex(32))\")")
        return cls(directory, parse_key_text(text, f"environment variable {var}"))

    # -- paths
    @property
    def key_id(self) -> str:
        """A fingerprint of the key (hex), the one written in every file header."""
        return self._key_id.hex()

    def paths(self, user_id: str | int) -> tuple[Path, Path]:
        """(current, previous) file of a user."""
        stem = _stem(_canonical_id(user_id))
        return self.directory / (stem + CURRENT_SUFFIX), self.directory / (stem + PREV_SUFFIX)

    def users(self) -> list[str]:
        """User ids (as str) that have a current or previous file, sorted."""
        out = set()
        for entry in os.scandir(self.directory):
            m = _FILE_NAME.fullmatch(entry.name)
            if m and (uid := _uid_of_stem(m.group(1))) is not None:
                out.add(uid)
        return sorted(out)

    # -- encryption
    def _seal(self, uid: str, arrays: dict[str, np.ndarray], meta: dict) -> bytes:
        if not isinstance(arrays, dict):
            raise TypeError(f"arrays must be a dict of name -> numpy array, not {type(arrays).__name__}")
        tensors = {}
        for name, a in arrays.items():
            if not isinstance(name, str) or not isinstance(a, np.ndarray):
                raise TypeError(f"arrays[{name!r}]: expected a str name and a numpy array, got {type(a).__name__}")
            tensors[name] = a if a.flags.c_contiguous else a.copy(order="C")
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, not {type(meta).__name__}")
        try:
            meta_bytes = json.dumps(meta, sort_keys=True, default=jsonable).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta is not JSON-serializable: {e}") from None
        try:
            body = st_save(tensors)
        except Exception as e:  # safetensors rejects object/complex dtypes with several types
            raise TypeError(f"arrays cannot be serialized with safetensors: {e}") from None
        plaintext = struct.pack(">Q", len(meta_bytes)) + meta_bytes + body
        nonce = secrets.token_bytes(NONCE_BYTES)
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, CIPHER_AES256GCM, 0, self._key_id, nonce,
                              len(plaintext) + TAG_BYTES)
        return header + self._aead.encrypt(nonce, plaintext, header + uid.encode("utf-8"))

    def _open(self, uid: str, blob: bytes) -> tuple[dict[str, np.ndarray], dict]:
        """Decrypt and parse one file's bytes, or raise _BadFile saying why."""
        if len(blob) < HEADER_BYTES:
            raise _BadFile(f"truncated ({len(blob)} bytes, shorter than the {HEADER_BYTES}-byte header)")
        magic, version, cipher, _reserved, key_id, nonce, n = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise _BadFile("not a fedpa personal-store file (bad magic bytes)")
        if version != FORMAT_VERSION:
            raise _BadFile(f"format version {version}, this fedpa reads version {FORMAT_VERSION}")
        if cipher != CIPHER_AES256GCM:
            raise _BadFile(f"unknown cipher id {cipher}")
        if len(blob) != HEADER_BYTES + n:
            raise _BadFile(f"framing: header announces {n} bytes of ciphertext, file holds {len(blob) - HEADER_BYTES}"
                           " (truncated or extended)")
        if key_id != self._key_id:
            raise _BadFile(f"encrypted with a different key (key id {key_id.hex()}, this key is {self.key_id})",
                           foreign_key=True)
        try:
            plaintext = self._aead.decrypt(nonce, blob[HEADER_BYTES:], blob[:HEADER_BYTES] + uid.encode("utf-8"))
        except InvalidTag:
            raise _BadFile("authentication failed (tampered, corrupted, or another user's file)") from None
        # authenticated: what follows was written by save(); failures here mean a bug, reported all the same
        try:
            (m,) = struct.unpack_from(">Q", plaintext)
            meta = json.loads(plaintext[8:8 + m].decode("utf-8"))
            arrays = st_load(plaintext[8 + m:])
        except Exception as e:
            raise _BadFile(f"authenticated but unparsable payload ({type(e).__name__}: {e})") from None
        return arrays, meta

    def _read(self, uid: str, path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
        """None when the file does not exist; _BadFile when it is not valid."""
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _BadFile(f"unreadable ({e.strerror})") from None
        return self._open(uid, blob)

    # -- API
    def load(self, user_id: str | int, skip=None) -> tuple[dict[str, np.ndarray], dict] | None:
        """The user's latest valid (arrays, meta), or None when the user has no state yet.

        Falls back to the previous version when the current one is damaged
        (warning logged, ``self.last_recovery`` set; it is None after a clean
        load). Raises StoreWrongKeyError when every file was encrypted with
        another key, StoreCorruptError when no file is valid. ``skip(meta)``
        True passes over a valid version (a resumed run redoing a round wants
        the state from before it).
        """
        uid = _canonical_id(user_id)
        self.last_recovery = None
        bad: list[tuple[Path, _BadFile]] = []
        for path in self.paths(uid):
            try:
                state = self._read(uid, path)
            except _BadFile as e:
                bad.append((path, e))
                continue
            if state is None:  # absent: no state yet, or a save interrupted between its two renames
                if path.name.endswith(CURRENT_SUFFIX) and path.with_suffix(PREV_SUFFIX).exists():
                    log.info("%s: absent (interrupted save?); using the previous version", path)
                continue
            if skip is not None and skip(state[1]):
                continue
            if bad:
                self.last_recovery = Recovery(uid, path, [(p, e.why) for p, e in bad])
                log.warning("personal store %s: %s is unusable (%s); loaded the previous version %s",
                            self.directory, bad[0][0].name, bad[0][1].why, path.name)
            return state
        if not bad:
            return None
        self.last_recovery = Recovery(uid, None, [(p, e.why) for p, e in bad])
        detail = "; ".join(f"{p}: {e.why}" for p, e in bad)
        if all(e.foreign_key for _, e in bad):
            raise StoreWrongKeyError(f"wrong key for the personal store of user {uid!r}: {detail}. Use the key "
                                     "the store was written with")
        raise StoreCorruptError(f"cannot load the personal state of user {uid!r} (wrong key or corrupted store): "
                                f"no file authenticates. {detail}")

    def save(self, user_id: str | int, arrays: dict[str, np.ndarray], meta: dict, supersedes=None) -> None:
        """Atomically make (arrays, meta) the user's current state, keeping the previous one as ``.prev``.

        The new version is committed when this returns (see the invariant in
        the module docstring). Refuses (StoreWrongKeyError) to overwrite state
        that exists but was encrypted with another key. ``supersedes(meta)``
        True for the current version: it is an attempt the new one redoes (a
        round a crash interrupted before its checkpoint), so it is replaced in
        place and ``.prev`` (the version that round started from) is kept;
        rotating it out would lose the user's state on a second crash.
        """
        uid = _canonical_id(user_id)
        blob = self._seal(uid, arrays, meta)
        current, prev = self.paths(uid)
        with self._lock():
            self._remove_stale_tmp(current)
            try:                                 # the current version, decrypted once
                state = self._read(uid, current)
                cur = "absent" if state is None else "valid"
            except _BadFile as e:
                state, cur = None, e
            rotate = cur == "valid"
            if rotate and supersedes is not None and supersedes(state[1]) and self._check(uid, prev) == "valid":
                rotate = False
            if not rotate:  # first save, interrupted save, or a damaged current: never evict prev
                old = self._check(uid, prev)
                if old != "valid" and any(isinstance(c, _BadFile) and c.foreign_key for c in (cur, old)):
                    raise StoreWrongKeyError(f"personal store of user {uid!r} was written with another key "
                                             f"(this key is {self.key_id}); refusing to overwrite it")
                if isinstance(cur, _BadFile):
                    log.warning("%s: %s; overwriting it and keeping %s", current, cur.why, prev.name)
            fd, tmp = tempfile.mkstemp(prefix=f".{current.stem}.", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                if rotate:
                    os.replace(current, prev)  # current absent, prev = old version (complete)
                os.replace(tmp, current)       # current = new version (complete)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_dir(self.directory)

    def delete(self, user_id: str | int) -> bool:
        """Remove every file of a user (current, previous, leftovers); True if there was any."""
        uid = _canonical_id(user_id)
        current, prev = self.paths(uid)
        with self._lock():
            found = self._remove_stale_tmp(current)
            for p in (current, prev):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    found = True
            _fsync_dir(self.directory)
        return found

    # -- helpers
    def _check(self, uid: str, path: Path) -> str | _BadFile:
        """"absent", "valid", or the _BadFile saying why not."""
        try:
            return "absent" if self._read(uid, path) is None else "valid"
        except _BadFile as e:
            return e

    def _remove_stale_tmp(self, current: Path) -> bool:
        """Temp files of this user left by a killed writer (safe: we hold the writer lock)."""
        if fcntl is None:  # pragma: no cover - without the lock another writer may own them
            return False
        found = False
        for p in self.directory.glob(f".{current.stem}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                found = True
        return found

    @contextlib.contextmanager
    def _lock(self):
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock (also released if the process dies)

    def __repr__(self) -> str:
        return f"PersonalStore({str(self.directory)!r}, key id {self.key_id})"


def open_store(directory: str, key_file: str = "") -> PersonalStore | None:
    """The store a run configuration names (None without a directory): key from ``key_file``, else from
    the environment."""
    if not directory:
        return None
    if key_file:
        return PersonalStore.from_key_file(directory, key_file)
    return PersonalStore.from_env(directory)
