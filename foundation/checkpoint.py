"""Checkpoint integrity and atomic writes, shared by the foundation, adapters and pre-training.

Public API::

    CheckpointError(FedpaError)
    seal_safetensors(path)          # add a SHA-256 of the data region to the file's own header metadata
    verify_safetensors(path)        # CheckpointError (naming the file) if truncated, corrupted or unreadable
    replace_dir(tmp, dst)           # move a fully written directory into place (old one removed after)
    artifact_digest(dir)            # the SHA-256 naming a foundation artifact (its config and weights)
    fsync_path(path)

Why the hash lives in the safetensors header: safetensors validates its header
(a truncated file fails) but not the tensor bytes, so a flipped bit loads
silently. Keeping the digest inside the same file (``__metadata__``
``fedpa_sha256``) makes "weights + digest" one file, replaced by one atomic
rename. Files without the key (written by other tools) are checked for
structure only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

from .errors import FedpaError

DIGEST_KEY = "fedpa_sha256"


class CheckpointError(FedpaError):
    """A checkpoint (foundation, adapters, resume state) is missing, corrupted, or does not match its config."""


def _read_header(path: Path) -> tuple[dict, int, int]:
    """Return (header dict, data offset, file size); CheckpointError if structurally broken."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:
        raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({e})") from e
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    if 8 + n + (max(ends) if ends else 0) != size:
        raise CheckpointError(f"{path}: corrupted or truncated safetensors file "
                              f"(tensors need {8 + n + max(ends or [0])} bytes, the file has {size})")
    return header, 8 + n, size


def _digest(path: Path, offset: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal_safetensors(path: str | Path) -> None:
    """Rewrite ``path`` with the SHA-256 of its tensor data in the header metadata (atomic replace)."""
    path = Path(path)
    header, offset, _ = _read_header(path)
    meta = dict(header.get("__metadata__") or {})
    meta[DIGEST_KEY] = _digest(path, offset)
    header["__metadata__"] = meta
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment
    tmp = path.with_name(f".{path.name}.seal-{os.getpid()}")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(blob)))
            dst.write(blob)
            src.seek(offset)
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def verify_safetensors(path: str | Path) -> None:
    """Check structure always, and the data digest when the file carries one."""
    path = Path(path)
    header, offset, _ = _read_header(path)
    expected = (header.get("__metadata__") or {}).get(DIGEST_KEY)
    if expected is not None:
        actual = _digest(path, offset)
        if actual != expected:
            raise CheckpointError(f"{path}: corrupted (SHA-256 of the tensor data {actual[:12]}... differs from "
                                  f"the recorded {expected[:12]}...)")


ARTIFACT_FILES = ("config.json", "model.safetensors")
OPTIONAL_ARTIFACT_FILES = ("interest_graph.npy",)   # recdata.interest_graph, when pre-trained with one
"""What a foundation artifact is: the files `load_foundation` reads (reports and resume state are not part)."""


def artifact_digest(path: str | Path) -> str:
    """SHA-256 over a foundation directory's artifact files, names included: the version a device checks its copy
    against (the server sends it with every run)."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ARTIFACT_FILES:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: no {name} (not a foundation checkpoint)")
        h.update(f"{name}:{f.stat().st_size}\0".encode())   # names and sizes: no two artifacts hash alike
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    for name in OPTIONAL_ARTIFACT_FILES:    # absent: the digest is what it was before such files existed
        f = path / name
        if f.is_file():
            h.update(f"{name}:{f.stat().st_size}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: str | Path, dst: str | Path) -> None:
    """Move the finished directory ``tmp`` to ``dst`` (same filesystem); the old ``dst`` goes only afterwards."""
    tmp, dst = Path(tmp), Path(dst)
    for f in tmp.iterdir():
        if f.is_file():
            fsync_path(f)
    fsync_path(tmp)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    fsync_path(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
