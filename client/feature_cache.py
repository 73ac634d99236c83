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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedpa.recdata.examples import Examples
from fedpa.recmodels.personalization import PersonalModel, UserTensors

SPLITS = ("train", "val", "test")
FORMAT = 2  # 2: + items


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
        meta = json.loads((path / "meta.json").read_text())
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
          progress=None) -> FeatureCache:
    """Encode every row of ``splits`` (a `UserSplits` of ``users``, rows sorted by user) and write the cache."""
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
        (tmp / "meta.json").write_text(json.dumps({"users": users.tolist(), "group_size": splits.group_size,
                                                   "format": FORMAT}))
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
