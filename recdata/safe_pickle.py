"""Loading RecFlow's pickles without running whatever they ask for.

A pickle is a small program: its GLOBAL / STACK_GLOBAL opcodes import any
callable by name and its REDUCE opcode calls it, so ``pickle.load`` on a
downloaded file can run ``os.system``. RecFlow ships pickles
(``seq_effective_50_dict``, ``request_id_dict``, ``ubm_seq_request_id_dict``,
``others/id_cnt.pkl``), and they hold only dicts, ints, strings and integer
numpy arrays. `load_restricted` therefore resolves only the handful of numpy
globals that rebuild such arrays and refuses every other name *before* it is
called, so nothing in a refused pickle runs. Afterwards it walks the loaded
structure and refuses anything that is not plain data (object or structured
arrays, sets, bytes, arbitrary instances), because an object array could
otherwise carry values the importers never expect.

Both numpy 1.x (``numpy.core.*``) and numpy 2.x (``numpy._core.*``) module
paths are accepted and resolved to the installed numpy's functions, without
importing numpy 2's deprecated ``numpy.core`` shim.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .store import DatasetError

NUMERIC_DTYPE_KINDS = "biuf"
"""numpy dtype kinds a loaded array may have: bool, signed, unsigned, float."""


class UnsafePickleError(DatasetError):
    """A pickle asked for a global outside the allow-list or holds non-numeric data.

    A DatasetError (hence a FedpaError), so that importers report it like any
    other bad input file.
    """


def _numpy_core(module: str) -> Any:
    """numpy's ``_core.<module>`` (numpy 2.x) or ``core.<module>`` (numpy 1.x)."""
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:  # numpy 1.x before the _core rename
        return importlib.import_module(f"numpy.core.{module}")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # ndarray, protocols 0-4
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars (np.int64(3))
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # ndarray, protocol 5
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self._path = path
        self._allowed = {**_numpy_globals(), ("_codecs", "encode"): self._latin1_bytes,
                         ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to load global '{module}.{name}'; only numpy array "
                "reconstruction is allowed in RecFlow pickles (the file may be tampered with)") from None

    def _latin1_bytes(self, text: str, encoding: str) -> bytes:
        """Stand-in for ``_codecs.encode``: pickle protocols 0-2 spell ``bytes`` as
        ``_codecs.encode(text, 'latin1')``; any other codec (zlib, bz2, ...) is refused."""
        if encoding != "latin1" or not isinstance(text, str):
            raise UnsafePickleError(f"{self._path}: refused '_codecs.encode' with codec {encoding!r}; "
                                    "only 'latin1' (how old pickle protocols store bytes) is allowed")
        return text.encode("latin1")


def _empty_bytes() -> bytes:
    """Stand-in for ``bytes``: protocols 0-2 spell ``b''`` (an empty array's data) as
    ``bytes()``; taking no argument, it cannot be made to allocate ``bytes(10**12)``."""
    return b""


def load_restricted(path: str | Path) -> object:
    """Unpickle ``path`` allowing only dicts, lists, tuples, str, numbers and numeric numpy arrays.

    Raises UnsafePickleError for a refused global or non-numeric content, and
    DatasetError for a missing, truncated or otherwise unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file is missing")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, MemoryError) as e:
        raise DatasetError(f"{path}: not a readable pickle (truncated or corrupt?): "
                           f"{type(e).__name__}: {e}") from None
    _check_plain_data(obj, path)
    return obj


def _check_plain_data(obj: object, path: Path) -> None:
    """Refuse anything in ``obj`` but containers of str, numbers and numeric arrays.

    Iterative with a visited set: a pickle can build self-referencing or very
    deeply nested lists, which must not crash a recursive walk. Locations are
    kept as key tuples and only spelled out for the error message.
    """
    stack: list[tuple[object, tuple]] = [(obj, ())]
    seen: set[int] = set()
    while stack:
        value, at = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, (*at, "<key>")))
                stack.append((v, (*at, k)))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, (*at, i)) for i, v in enumerate(value))
        elif isinstance(value, (np.ndarray, np.generic)):
            if value.dtype.kind not in NUMERIC_DTYPE_KINDS:
                raise UnsafePickleError(f"{path}: {_location(at)} has numpy dtype {value.dtype}; "
                                        "only bool, integer and float arrays are allowed")
        elif value is not None and not isinstance(value, (str, int, float)):
            raise UnsafePickleError(f"{path}: {_location(at)} is a {type(value).__name__}; only dicts, "
                                    "lists, tuples, strings, numbers and numeric arrays are allowed")


def _location(at: tuple) -> str:
    return "the top-level object" if not at else "the object at " + "".join(f"[{k!r}]" for k in at)
