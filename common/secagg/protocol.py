"""SecAgg+ primitives shared by the server half and the client half.

The protocol is Bonawitz et al. (CCS'17) secure aggregation with the sparse
neighbour graph of Bell et al. (CCS'20, "SecAgg+"): each client agrees keys,
shares secrets and exchanges pairwise masks with k = O(log n) neighbours
instead of all n - 1 other clients. It sums fixed-point vectors modulo 2^m;
fedpa sends every update as one float vector per client (weighted deltas,
group slot vectors and counts concatenated), so the server learns the sum and
nothing else (see `server/aggregation.py`).

Stages (each request and its reply carry the same stage number)::

  0 setup      server: participants, round id, 256-bit round nonce, degree k,
               fixed-point config; sends the stage-1 request to every participant
  1 advertise  client -> server: two X25519 public keys (c: share encryption, s: masks)
  2 share      server -> client: its neighbours, their keys, threshold t. The graph
               is drawn from the setup nonce over the clients that advertised, so
               a client that never advertises costs its neighbours nothing
               client -> server: t-of-k Shamir shares of its self-mask seed b and
               of its s secret key, one AES-256-GCM envelope per neighbour
  3 masked     server -> client: the envelopes addressed to it
               client -> server: y = q(x) + PRG(b) + sum_v +-PRG(s_uv)  (mod 2^m)
  4 unmask     server -> client: which of its neighbours survived / dropped
               client -> server: shares of b for survivors, of s-keys for dropped
               server: reconstructs, removes masks, outputs the exact modular sum

Messages
--------
Plain dicts. Every message has the header {round: int, nonce: bytes[32], stage: int,
sender: int, recipient: int} (SERVER_ID = -1 for the server; node ids are
0..2^64-1). Fields per stage (S: server request, C: client reply)::

  1 S dim, mod_bits, frac_bits: int; clip: float; degree: int
    C c_pk, s_pk: bytes[32]
  2 S threshold: int; neighbours: list[int]; c_pks, s_pks: list[bytes[32]]
    C recipients: list[int]; ciphertexts: list[bytes[176]]; b_commit: bytes[32]
  3 S senders: list[int]; ciphertexts: list[bytes[176]]
    C masked: np.ndarray uint8 (ceil(dim*m/8) bytes); rejected: list[int];
      rejected_reasons: list[str]
  4 S survivors, dropped: list[int]
    C b_owners: list[int]; b_shares: list[bytes[66]]; s_owners: list[int];
      s_shares: list[bytes[66]]

All but `masked` fit a Flower ConfigRecord; `masked` goes in an ArrayRecord.

Guarantees and their limits
---------------------------
*Semi-honest server* (follows the protocol, reads everything it sees), plus
up to a gamma fraction of clients colluding with it: the server learns the sum
over `included` clients and who dropped, nothing more about any honest
client's vector, except with probability <= 2^-sigma over the graph (the
bounds below). The server checks, before it asks for any share, that every
needed secret has >= t holders in the sum and that the graph on the clients in
the sum is connected (a split would reveal each part's sum); otherwise the
round fails with SecAggError and no share leaves any client. A client never
reveals both its shares for one neighbour, answers the unmask request once,
and refuses it if fewer than t of its neighbours are in the sum. Dropouts
never cost privacy: a late client is simply treated as dropped.

*Active attacks.* Not covered by a proof here, and known gaps:
  - keys are not authenticated: an active server can substitute public keys
    (man in the middle) or choose a graph of Sybil neighbours. Closing this
    needs signed keys bound to authenticated node identities (Flower
    SuperNode authentication) and the consistency-check round of Bonawitz
    et al. (clients sign the survivor set), neither implemented;
  - a server lying about who dropped can get b_u and s_u from different
    holders; the majority threshold stops this while at most one of u's
    neighbours is corrupt, not beyond;
  - a malicious client can corrupt the sum (send any vector; there is no
    input validation under the masks), get an honest neighbour excluded by
    falsely reporting its share as unreadable, or abort the round by sending
    bad unmask shares (detected: seeds are checked against commitments and
    keys against public keys, and the round fails instead of returning a
    wrong sum);
  - message-level tampering (wrong round/stage/sender, replays, bad
    ciphertexts, wrong lengths) is detected and its sender dropped; the
    transport (TLS) is assumed to bind channels to node ids.

Parameter defaults and why
--------------------------
*Graph.* A random Harary graph: the clients are put on a cycle in an order
drawn from the round nonce, and each is joined to the k/2 nearest on each side
(k even; the complete graph when k >= n - 1). Each neighbourhood is a uniformly
random k-subset, and the graph is k-connected: the honest survivors stay
connected unless the removed (dropped or corrupt) clients cover two runs of k/2
consecutive positions.

*Threshold.* t = floor(k/2) + 1, a strict majority of the neighbours. A secret
needs t shares, and an honest holder reveals at most one of b_u / s_u, so even a
server that lies about who dropped cannot collect t shares of both from honest
holders alone; the round tolerates up to k - t = ceil(k/2) - 1 neighbours of
each client dropping.

*Degree.* Following Bell et al.'s analysis (per-client neighbourhood bounds
and connectivity, union-bounded over the n clients), `choose_degree` returns
the smallest even k such that, with clients independently dropping with
probability delta (default 0.10) and a fraction gamma (default 0.05) of the
clients colluding with the server:

  privacy      n * P[Bin(k, gamma) >= t]       <= 2^-sigma  (sigma = 40):
               no honest client has t corrupt neighbours (who could rebuild both
               of its secrets);
  connectivity n^2 * (gamma + delta)^k          <= 2^-sigma:
               the honest survivors stay connected, so the server learns only
               the total, not sums of sub-groups;
  correctness  n * P[Bin(k, delta) > k - t]    <= 2^-eta    (eta = 20):
               every needed secret keeps t surviving holders (a failed round is
               only a retry: no privacy is lost, hence the weaker target).

Binomial tails stand in for the hypergeometric ones of a graph without
replacement (which are more concentrated). This gives k = n - 1 (classic
SecAgg, the complete graph) up to n = 33, then k = 32..34 for n = 34..200, 36 at
500, 38 at 10^3, 42 at 10^4, 46 at 10^5, 52 at 10^6: per-client cost O(k) =
O(log n + sigma), as Bell et al. state.

*Fixed point.* Each coordinate is clipped to [-c, c] (default c = 8: the
adapter deltas are DP/norm-clipped well inside it; for an L2 clip norm C any
coordinate is within C, see `QuantConfig.from_clip_norm`) and rounded to
q = rint(x * 2^f) (default f = 24: absolute error <= 2^-25 ~ 3e-8 per client
and coordinate, the float32 resolution at |x| ~ 0.5). With Q = rint(c * 2^f) the
sum of n clients lies in [-nQ, nQ], so m = bitlen(nQ) + 1 bits never wrap
(two's complement mod 2^m): m = 35 for n = 100, 45 for n = 10^5; m <= 62 allows
n up to ~2^34 at the defaults. Guarantee, per coordinate:

  |dequantize_sum(sum_i quantize(x_i)) - sum_i clip(x_i, -c, c)| <= n * 2^-(f+1)

(plus float64 rounding, relative 2^-53). Counts that ride in the vector are
exact when they are multiples of 2^-f (e.g. integers) and at most c.
Communication: the masked vector travels bit-packed, m bits per coordinate
(float32 sends 32).

Cryptography: all from `cryptography` (OpenSSL). X25519 agreements; HKDF-SHA256
with the round nonce as salt and (protocol, purpose, round id, ids) as info;
AES-256-GCM for shares (associated data: round id, nonce, stage, sender,
recipient); masks expanded by AES-256-CTR keystreams from 256-bit keys; Shamir
sharing over GF(2^521 - 1); secret coefficients by rejection sampling.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpa.foundation.errors import FedpaError

log = logging.getLogger("fedpa.secagg")

RandBytes = Callable[[int], bytes]

PROTOCOL = b"fedpa-secagg+/v1"
SERVER_ID = -1
STAGE_SETUP, STAGE_ADVERTISE, STAGE_SHARE, STAGE_MASKED, STAGE_UNMASK = 0, 1, 2, 3, 4
STAGE_NAMES = {0: "setup", 1: "advertise-keys", 2: "share-keys", 3: "masked-input", 4: "unmask"}

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

    stage: int
    client: int | None
    reason: str

    def __str__(self) -> str:
        who = "unknown sender" if self.client is None else f"client {self.client}"
        return f"stage {self.stage} ({STAGE_NAMES.get(self.stage, '?')}), {who}: {self.reason}"


# --------------------------------------------------------------------------- parameters


def _binom_tail(k: int, p: float, a: int) -> float:
    """P[Bin(k, p) >= a]."""
    if a <= 0:
        return 1.0
    return float(sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(a, k + 1)))


def default_threshold(degree: int) -> int:
    return degree // 2 + 1


@lru_cache(maxsize=256)
def choose_degree(n: int, dropout: float = 0.10, corrupt: float = 0.05, sigma: int = 40, eta: int = 20) -> int:
    """Smallest even k meeting the privacy, connectivity and correctness bounds of the module docstring
    (n - 1, the complete graph, when none below n - 1 does)."""
    if n < 2:
        raise SecAggError(f"secure aggregation needs at least 2 clients, got {n}")
    if not (0 <= dropout < 1 and 0 <= corrupt < 0.5):
        raise SecAggError(f"need 0 <= dropout < 1 and 0 <= corrupt < 0.5, got {dropout}, {corrupt}")
    for k in range(2, n - 1, 2):
        t = default_threshold(k)
        if (n * _binom_tail(k, corrupt, t) <= 2.0**-sigma
                and n * n * (corrupt + dropout) ** k <= 2.0**-sigma
                and n * _binom_tail(k, dropout, k - t + 1) <= 2.0**-eta):
            return k
    return n - 1


@dataclass(frozen=True)
class SecAggParams:
    """Graph and threshold settings. None: derived (choose_degree / strict majority)."""

    degree: int | None = None
    threshold: int | None = None
    dropout: float = 0.10        # expected per-client dropout during a round (sizing only)
    corrupt: float = 0.05        # fraction of clients assumed to collude with the server (sizing only)
    sigma: int = 40              # statistical security, bits
    eta: int = 20                # round-failure target under `dropout`, bits
    min_clients: int = 3         # fewest clients a sum may cover

    def degree_for(self, n: int) -> int:
        k = self.degree if self.degree is not None else choose_degree(n, self.dropout, self.corrupt, self.sigma, self.eta)
        if k < 1:
            raise SecAggError(f"degree must be >= 1, got {k}")
        return min(k, n - 1)


def effective_graph_params(params: SecAggParams, nominal_degree: int, n_advertised: int) -> tuple[int, int]:
    """(k, t) for the graph over the clients that advertised keys: k even unless complete."""
    k = min(nominal_degree, n_advertised - 1)
    if k < n_advertised - 1 and k % 2:
        k += 1
    k = min(k, n_advertised - 1)
    t = params.threshold if params.threshold is not None else default_threshold(k)
    if not 1 <= t <= k:
        raise SecAggError(f"threshold t={t} must be within 1..k={k} (k neighbours among {n_advertised} clients)")
    return k, t


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
            raise SecAggError(f"mod_bits={self.mod_bits} cannot hold one value of clip {self.clip} at 2^{self.frac_bits}")

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


def quantize(x: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """Clip to [-c, c], round to multiples of 2^-f, return two's complement values mod 2^m as uint64."""
    if cfg.mod_bits is None:
        raise SecAggError("mod_bits is not set; use QuantConfig.for_clients(n)")
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise SecAggError("vector to aggregate contains NaN or inf")
    q = np.rint(np.clip(x, -cfg.clip, cfg.clip) * 2.0**cfg.frac_bits).astype(np.int64)
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
    bits = np.unpackbits(np.asarray(buf, dtype=np.uint8), bitorder="little", count=dim * mod_bits).reshape(dim, mod_bits)
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


# --------------------------------------------------------------------------- symmetric primitives


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(ikm)


def _id(i: int) -> bytes:
    return int(i).to_bytes(9, "big", signed=True)


def _round(r: int) -> bytes:
    return int(r).to_bytes(8, "big")


def prg_u64(key: bytes, dim: int) -> np.ndarray:
    """dim uniform uint64 values: the AES-256-CTR keystream of `key` (counter from 0)."""
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * dim)), dtype="<u8")


def share_key(shared: bytes, nonce: bytes, round_id: int, sender: int, recipient: int) -> bytes:
    """Directional AES-GCM key for the shares `sender` sends `recipient`, from X25519(c_sender, c_recipient)."""
    return _hkdf(shared, nonce, PROTOCOL + b"|share-key|" + _round(round_id) + _id(sender) + _id(recipient))


def pair_mask_key(shared: bytes, nonce: bytes, round_id: int, a: int, b: int) -> bytes:
    """Key of the pairwise mask between a and b, from X25519(s_a, s_b)."""
    lo, hi = sorted((a, b))
    return _hkdf(shared, nonce, PROTOCOL + b"|pair-mask|" + _round(round_id) + _id(lo) + _id(hi))


def self_mask_key(seed: bytes, nonce: bytes, round_id: int, owner: int) -> bytes:
    return _hkdf(seed, nonce, PROTOCOL + b"|self-mask|" + _round(round_id) + _id(owner))


def seed_commitment(seed: bytes, nonce: bytes, round_id: int, owner: int) -> bytes:
    """SHA-256 commitment to a 256-bit self-mask seed (hiding: the seed is uniform), checked after reconstruction."""
    return hashlib.sha256(PROTOCOL + b"|seed-commit|" + nonce + _round(round_id) + _id(owner) + seed).digest()


def graph_seed(nonce: bytes, round_id: int) -> bytes:
    return _hkdf(nonce, b"", PROTOCOL + b"|graph|" + _round(round_id))


def associated_data(round_id: int, nonce: bytes, stage: int, sender: int, recipient: int) -> bytes:
    return PROTOCOL + b"|share|" + _round(round_id) + nonce + bytes([stage]) + _id(sender) + _id(recipient)


def mask_sign(owner: int, other: int) -> int:
    """+1: `owner` adds the pairwise mask with `other`; -1: subtracts it (the smaller id adds)."""
    return 1 if owner < other else -1


# --------------------------------------------------------------------------- X25519


def generate_keypair(randbytes: RandBytes) -> tuple[X25519PrivateKey, bytes]:
    sk = X25519PrivateKey.from_private_bytes(randbytes(KEY_BYTES))
    return sk, sk.public_key().public_bytes_raw()


def agree(sk: X25519PrivateKey, pk: bytes) -> bytes:
    """X25519(sk, pk); MessageRejected for a malformed or low-order public key."""
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError as e:
        raise MessageRejected(f"invalid X25519 public key ({e})") from None


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


# --------------------------------------------------------------------------- share envelopes


def seal_shares(key: bytes, round_id: int, nonce: bytes, sender: int, recipient: int,
                b_share: int, s_share: int, randbytes: RandBytes) -> bytes:
    header = ENVELOPE_HEADER.pack(sender, recipient)
    iv = randbytes(GCM_NONCE_BYTES)
    ad = associated_data(round_id, nonce, STAGE_SHARE, sender, recipient) + header
    ct = AESGCM(key).encrypt(iv, encode_share(b_share) + encode_share(s_share), ad)
    return header + iv + ct


def envelope_parties(envelope: bytes) -> tuple[int, int]:
    """(sender, recipient) from an envelope's clear header (authenticated as associated data)."""
    if not isinstance(envelope, bytes) or len(envelope) != ENVELOPE_BYTES:
        got = len(envelope) if isinstance(envelope, bytes) else type(envelope).__name__
        raise MessageRejected(f"share envelope has length {got}, expected {ENVELOPE_BYTES}")
    return ENVELOPE_HEADER.unpack_from(envelope)


def open_shares(key: bytes, round_id: int, nonce: bytes, envelope: bytes,
                sender: int, recipient: int) -> tuple[int, int]:
    """(b share, s share) of `sender` held by `recipient`; MessageRejected with the reason otherwise."""
    env_sender, env_recipient = envelope_parties(envelope)
    if env_recipient != recipient:
        raise MessageRejected(f"share from client {sender} is addressed to client {env_recipient}, not {recipient}")
    if env_sender != sender:
        raise MessageRejected(f"share forwarded as from client {sender} says it is from client {env_sender}")
    h = ENVELOPE_HEADER.size
    ad = associated_data(round_id, nonce, STAGE_SHARE, sender, recipient) + envelope[:h]
    try:
        pt = AESGCM(key).decrypt(envelope[h:h + GCM_NONCE_BYTES], envelope[h + GCM_NONCE_BYTES:], ad)
    except InvalidTag:
        raise MessageRejected(f"share from client {sender} failed authentication (tampered or wrong key)") from None
    return decode_share(pt[:SHARE_BYTES]), decode_share(pt[SHARE_BYTES:])


# --------------------------------------------------------------------------- neighbour graph


def neighbour_graph(ids: Sequence[int], degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Random Harary graph: ids on a cycle in a seed-drawn order, each joined to the degree/2 nearest on
    each side (degree even), or the complete graph when degree >= len(ids) - 1."""
    ids = sorted(ids)
    n = len(ids)
    if degree >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    if degree % 2:
        raise ValueError("a sparse Harary graph needs an even degree")
    order = np.asarray(ids, dtype=object)[np.argsort(prg_u64(seed, n), kind="stable")]
    half = degree // 2
    offsets = np.concatenate([np.arange(1, half + 1), -np.arange(1, half + 1)])
    pos = (np.arange(n)[:, None] + offsets[None, :]) % n
    return {int(order[i]): tuple(sorted(int(order[j]) for j in pos[i])) for i in range(n)}


# --------------------------------------------------------------------------- messages


def header(round_id: int, nonce: bytes, stage: int, sender: int, recipient: int) -> dict:
    return {"round": round_id, "nonce": nonce, "stage": stage, "sender": sender, "recipient": recipient}


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


def check_header(msg, *, round_id: int, nonce: bytes, stage: int, sender: int, recipient: int) -> None:
    """Raise MessageRejected unless msg is a dict for this round, stage, sender and recipient."""
    if not isinstance(msg, Mapping):
        raise MessageRejected(f"message is a {type(msg).__name__}, not a dict")
    r, nn = msg.get("round"), msg.get("nonce")
    same_nonce = isinstance(nn, bytes) and nn == nonce
    if not _is_int(r) or int(r) != round_id or not same_nonce:
        raise MessageRejected(f"wrong round: message is for round {r!r}"
                              + ("" if same_nonce else " with another nonce") + f", this is round {round_id}")
    st = msg.get("stage")
    if not _is_int(st) or int(st) != stage:
        raise MessageRejected(f"wrong stage: message is for stage {st!r}, expected {stage} ({STAGE_NAMES[stage]})")
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
