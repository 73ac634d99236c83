"""A personal model compiled for a device: the foundation's encoders and the adapted tower as TorchScript, so a
device trains and scores its user's adapters with torch alone.

Why: a device process that imports the modelling stack (`transformers`' model classes and `peft`, which
pull scipy, sympy and torch's compiler on import) holds ~450 MiB before it trains. The foundation's encoders
are frozen and the adapters sit on the tower (`recmodels.personalization`), so what a device runs is fixed
once the run's configuration is: `compile_personal_model` traces it where the full install is (the
operator, at provisioning: `client.device_data.provision`), and `load_compiled` reads it back with torch
only. `PersonalModel(..., compiled=...)` then trains, exchanges and scores exactly as with peft's modules:
the same parameter names, kinds and rows, the same loss, optimizer and item-side tables (plain PyTorch).

TorchScript, not `torch.export`: loading an exported program imports torch's compiler stack (sympy,
dynamo: +90 MiB measured), which is what this avoids. A trace records one path through the code, so:

- routing (group rows, user slot, domain) is an *input* of the compiled tower, traced with rows of mixed
  groups so that it records the general per-row path, not one user's rows as constants;
- the adapter paths are fixed (all on): an algorithm that trains paths in phases (Ditto) is not compiled;
- there is no dropout on the adapters (it would be traced in one mode);
- the compiled tower's outputs are checked against peft's at compile time (`PARITY_TOLERANCE`), on rows of
  every group value, or nothing is written.

Files (one directory, written atomically): ``encoder.pt``, ``tower.pt`` (routed, trainable), ``base_tower.pt``
(the frozen tower alone: the reference a personalization is compared with) and ``compiled.json`` (what the
model is for, its parameter index, and each file's sha256, checked on load).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpa.foundation.batch import CATEGORICAL_ITEM_FIELDS
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.functional import check_domains, check_group_rows

FORMAT = "fedpa-compiled"
VERSION = 1
META_FILE = "compiled.json"
FILES = {"encoder": "encoder.pt", "tower": "tower.pt", "base": "base_tower.pt"}
ENCODER_INPUTS = ("user_profile", "item", "hist_items", "hist_mask", "context")
PARITY_TOLERANCE = 1e-5


class CompiledModelError(FedpaError):
    """A compiled model that cannot be made, is missing, corrupted, or was made for another configuration."""


@dataclass(frozen=True)
class CompiledKind:
    """`foundation.adapters.Kind` of one exchanged entry, as the compiled tower names its parameter."""

    kind: str
    group: tuple[str, int] | None = None
    param: str = ""
    row: int | None = None
    per_slot: bool = False


# ---------------------------------------------------------------------------------------------- the device side


class CompiledTower(nn.Module):
    """Called as peft's adapted tower is (``tower(x)``), routed by `CompiledAdapters.use_routing`."""

    def __init__(self, routed: nn.Module, base: nn.Module):
        super().__init__()
        self.routed = routed     # (x [n, D], group rows [n, G], user slots [n], domains [n]) -> logits [n, T]
        self.base = base         # x -> the frozen tower's logits
        self.routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.adapters_on = True
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapters_on:
            return self.base(x)
        if self.routing is None:
            raise FedpaError("compiled tower called outside use_routing(...): it needs each row's groups and slot")
        g, s, d = self.routing
        if g.shape[0] != x.shape[0]:
            raise FedpaError(f"routing holds {g.shape[0]} rows, the batch has {x.shape[0]}")
        return self.routed(x, g, s, d)


class CompiledAdapters:
    """What `PersonalModel` asks of its adapted model, for a compiled tower: its parameters, their kinds,
    routing, the paths in use, the adapters switched off. The functions of `foundation.adapters` that take the
    model as their first argument are methods here with the same signatures (`PersonalModel` calls either)."""

    def __init__(self, tower: CompiledTower, kinds: Mapping[str, CompiledKind], group_attributes: list[str],
                 group_vocab: Mapping[str, int], domain_values: int):
        self.tower = tower
        self.kinds = dict(kinds)
        self.group_attributes = list(group_attributes)
        self.group_vocab = dict(group_vocab)
        self.domain_values = int(domain_values)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.tower.routed.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.tower.routed.parameters()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.tower.adapters_on = False
        try:
            yield
        finally:
            self.tower.adapters_on = True

    # -- the functions of foundation.adapters, as methods

    def parameter_kinds(self, model: CompiledAdapters) -> dict[str, CompiledKind]:
        return dict(self.kinds)

    def set_active_paths(self, model: CompiledAdapters, paths: Iterable[str] | None) -> None:
        if paths is not None:
            raise FedpaError(f"a compiled model trains all its adapter paths at once, not {sorted(paths)} "
                             "(an algorithm that trains paths in phases, such as Ditto, is not compiled)")

    def ditto_penalty(self, model: CompiledAdapters) -> torch.Tensor:
        raise FedpaError("Ditto is not compiled for devices (its phases train one path at a time)")

    @contextlib.contextmanager
    def use_routing(self, model: CompiledAdapters, group_index: torch.Tensor | None = None,
                    user_slot: torch.Tensor | None = None, domain: torch.Tensor | None = None) -> Iterator[None]:
        n = next(len(t) for t in (group_index, user_slot, domain) if t is not None)
        g = (torch.zeros(n, 0, dtype=torch.long) if group_index is None else group_index.long())
        check_group_rows(g, self.group_attributes, self.group_vocab)   # the trace reads rows without checking
        s = torch.zeros(n, dtype=torch.long) if user_slot is None else user_slot.long()
        if bool((s != 0).any()):
            raise FedpaError("a compiled model serves one user (slot 0)")
        d = torch.zeros(n, dtype=torch.long) if domain is None else domain.long()
        if self.domain_values:
            d = check_domains(d, self.domain_values)
        prev = self.tower.routing
        self.tower.routing = (g, s, d)
        try:
            yield
        finally:
            self.tower.routing = prev


class CompiledConfig:
    """What a device's model reads of the foundation's configuration (`FoundationConfig`, a transformers class):
    the profile's fields and each item field's table rows, as the configuration computed them at compile time."""

    def __init__(self, user_fields: list[str], tables: Mapping[str, tuple[int, bool]]):
        self.user_fields = list(user_fields)
        self.tables = {f: (int(n), bool(h)) for f, (n, h) in tables.items()}

    def table_size(self, field: str) -> int:
        return self.tables[field][0]

    def hashes_all(self, field: str) -> bool:
        return self.tables[field][1]


class CompiledFoundation:
    """The frozen foundation as a device runs it: its configuration, and its encoders (tower inputs of a batch)."""

    def __init__(self, config: CompiledConfig, encoder: nn.Module, tower_in: int, label_columns: list[int]):
        self.config = config
        self.encoder = encoder
        self.tower_in = int(tower_in)
        self.label_columns = list(label_columns)

    @torch.no_grad()
    def encode(self, **batch: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return self.encoder(*(batch[k] for k in ENCODER_INPUTS)), None, None


@dataclass
class Compiled:
    foundation: CompiledFoundation
    adapters: CompiledAdapters
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The compiled model's description, without loading it (what it was made for)."""
    f = Path(path) / META_FILE
    try:
        meta = json.loads(f.read_text())
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) != VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, not {FORMAT!r} "
                             f"version {VERSION}")
        return meta
    except FileNotFoundError:
        raise CompiledModelError(f"{path}: no compiled model ({META_FILE} missing)") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise CompiledModelError(f"{f}: malformed ({e})") from None


@dataclass
class _Pinned:
    version: tuple
    meta: dict[str, Any]
    files: dict[str, bytes]                 # checked against their digests once, when pinned
    modules: dict[str, nn.Module] | None    # loaded once, for the first load in a process forked from the pinner
    pid: int


_PINNED: dict[Path, _Pinned] = {}


def _files_version(path: Path) -> tuple:
    return tuple((f, st.st_size, st.st_mtime_ns, st.st_ino)
                 for f in (META_FILE, *FILES.values()) for st in [(path / f).stat()])


def pin_compiled(path: str | Path) -> None:
    """Keep this compiled model loaded in this process, for the processes forked from it (`client/warm_executor.py`
    forks one per task): the first `load_compiled(path)` in each child takes the loaded modules as they are (a
    forked child's writes are its own), later ones read them from memory, without the files or their digests; as
    long as the files are the version pinned."""
    import os

    path = Path(path).resolve()
    version = _files_version(path)
    meta, modules, files = _read(path)
    _PINNED[path] = _Pinned(version, meta, files, modules, os.getpid())


def load_compiled(path: str | Path) -> Compiled:
    """Read a compiled model (each file checked against its sha256 first); torch only."""
    import io
    import os

    path = Path(path)
    pin = _PINNED.get(path.resolve()) if _PINNED else None
    if pin is None or pin.version != _files_version(path.resolve()):
        meta, modules, _ = _read(path)
        return _assemble(path, meta, modules)
    if pin.pid != os.getpid() and pin.modules is not None:   # a forked task: the pinned modules are its own copy
        modules, pin.modules = pin.modules, None
    else:
        modules = {k: _load(path / FILES[k], io.BytesIO(pin.files[FILES[k]])) for k in FILES}
    return _assemble(path, pin.meta, modules)


def _load(f: Path, source) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # TorchScript over torch.export: module doc
            return torch.jit.load(source, map_location="cpu")
    except RuntimeError as e:
        raise CompiledModelError(f"{f}: not a loadable TorchScript module ({str(e).splitlines()[0]})") from None


def _read(path: Path) -> tuple[dict[str, Any], dict[str, nn.Module], dict[str, bytes]]:
    import io

    meta = read_meta(path)
    modules, files = {}, {}
    for key, name in FILES.items():
        f = path / name
        if not f.is_file():
            raise CompiledModelError(f"{f}: missing")
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"][name]:
            raise CompiledModelError(f"{f}: its sha256 is not the one recorded at compile time (corrupted or "
                                     "replaced): refused")
        files[name] = data
        modules[key] = _load(f, io.BytesIO(data))
    return meta, modules, files


def _assemble(path: Path, meta: dict[str, Any], modules: dict[str, nn.Module]) -> Compiled:
    config = CompiledConfig(meta["user_fields"], {f: tuple(v) for f, v in meta["tables"].items()})
    tower = CompiledTower(modules["tower"], modules["base"])
    kinds = {name: CompiledKind(k["kind"], tuple(k["group"]) if k["group"] else None, k["param"], k["row"],
                                k["per_slot"]) for name, k in meta["kinds"].items()}
    params = dict(tower.routed.named_parameters())
    missing = sorted({k.param for k in kinds.values()} - set(params))
    if missing:
        raise CompiledModelError(f"{path}: the compiled tower lacks parameter(s) {missing[:3]}")
    adapters = CompiledAdapters(tower, kinds, meta["group_attributes"], meta["group_vocab"], meta["domain_values"])
    modules["encoder"].eval()
    return Compiled(CompiledFoundation(config, modules["encoder"], meta["tower_in"], meta["task_columns"]),
                    adapters, meta)


# ---------------------------------------------------------------------------------------------- the operator side


class _Routed(nn.Module):
    """The adapted tower with its routing as inputs (what is traced). The peft model is held outside the module
    tree, so the trace keeps the tower's parameters only."""

    def __init__(self, model: nn.Module, tower: nn.Module, n_groups: int, domains: bool):
        super().__init__()
        self.tower = tower
        self._model = [model]
        self.n_groups, self.domains = n_groups, domains

    def forward(self, x, group_index, user_slot, domain):
        from fedpa.foundation.adapters import use_routing

        with use_routing(self._model[0], group_index=group_index if self.n_groups else None, user_slot=user_slot,
                         domain=domain if self.domains else None):
            return self.tower(x)


class _Encoder(nn.Module):
    def __init__(self, foundation: nn.Module):
        super().__init__()
        self.foundation = foundation

    def forward(self, user_profile, item, hist_items, hist_mask, context):
        return self.foundation.encode(user_profile=user_profile, item=item, hist_items=hist_items,
                                      hist_mask=hist_mask, context=context)[0]


def _trace(module: nn.Module, inputs: tuple) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # TracerWarnings on the branches the trace fixes (see the module doc)
            return torch.jit.trace(module, inputs, check_trace=False)
    except (RuntimeError, TypeError, ValueError) as e:   # what TorchScript cannot follow: the full model runs
        raise CompiledModelError(f"TorchScript could not trace {type(module).__name__} "
                                 f"({str(e).splitlines()[0][:200]})") from None


def _mixed_groups(n: int, vocab: list[int], seed: int = 0) -> torch.Tensor:
    """[n, G] group rows cycling through every value of every attribute (so no batch has one row of each)."""
    cols = [torch.arange(n) % v for v in vocab]
    g = torch.stack(cols, dim=1) if cols else torch.zeros(n, 0, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    return g[torch.randperm(n, generator=gen)]


def compile_personal_model(pm, out: str | Path, batch: Mapping[str, torch.Tensor], *,
                           options: Mapping[str, Any], foundation_digest: str) -> dict[str, Any]:
    """Trace ``pm`` (a `PersonalModel` with peft adapters, one user slot) into ``out``: its encoders on ``batch``
    (a foundation batch of real rows), its adapted and frozen towers. ``options``: what the model is for
    (`common.models.compiled_options`), checked when a device loads it. Raises `CompiledModelError` when the
    model cannot be compiled faithfully; writes nothing then."""
    from fedpa.foundation.adapters import parameter_kinds

    model = pm.model
    if model is None:
        raise CompiledModelError(f"algorithm '{pm.algorithm.name}' has no adapters to compile")
    if pm.algorithm.ditto:
        raise CompiledModelError("Ditto trains its paths in phases (a trace would fix them)")
    if pm.host is not None:   # its trained head comes from stage-models, which the options a device checks omit
        raise CompiledModelError("a funnel stage's head is not compiled")
    if getattr(pm.config, "lora_dropout", 0.0):
        raise CompiledModelError("adapter dropout cannot be compiled (a trace fixes its mode)")
    if pm.config.user_slots != 1:
        raise CompiledModelError(f"a device model serves one user, not {pm.config.user_slots} slots")
    tower_prefix = next((name + "." for name, m in model.named_modules() if m is pm.tower), None)
    if tower_prefix is None:
        raise CompiledModelError("the personal model's tower is not inside its adapted model")
    vocab = [int(pm.config.group_vocab[a]) for a in pm.group_attributes]
    domains = pm.item_domains is not None
    n_domains = int(pm.config.domain_values) if domains else 0

    with torch.no_grad():
        x = pm.foundation.encode(**batch)[0]
    n = max(len(x), 2 * max(vocab + [n_domains, 1]))
    x = x[torch.arange(n) % len(x)]
    g = _mixed_groups(n, vocab)
    s = torch.zeros(n, dtype=torch.long)
    d = (torch.arange(n) % n_domains) if domains else torch.zeros(n, dtype=torch.long)
    encoder = _trace(_Encoder(pm.foundation).eval(), tuple(batch[k] for k in ENCODER_INPUTS))
    routed = _Routed(model, pm.tower, len(vocab), domains)
    tower = _trace(routed, (x, g, s, d))
    with model.disable_adapter():
        base = _trace(pm.tower, (x,))

    # the traces must compute what peft's modules do, on rows of other batches and sizes too
    worst = 0.0
    with torch.no_grad():
        f2 = encoder(*(batch[k][:max(len(x) // 2, 1)] for k in ENCODER_INPUTS))
        worst = max(worst, float((f2 - pm.foundation.encode(**{k: v[:len(f2)] for k, v in batch.items()})[0])
                                 .abs().max()))
        for seed in (1, 2):
            m = max(n - seed, 1)
            gm, dm = _mixed_groups(m, vocab, seed), d[:m].roll(seed)
            worst = max(worst, float((tower(x[:m], gm, s[:m], dm) - routed(x[:m], gm, s[:m], dm)).abs().max()))
        # one user's rows, as a device has them: peft takes its one-row path there, the trace its per-row path
        one = g[:1].expand(n, -1).contiguous()
        worst = max(worst, float((tower(x, one, s, d) - routed(x, one, s, d)).abs().max()))
        with model.disable_adapter():
            worst = max(worst, float((base(x) - pm.tower(x)).abs().max()))
    if not worst <= PARITY_TOLERANCE:
        raise CompiledModelError(f"the compiled model differs from peft's by {worst:.2e} (> {PARITY_TOLERANCE}): "
                                 "not written")

    kinds = {}
    for name, k in parameter_kinds(model).items():
        if k.kind == "frozen":
            continue
        if not k.param.startswith(tower_prefix):
            raise CompiledModelError(f"adapter parameter {k.param} is outside the tower")
        kinds[name] = asdict(CompiledKind(k.kind, k.group, "tower." + k.param[len(tower_prefix):], k.row,
                                          k.per_slot))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for key, module in (("encoder", encoder), ("tower", tower), ("base", base)):
            module.save(str(tmp / FILES[key]))
        meta = {"format": FORMAT, "version": VERSION, "options": _jsonable(options),
                "foundation-digest": foundation_digest, "tower_in": int(pm.tower_in),
                "task_columns": [int(c) for c in pm.task_columns], "group_attributes": list(pm.group_attributes),
                "user_fields": list(pm.foundation.config.user_fields),
                "tables": {f: [pm.foundation.config.table_size(f), pm.foundation.config.hashes_all(f)]
                           for f in CATEGORICAL_ITEM_FIELDS},
                "group_vocab": {a: v for a, v in zip(pm.group_attributes, vocab)}, "domain_values": n_domains,
                "kinds": kinds, "parity": worst,
                "sha256": {name: _sha256(tmp / name) for name in FILES.values()}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _jsonable(value: Any) -> Any:
    """``options`` as JSON compares them: arrays by digest, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return "sha256:" + hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    if isinstance(value, np.generic):
        return value.item()
    return value


def same_options(meta: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
    return meta.get("options") == _jsonable(options)
