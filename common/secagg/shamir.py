"""Shamir secret sharing over GF(2^521 - 1) with OS randomness, and the share encoding."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .messages import PRIME, SHARE_BYTES, MessageRejected, RandBytes, SecAggError

# --------------------------------------------------------------------------- Shamir over GF(2^521 - 1)


def share_x(node_id: int) -> int:
    """The evaluation point of a holder: its id + 1 (nonzero, distinct, < PRIME)."""
    return node_id + 1


def _random_field(randbytes: RandBytes) -> int:
    while True:
        v = int.from_bytes(randbytes(SHARE_BYTES), "big") & PRIME
        if v < PRIME:
            return v


def shamir_share(secret: int, threshold: int, xs: Sequence[int], randbytes: RandBytes = os.urandom) -> list[int]:
    """Shares f(x) of a random polynomial of degree threshold - 1 with f(0) = secret."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret out of the field")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs 1..{len(xs)} holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("evaluation points must be distinct and nonzero")
    coeffs = [secret] + [_random_field(randbytes) for _ in range(threshold - 1)]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out.append(y)
    return out


def lagrange_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """The value at 0 of the polynomial through `points` (degree len(points) - 1)."""
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate evaluation points")
    nums, dens = [], []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        nums.append(num)
        dens.append(den)
    # one inversion for all denominators (Montgomery's trick)
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    total = 0
    for j in range(len(xs) - 1, -1, -1):
        inv_j = inv * prefix[j] % PRIME          # 1 / dens[j]
        inv = inv * dens[j] % PRIME
        total = (total + points[j][1] * nums[j] % PRIME * inv_j) % PRIME
    return total


def shamir_reconstruct(points: Sequence[tuple[int, int]], threshold: int) -> int:
    """The secret from the first `threshold` shares; SecAggError with fewer."""
    if len(points) < threshold:
        raise SecAggError(f"{len(points)} shares cannot reconstruct a {threshold}-of-n secret")
    return lagrange_at_zero(list(points)[:threshold])


def encode_share(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(b: bytes) -> int:
    if not isinstance(b, bytes) or len(b) != SHARE_BYTES:
        raise MessageRejected(f"a share must be {SHARE_BYTES} bytes")
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise MessageRejected("share out of the field")
    return y
