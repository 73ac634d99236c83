"""Fixed-point encoding of float vectors into the integers mod 2^m that SecAgg+ sums, bit packing, and the
flattening of named updates into one vector."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from .messages import SecAggError

# --------------------------------------------------------------------------- fixed point


@dataclass(frozen=True)
class QuantConfig:
    """Fixed point: clip to [-clip, clip], scale 2^frac_bits, sums modulo 2^mod_bits (None: sized by the
    server for its number of participants with `for_clients`)."""

    clip: float = 8.0
    frac_bits: int = 24
    mod_bits: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"clip must be a positive number, got {self.clip}")
        if not 0 <= self.frac_bits <= 52:
            raise SecAggError(f"frac_bits must be within 0..52, got {self.frac_bits}")
        if self.mod_bits is not None and not 2 <= self.mod_bits <= 62:
            raise SecAggError(f"mod_bits must be within 2..62, got {self.mod_bits}")
        if self.mod_bits is not None and self.q_max >= 2 ** (self.mod_bits - 1):
            raise SecAggError(f"mod_bits={self.mod_bits} cannot hold one value of clip {self.clip} at "
                              f"2^{self.frac_bits}")

    @property
    def q_max(self) -> int:
        """Largest |quantized value|: rint(clip * 2^f)."""
        return int(np.rint(self.clip * 2.0**self.frac_bits))

    @property
    def max_clients(self) -> int:
        """Largest n whose sum cannot wrap: n * Q <= 2^(m-1) - 1."""
        if self.mod_bits is None:
            raise SecAggError("mod_bits is not set; use QuantConfig.for_clients(n)")
        return (2 ** (self.mod_bits - 1) - 1) // max(self.q_max, 1)

    def for_clients(self, n: int) -> QuantConfig:
        need = required_mod_bits(n, self)
        if self.mod_bits is not None:
            if self.mod_bits < need:
                raise SecAggError(f"mod_bits={self.mod_bits} is too small for {n} clients (need {need})")
            return self
        return replace(self, mod_bits=need)

    @classmethod
    def from_clip_norm(cls, clip_norm: float, frac_bits: int = 24, max_count: float = 1.0) -> QuantConfig:
        """For vectors L2-clipped to clip_norm (every coordinate is within it) carrying counts <= max_count."""
        return cls(clip=float(max(clip_norm, max_count)), frac_bits=frac_bits)


def required_mod_bits(n: int, cfg: QuantConfig) -> int:
    """Bits m such that the sum of n quantized values (each within [-Q, Q]) never wraps: bitlen(nQ) + 1."""
    m = (n * max(cfg.q_max, 1)).bit_length() + 1
    if m > 62:
        raise SecAggError(f"{n} clients at clip {cfg.clip} and 2^{cfg.frac_bits} need {m} > 62 bits; lower frac_bits")
    return m


def quantize(x: np.ndarray, cfg: QuantConfig, noise: np.ndarray | None = None) -> np.ndarray:
    """Clip to [-c, c], round to multiples of 2^-f, add ``noise`` (integers, in units of 2^-f: distributed DP's
    discrete Gaussian), return two's complement values mod 2^m as uint64. Noise that would carry a value
    outside [-Q, Q] is refused (the sum could wrap; clipping it would remove noise)."""
    if cfg.mod_bits is None:
        raise SecAggError("mod_bits is not set; use QuantConfig.for_clients(n)")
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise SecAggError("vector to aggregate contains NaN or inf")
    q = np.rint(np.clip(x, -cfg.clip, cfg.clip) * 2.0**cfg.frac_bits).astype(np.int64)
    if noise is not None:
        q = q + np.asarray(noise, dtype=np.int64).reshape(-1)
        outside = int(np.count_nonzero(np.abs(q) > cfg.q_max))
        if outside:
            raise SecAggError(f"{outside} noised value(s) lie outside the round's fixed-point range "
                              f"[-{cfg.clip:g}, {cfg.clip:g}]")
    return q.view(np.uint64) & np.uint64(2**cfg.mod_bits - 1)


def count_clipped(x: np.ndarray, cfg: QuantConfig) -> int:
    return int(np.count_nonzero(np.abs(np.asarray(x, dtype=np.float64)) > cfg.clip))


def dequantize_sum(s: np.ndarray, n: int, cfg: QuantConfig) -> np.ndarray:
    """The float sum from a modular sum of n quantized vectors (error <= n * 2^-(f+1) per coordinate)."""
    if n > cfg.max_clients:
        raise SecAggError(f"the sum of {n} clients may wrap modulo 2^{cfg.mod_bits} (at most {cfg.max_clients})")
    m = cfg.mod_bits
    s = np.asarray(s, dtype=np.uint64) & np.uint64(2**m - 1)
    signed = s.astype(np.int64) - np.where(s >= np.uint64(2 ** (m - 1)), np.int64(2**m), np.int64(0))
    return signed.astype(np.float64) / 2.0**cfg.frac_bits


def packed_length(dim: int, mod_bits: int) -> int:
    return (dim * mod_bits + 7) // 8


def pack_bits(v: np.ndarray, mod_bits: int) -> np.ndarray:
    """uint64 values < 2^m -> uint8 array of m bits each (little-endian bit order)."""
    v = np.ascontiguousarray(v, dtype="<u8")
    bits = np.unpackbits(v.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(bits[:, :mod_bits].reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, mod_bits: int, dim: int) -> np.ndarray:
    bits = np.unpackbits(np.asarray(buf, dtype=np.uint8), bitorder="little",
                         count=dim * mod_bits).reshape(dim, mod_bits)
    full = np.zeros((dim, 64), np.uint8)
    full[:, :mod_bits] = bits
    return np.packbits(full, axis=1, bitorder="little").reshape(-1).view("<u8").astype(np.uint64)


def concat_update(update: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """One float64 vector from named arrays, in the order of `shapes` (e.g. aggregation.expected_shapes)."""
    parts = []
    for key, shape in shapes.items():
        arr = np.asarray(update[key], dtype=np.float64)
        if arr.shape != tuple(shape):
            raise SecAggError(f"'{key}' has shape {arr.shape}, expected {tuple(shape)}")
        parts.append(arr.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def split_sum(vec: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of concat_update for a summed vector."""
    out, at = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64))
        out[key] = np.asarray(vec[at:at + size]).reshape(shape)
        at += size
    if at != len(vec):
        raise SecAggError(f"summed vector has {len(vec)} values, the shapes need {at}")
    return out
