"""What a device holds: its own user's data and the foundation, nothing of anyone else's, no path of the server's.

A *device directory* (made by `provision`, e.g. through ``fedpa device provision``)::

    device.json     {"format": "fedpa-device", "clients": {client index: user id}, "num-clients": N,
                     "foundation-digest": sha256}
    data/           a canonical dataset with these users' rows only (`recdata.subset`) and the item catalogue
    foundation/     the foundation artifact (config.json, model.safetensors)
    compiled/       the run's personal model compiled for the device (`recmodels.compiled`): what a one-user
                    device trains and scores with, with torch alone (absent where it could not be compiled:
                    device.json's "compiled" says why, and the device runs the full model)

A SuperNode names it in its ``--node-config`` (``device-data=DIR``). The node then reads its users' rows and the
foundation from there alone, and refuses a run whose foundation digest (sent by the server with every run)
differs from its copy's. A phone holds one user; an edge node serving a few users holds theirs.

This module stays light (no torch): the ClientApp reads the device file before it knows whether a message needs
a model. Provisioning, which reads the whole dataset, is the operator's side (`provision`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from fedpa.common.config import FederationConfig
from fedpa.foundation.checkpoint import ARTIFACT_FILES, OPTIONAL_ARTIFACT_FILES, artifact_digest, replace_dir
from fedpa.foundation.errors import FedpaError

DEVICE_FILE = "device.json"
FORMAT = "fedpa-device"
COMPILED_DIR = "compiled"


class DeviceDataError(FedpaError):
    """A device directory is missing, malformed, or holds a foundation other than the run's."""


_DIGESTS: dict[tuple, str] = {}


def foundation_digest(path: Path) -> str:
    """The artifact digest of the device's foundation, hashed once per process and file version."""
    key = tuple((str(path / f), (path / f).stat().st_size, (path / f).stat().st_mtime_ns)
                for f in ARTIFACT_FILES + OPTIONAL_ARTIFACT_FILES if (path / f).exists())
    if key not in _DIGESTS:
        _DIGESTS[key] = artifact_digest(path)
    return _DIGESTS[key]


@dataclass(frozen=True)
class DeviceData:
    path: Path
    clients: dict[int, int]          # client index (the federation's numbering) -> user id
    num_clients: int                 # the federation's population, as provisioned

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def foundation_dir(self) -> Path:
        return self.path / "foundation"

    @classmethod
    def open(cls, path: str | Path) -> DeviceData:
        path = Path(path)
        f = path / DEVICE_FILE
        if not f.is_file():
            raise DeviceDataError(f"{path}: not a device directory (no {DEVICE_FILE}; make one with "
                                  "`fedpa device provision`)")
        try:
            meta = json.loads(f.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
            clients = {int(c): int(u) for c, u in meta["clients"].items()}
            num_clients = int(meta["num-clients"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DeviceDataError(f"{f}: malformed ({type(e).__name__}: {e})") from None
        if not clients or not all(0 <= c < num_clients for c in clients):
            raise DeviceDataError(f"{f}: client indices {sorted(clients)[:5]} do not lie in 0..{num_clients - 1}")
        for sub in ("data", "foundation"):
            if not (path / sub).is_dir():
                raise DeviceDataError(f"{path}: no {sub}/ directory")
        return cls(path, clients, num_clients)

    def check_foundation(self, expected: str) -> None:
        """Refuse a run whose foundation is not the one this device holds."""
        if not expected:
            raise DeviceDataError("the run names no foundation digest: this device cannot check that its foundation "
                                  "is the run's (a server of an older fedpa?)")
        actual = foundation_digest(self.foundation_dir)
        if actual != expected:
            raise DeviceDataError(f"{self.foundation_dir}: foundation {actual[:12]}… is not the run's "
                                  f"({expected[:12]}…): refused (provision the device with the run's foundation)")

    def apply(self, cfg: FederationConfig) -> FederationConfig:
        """The run's configuration as this device runs it: its own data and foundation, after the version check."""
        self.check_foundation(cfg.foundation_digest)
        return replace(cfg, data_dir=str(self.data_dir), foundation=str(self.foundation_dir), feature_cache="none")


def provision(cfg: FederationConfig, clients: list[int], out: str | Path, *, overwrite: bool = False) -> DeviceData:
    """Write a device directory for the federation's clients ``clients`` (indices into the partition of
    ``cfg.data_dir`` that ``cfg`` defines), with ``cfg.foundation`` as its foundation. Atomic: built aside and
    renamed into place; an existing device directory is replaced only with ``overwrite``."""
    from fedpa.client.runtime import partition_config
    from fedpa.foundation.checkpoint import verify_safetensors
    from fedpa.recdata.partition import make_partition
    from fedpa.recdata.store import Dataset
    from fedpa.recdata.subset import write_user_subset

    out = Path(out).resolve()
    if out.exists():
        if not overwrite:
            raise DeviceDataError(f"{out}: already exists (pass --overwrite to replace it)")
        if not (out / DEVICE_FILE).is_file():
            raise DeviceDataError(f"{out}: exists and is not a device directory; refusing to replace it")
    ds = Dataset(cfg.data_dir)
    part = make_partition(ds, partition_config(cfg))
    bad = [c for c in clients if not 0 <= int(c) < part.num_clients]
    if bad or not clients:
        raise DeviceDataError(f"client index {bad[0] if bad else '(none)'} is not one of the federation's "
                              f"{part.num_clients} clients (0..{part.num_clients - 1})")
    users = {int(c): part.user_of(int(c)) for c in clients}
    verify_safetensors(Path(cfg.foundation) / "model.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_user_subset(ds, list(users.values()), tmp / "data")
        (tmp / "foundation").mkdir()
        for name in ARTIFACT_FILES + OPTIONAL_ARTIFACT_FILES:
            if name in ARTIFACT_FILES or (Path(cfg.foundation) / name).exists():
                shutil.copyfile(Path(cfg.foundation) / name, tmp / "foundation" / name)
        meta = {"format": FORMAT, "clients": {str(c): u for c, u in users.items()}, "num-clients": part.num_clients,
                "foundation-digest": artifact_digest(tmp / "foundation")}
        meta["compiled"] = (_compile(cfg, tmp, list(users.values()), meta["foundation-digest"]) if len(users) == 1
                            else "not compiled: a device of several users runs the full model")
        (tmp / DEVICE_FILE).write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DeviceData.open(out)


def _compile(cfg: FederationConfig, device_dir: Path, users: list[int], digest: str) -> str:
    """The run's personal model compiled into ``device_dir``/compiled, traced on the device user's own rows;
    returns what happened ("yes", or why not: the device then trains with the full model)."""
    import numpy as np

    from fedpa.client.runtime import user_splits
    from fedpa.common.models import build_personal_model, compiled_options
    from fedpa.recdata.examples import Lookups
    from fedpa.recdata.store import Dataset
    from fedpa.recmodels.compiled import CompiledModelError, compile_personal_model
    from fedpa.recmodels.personalization import PersonalModel

    on_device = replace(cfg, data_dir=str(device_dir / "data"), foundation=str(device_dir / "foundation"),
                        feature_cache="none", device_data="")
    pm = build_personal_model(on_device)
    if not isinstance(pm, PersonalModel) or pm.model is None:
        return f"not compiled: '{cfg.algorithm}' has no adapters on the foundation's tower"
    ds = Dataset(on_device.data_dir)
    splits = user_splits(on_device, ds, np.array(users), Lookups.for_foundation(ds, on_device.foundation))
    rows = next((ex for ex in (splits.train, splits.val, splits.test) if len(ex)), None)
    if rows is None:
        return "not compiled: the device's user has no rows to trace the model on"
    try:
        compile_personal_model(pm, device_dir / COMPILED_DIR, rows.batch(np.arange(min(len(rows), 256))),
                               options=compiled_options(on_device), foundation_digest=digest)
    except CompiledModelError as e:
        return f"not compiled: {e}"
    return "yes"
