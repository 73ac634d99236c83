"""SecAgg+ cryptography from `cryptography`: X25519 agreement, HKDF-derived keys bound to the round, AES-CTR
mask expansion, AES-GCM share envelopes."""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .messages import (
    ENVELOPE_BYTES,
    ENVELOPE_HEADER,
    GCM_NONCE_BYTES,
    KEY_BYTES,
    PHASE_SHARE,
    PROTOCOL,
    SHARE_BYTES,
    MessageRejected,
    RandBytes,
)
from .shamir import decode_share, encode_share

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


def associated_data(round_id: int, nonce: bytes, phase: int, sender: int, recipient: int) -> bytes:
    return PROTOCOL + b"|share|" + _round(round_id) + nonce + bytes([phase]) + _id(sender) + _id(recipient)


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


# --------------------------------------------------------------------------- share envelopes


def seal_shares(key: bytes, round_id: int, nonce: bytes, sender: int, recipient: int,
                b_share: int, s_share: int, randbytes: RandBytes) -> bytes:
    header = ENVELOPE_HEADER.pack(sender, recipient)
    iv = randbytes(GCM_NONCE_BYTES)
    ad = associated_data(round_id, nonce, PHASE_SHARE, sender, recipient) + header
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
    ad = associated_data(round_id, nonce, PHASE_SHARE, sender, recipient) + envelope[:h]
    try:
        pt = AESGCM(key).decrypt(envelope[h:h + GCM_NONCE_BYTES], envelope[h + GCM_NONCE_BYTES:], ad)
    except InvalidTag:
        raise MessageRejected(f"share from client {sender} failed authentication (tampered or wrong key)") from None
    return decode_share(pt[:SHARE_BYTES]), decode_share(pt[SHARE_BYTES:])
