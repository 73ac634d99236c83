"""SecAgg+ messages: protocol constants, the header every message carries, typed field readers that reject
malformed input, and the errors both halves raise."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedpa.foundation.errors import FedpaError

RandBytes = Callable[[int], bytes]

PROTOCOL = b"fedpa-secagg+/v1"
SERVER_ID = -1
PHASE_SETUP, PHASE_ADVERTISE, PHASE_SHARE, PHASE_MASKED, PHASE_CONSISTENCY, PHASE_UNMASK = 0, 1, 2, 3, 4, 5
PHASE_NAMES = {0: "setup", 1: "advertise-keys", 2: "share-keys", 3: "masked-input", 4: "consistency-check",
               5: "unmask"}

MAX_NODE_ID = 2**64 - 1
MAX_ROUND_ID = 2**63 - 1
KEY_BYTES = 32          # X25519 keys, AES-256 keys, self-mask seeds
NONCE_BYTES = 32        # round nonce
PRIME = 2**521 - 1      # Shamir field (Mersenne prime, > any 256-bit secret)
SHARE_BYTES = 66        # ceil(521 / 8)
GCM_NONCE_BYTES = 12
ENVELOPE_HEADER = struct.Struct(">QQ")   # sender, recipient
ENVELOPE_BYTES = ENVELOPE_HEADER.size + GCM_NONCE_BYTES + 2 * SHARE_BYTES + 16
MAX_DIM = 2**31 - 1


class SecAggError(FedpaError):
    """A secure-aggregation round cannot go on (too many dropouts, a refused request, a bad config)."""


class MessageRejected(SecAggError):
    """One inbound message broke the protocol; the message says why."""


@dataclass(frozen=True)
class Rejection:
    """Why a message was rejected, and which client is treated as dropped for it (None: not a participant)."""

    phase: int
    client: int | None
    reason: str

    def __str__(self) -> str:
        who = "unknown sender" if self.client is None else f"client {self.client}"
        return f"phase {self.phase} ({PHASE_NAMES.get(self.phase, '?')}), {who}: {self.reason}"


# --------------------------------------------------------------------------- messages


def header(round_id: int, nonce: bytes, phase: int, sender: int, recipient: int) -> dict:
    return {"round": round_id, "nonce": nonce, "phase": phase, "sender": sender, "recipient": recipient}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def get_int(msg: Mapping, key: str) -> int:
    v = msg.get(key)
    if not _is_int(v):
        raise MessageRejected(f"field '{key}' must be an int, got {type(v).__name__}")
    return int(v)


def get_float(msg: Mapping, key: str) -> float:
    v = msg.get(key)
    if not isinstance(v, (int, float, np.floating)) or isinstance(v, bool) or not math.isfinite(v):
        raise MessageRejected(f"field '{key}' must be a finite number")
    return float(v)


def get_bytes(msg: Mapping, key: str, length: int | None = None) -> bytes:
    v = msg.get(key)
    if not isinstance(v, bytes):
        raise MessageRejected(f"field '{key}' must be bytes, got {type(v).__name__}")
    if length is not None and len(v) != length:
        raise MessageRejected(f"field '{key}' has {len(v)} bytes, expected {length}")
    return v


def get_ids(msg: Mapping, key: str) -> list[int]:
    """A list of distinct node ids."""
    v = msg.get(key)
    if not isinstance(v, (list, tuple)) or not all(_is_int(i) for i in v):
        raise MessageRejected(f"field '{key}' must be a list of ints")
    ids = [int(i) for i in v]
    if any(not 0 <= i <= MAX_NODE_ID for i in ids):
        raise MessageRejected(f"field '{key}' holds an id outside 0..2^64-1")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise MessageRejected(f"field '{key}' lists client {dup} twice")
    return ids


def get_bytes_list(msg: Mapping, key: str, count: int, length: int | None = None) -> list[bytes]:
    v = msg.get(key)
    if not isinstance(v, (list, tuple)) or not all(isinstance(b, bytes) for b in v):
        raise MessageRejected(f"field '{key}' must be a list of bytes")
    if len(v) != count:
        raise MessageRejected(f"field '{key}' has {len(v)} entries, expected {count}")
    if length is not None and any(len(b) != length for b in v):
        raise MessageRejected(f"field '{key}' entries must be {length} bytes")
    return list(v)


def check_header(msg, *, round_id: int, nonce: bytes, phase: int, sender: int, recipient: int) -> None:
    """Raise MessageRejected unless msg is a dict for this round, phase, sender and recipient."""
    if not isinstance(msg, Mapping):
        raise MessageRejected(f"message is a {type(msg).__name__}, not a dict")
    r, nn = msg.get("round"), msg.get("nonce")
    same_nonce = isinstance(nn, bytes) and nn == nonce
    if not _is_int(r) or int(r) != round_id or not same_nonce:
        raise MessageRejected(f"wrong round: message is for round {r!r}"
                              + ("" if same_nonce else " with another nonce") + f", this is round {round_id}")
    st = msg.get("phase")
    if not _is_int(st) or int(st) != phase:
        raise MessageRejected(f"wrong phase: message is for phase {st!r}, expected {phase} ({PHASE_NAMES[phase]})")
    s = msg.get("sender")
    if not _is_int(s) or int(s) != sender:
        raise MessageRejected(f"wrong sender: message says it is from {s!r}, it came from {sender}")
    rc = msg.get("recipient")
    if not _is_int(rc) or int(rc) != recipient:
        raise MessageRejected(f"message is addressed to {rc!r}, not {recipient}")


def message_nbytes(msg: Mapping) -> int:
    """Payload size of a message: bytes and arrays at their length, ints and floats at 8 bytes."""
    def size(v) -> int:
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, np.ndarray):
            return v.nbytes
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        if isinstance(v, str):
            return len(v.encode())
        return 8
    return sum(size(v) for v in msg.values())


def as_pairs(replies: Mapping[int, Mapping] | Iterable[tuple[int, Mapping]]) -> list[tuple[int, Mapping]]:
    """Replies as (channel node id, message) pairs; a list of pairs can carry replays, a dict cannot."""
    if isinstance(replies, Mapping):
        return list(replies.items())
    return list(replies)
