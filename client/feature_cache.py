"""Cached frozen tower inputs for simulated users.

A client's local steps run on the foundation's tower inputs, which depend only
on (foundation checkpoint, dataset, split, partition) — not on the algorithm,
the round or the seed of the federation. A simulation therefore computes them
once for every private user, in one pass grouped by request (so each behaviour
sequence is encoded once), and every run, node and round reads its users' rows
from memory-mapped arrays. A device computes its own instead (`ClientRuntime`).

Layout: ``DIR/<key>/{train,val,test}.{features,labels,items}.npy`` (items: the rows' raw item
features, which item-side tables read) plus
``offsets.npy`` (per split, rows of private user i are offsets[i]..offsets[i+1])
and ``meta.json``; written to a temporary directory and renamed, so a reader
never sees a half-written cache.

The root is bounded: entries are removed least recently used first (`prune`; a
simulation calls it after building one, `fedpa cache prune` by hand). An open
entry holds a shared lock on its ``meta.json`` and opening it touches that file,
so pruning skips what a running simulation reads and knows what was used last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpa.recdata.examples import Examples
from fedpa.recmodels.personalization import PersonalModel, UserTensors

try:
    import fcntl
except ImportError:  # not POSIX: no locks, pruning relies on recency alone
    fcntl = None

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMAT = 2  # 2: + items
META = "meta.json"
TRASH = ".trash-"           # an entry being removed: renamed first, so no reader finds it half-deleted
STALE_BUILD_S = 24 * 3600   # a temporary build directory this old belongs to a killed process


def default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedpa" / "features"


def cache_key(foundation_dir: str, data_dir: str, split: str, negatives: int, seed: int,
              private_users: np.ndarray, rows: str = "") -> str:
    """``rows``: what rows a user has beyond its exposures ("" = none; e.g. a stage's negatives)."""
    h = hashlib.sha256()
    weights = Path(foundation_dir) / "model.safetensors"
    h.update(hashlib.sha256(weights.read_bytes()).digest())
    config = Path(foundation_dir) / "config.json"   # same shapes, other features: other rows
    h.update(config.read_bytes() if config.exists() else b"")
    graph = Path(foundation_dir) / "interest_graph.npy"   # widens sparse users' histories: other rows
    h.update(graph.read_bytes() if graph.exists() else b"")
    manifest = Path(data_dir) / "manifest.json"
    h.update(manifest.read_bytes())
    # every data file by name, size and modification time (a full digest of a RecFlow-sized dataset on every
    # start would cost more than the cache saves): a file rewritten in place gives another key
    for f in sorted(Path(data_dir).rglob("*.arrow")):
        st = f.stat()
        h.update(f"{f.relative_to(data_dir)}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(str(Path(data_dir).resolve()).encode())
    h.update(json.dumps([split, negatives, seed, FORMAT] + ([rows] if rows else [])).encode())
    h.update(np.ascontiguousarray(private_users, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


class FeatureCache:
    def __init__(self, path: Path):
        self.path = path
        self._lock = _hold_shared(path / META)   # while this object lives, `prune` leaves the entry alone
        try:
            os.utime(path / META)                # the entry's last use, which `prune` orders by
        except OSError:
            pass                                 # a read-only cache (e.g. shared by a cluster) is still readable
        meta = json.loads((path / META).read_text())
        self.users = np.asarray(meta["users"], dtype=np.int64)
        self.group_size = int(meta["group_size"])
        # copy-on-write maps: a user's rows are views of the file (no copy, pages shared between the
        # node processes and evictable), and tensors built on them are writable without touching the file
        self._arrays = {s: (np.load(path / f"{s}.features.npy", mmap_mode="c"),
                            np.load(path / f"{s}.labels.npy", mmap_mode="c"),
                            np.load(path / f"{s}.offsets.npy")) for s in SPLITS}
        self._items = {s: np.load(path / f"{s}.items.npy", mmap_mode="c") for s in SPLITS}

    def split(self, name: str) -> UserTensors:
        """Every user's rows of one split (rows sorted by user, as `split_users` returns them)."""
        f, lab, _ = self._arrays[name]
        return UserTensors(torch.from_numpy(np.array(f)), torch.from_numpy(np.array(lab)),
                           torch.from_numpy(np.array(self._items[name])))

    def user(self, user_id: int) -> list[UserTensors]:
        i = int(np.searchsorted(self.users, user_id))
        if i >= len(self.users) or self.users[i] != user_id:
            raise KeyError(user_id)
        out = []
        for s in SPLITS:
            f, lab, off = self._arrays[s]
            a, b = int(off[i]), int(off[i + 1])
            out.append(UserTensors(torch.from_numpy(f[a:b]), torch.from_numpy(lab[a:b]),
                                   torch.from_numpy(self._items[s][a:b])))
        return out


def build(path: Path, model: PersonalModel, splits, users: np.ndarray, batch_size: int = 2048,
          progress=None, source: dict | None = None) -> FeatureCache:
    """Encode every row of ``splits`` (a `UserSplits` of ``users``, rows sorted by user) and write the cache.
    ``source``: what the rows were made from (dataset, foundation, split, ...), kept in meta.json for
    `fedpa cache list`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for s in SPLITS:
            ex: Examples = getattr(splits, s)
            feats = model.features(_progressing(ex.iter_batches(batch_size), progress, s, len(ex), batch_size))
            np.save(tmp / f"{s}.features.npy", feats.features.numpy())
            np.save(tmp / f"{s}.labels.npy", feats.labels.numpy())
            np.save(tmp / f"{s}.items.npy", feats.items.numpy())
            np.save(tmp / f"{s}.offsets.npy", np.searchsorted(ex.user_id, np.r_[users, np.iinfo(np.int64).max]))
        (tmp / META).write_text(json.dumps({"users": users.tolist(), "group_size": splits.group_size,
                                            "format": FORMAT, "created": time.time(), "source": source or {}}))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureCache(path)


def _progressing(batches, progress, split, n, batch_size):
    done = 0
    for b in batches:
        yield b
        done += len(b["labels"])
        if progress:
            progress(f"encode {split}", done, n)


# ---------------------------------------------------------------------- bounding the root


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    bytes: int
    last_used: float    # seconds since the epoch (meta.json's modification time)
    source: dict        # what its rows were made from ({} for entries written before it was recorded)
    in_use: bool        # a live process holds it open

    @property
    def key(self) -> str:
        return self.path.name


def entries(root: Path) -> list[CacheEntry]:
    """The complete entries under ``root``, least recently used first."""
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        meta = d / META
        if d.name.startswith(".") or not meta.is_file():
            continue
        try:
            source = json.loads(meta.read_text()).get("source", {})
            used = meta.stat().st_mtime
        except (OSError, ValueError):   # removed meanwhile, or not ours: listed without a source
            source, used = {}, 0.0
        out.append(CacheEntry(d, _size(d), used, source, _in_use(meta)))
    return sorted(out, key=lambda e: e.last_used)


def prune(root: Path, *, max_bytes: int | None = None, unused_for_s: float | None = None,
          keep: Iterable[Path] = (), dry_run: bool = False) -> list[CacheEntry]:
    """Remove entries, least recently used first: every entry not used for ``unused_for_s`` seconds, then
    more until the rest fit in ``max_bytes``. Never an entry in ``keep`` or one a live process holds open
    (those still count towards the size). Leftovers of killed builds and removals go too. Returns what was
    (with ``dry_run``: would be) removed."""
    keep = {Path(p).resolve() for p in keep}
    now = time.time()
    listed = entries(root)
    total = sum(e.bytes for e in listed)
    removed = []
    for e in listed:
        stale = unused_for_s is not None and now - e.last_used >= unused_for_s
        over = max_bytes is not None and total > max_bytes
        if not (stale or over) or e.in_use or e.path.resolve() in keep:
            continue
        if dry_run or _remove(e.path):
            removed.append(e)
            total -= e.bytes
    if not dry_run:
        for d in root.iterdir() if root.is_dir() else ():
            if d.name.startswith(".") and d.is_dir() and (d.name.startswith(TRASH) or _stale_build(d, now)):
                shutil.rmtree(d, ignore_errors=True)
    return removed


def _stale_build(d: Path, now: float) -> bool:
    try:
        return ".tmp-" in d.name and now - d.stat().st_mtime > STALE_BUILD_S
    except FileNotFoundError:   # its build finished (renamed) or failed (removed) meanwhile
        return False


def _remove(path: Path) -> bool:
    """Remove one entry unless a process opened it meanwhile: with the entry locked, rename it out of the
    way (new readers then rebuild or encode their own rows), then delete it."""
    try:
        fd = os.open(path / META, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        trash = path.with_name(f"{TRASH}{path.name}-{os.getpid()}")
        os.replace(path, trash)
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _hold_shared(meta: Path):
    """A shared lock on an entry's meta.json, held by the returned file until it is closed or collected. An
    entry renamed away by `prune` before the lock was taken is reported as missing."""
    if fcntl is None:
        return None
    f = open(meta, "rb")  # noqa: SIM115 - held open on purpose: the lock lives as long as the cache object
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    try:
        same = os.fstat(f.fileno()).st_ino == os.stat(meta).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        f.close()
        raise FileNotFoundError(errno.ENOENT, "feature cache entry removed while opening", str(meta))
    return f


def _in_use(meta: Path) -> bool:
    if fcntl is None:
        return False
    try:
        fd = os.open(meta, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)   # closing releases the probe's lock


def _size(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:   # removed by another process's prune meanwhile
            pass
    return total
