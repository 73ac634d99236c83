"""Who a SecAgg+ participant is, beyond what the server says: a long-term signing key certified by the
deployment's CA (the SuperNode's authentication key, with a certificate `fedpa.server.pki` issues).

With identities, a client signs its advertised keys and the survivor set it was shown, and checks its
neighbours' signatures: a server can then neither substitute a neighbour's keys (a man in the middle) nor show
different clients different survivor sets (Bonawitz et al. 2017, §4, the consistency check). Without them
the protocol holds against an honest-but-curious server only (docs/design/secagg.md, threat model).
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedpa.foundation.errors import FedpaError

from .messages import PROTOCOL, MessageRejected

MAX_SIGNATURE_BYTES = 160    # DER ECDSA over P-384 is at most ~104 bytes
MAX_CERTIFICATE_BYTES = 4096


class IdentityError(FedpaError):
    """A node's SecAgg+ identity files are missing or unusable."""


def advertise_message(round_id: int, nonce: bytes, node_id: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a client signs for its phase-1 keys: bound to the protocol, round, nonce and its node id."""
    return PROTOCOL + b"|advertise|" + struct.pack(">QQ", round_id, node_id) + nonce + c_pk + s_pk


def consistency_message(round_id: int, nonce: bytes, survivors: Sequence[int]) -> bytes:
    """What a client signs for the survivor set (the clients whose masked inputs the server says it has)."""
    ids = sorted(int(u) for u in survivors)
    return (PROTOCOL + b"|consistency|" + struct.pack(">QQ", round_id, len(ids)) + nonce
            + b"".join(struct.pack(">Q", u) for u in ids))


def node_name(name: str, node_id: int) -> x509.Name:
    """A node certificate's subject: a readable name and the node id it speaks for (as its serial number
    attribute), so that a certified key cannot sign for another node."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                      x509.NameAttribute(NameOID.SERIAL_NUMBER, str(int(node_id)))])


def certified_node_id(cert: x509.Certificate) -> int | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    try:
        return int(attrs[0].value) if len(attrs) == 1 else None
    except ValueError:
        return None


def _load_key(path: Path):
    data = path.read_bytes()
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            return serialization.load_ssh_private_key(data, password=None)
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"{path}: not a private key ({e})") from None


def _load_cert(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificate(data) if b"BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise IdentityError(f"{path}: not an X.509 certificate ({e})") from None


@dataclass
class Identity:
    """A node's signing key, its certificate (DER), and the CA every peer's certificate must chain to."""

    key: ec.EllipticCurvePrivateKey
    certificate: bytes
    ca: x509.Certificate

    @property
    def node_id(self) -> int | None:
        return certified_node_id(x509.load_der_x509_certificate(self.certificate))

    @classmethod
    def load(cls, key_path: str | Path, certificate_path: str | Path, ca_path: str | Path,
             node_id: int | None = None) -> Identity:
        """The identity in these files; with ``node_id``, the certificate must be for that node."""
        paths = [Path(p) for p in (key_path, certificate_path, ca_path)]
        for p in paths:
            if not p.is_file():
                raise IdentityError(f"{p}: no such file (a SecAgg+ identity needs a key, its certificate and the CA)")
        key, cert, ca = _load_key(paths[0]), _load_cert(paths[1]), _load_cert(paths[2])
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{paths[0]}: an elliptic-curve key is needed, got {type(key).__name__}")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise IdentityError(f"{paths[1]}: the certificate is not for the key in {paths[0]}")
        identity = cls(key, cert.public_bytes(serialization.Encoding.DER), ca)
        # the node's own certificate must pass the checks it applies to its peers'
        identity.peer_key(identity.certificate, identity.node_id if node_id is None else node_id)
        return identity

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message, ec.ECDSA(hashes.SHA256()))

    def peer_key(self, certificate: bytes, node_id: int | None) -> ec.EllipticCurvePublicKey:
        """The public key of node ``node_id``'s certificate, which must be issued by the CA for that node and
        valid now."""
        if not isinstance(certificate, bytes) or not 0 < len(certificate) <= MAX_CERTIFICATE_BYTES:
            raise MessageRejected("missing or oversized certificate")
        try:
            cert = x509.load_der_x509_certificate(certificate)
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise MessageRejected(f"certificate not issued by the deployment's CA ({type(e).__name__})") from None
        if node_id is None or certified_node_id(cert) != int(node_id):
            raise MessageRejected(f"certificate is for node {certified_node_id(cert)}, not node {node_id}")
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise MessageRejected("certificate outside its validity period")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise MessageRejected("certificate key is not an elliptic-curve key")
        return key


def certified_key(certificate: bytes) -> ec.EllipticCurvePublicKey:
    """The key of a certificate this client already checked (`Identity.peer_key`) and kept in its own state."""
    return x509.load_der_x509_certificate(certificate).public_key()


def verify(key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes, what: str) -> None:
    if not isinstance(signature, bytes) or not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        raise MessageRejected(f"{what}: missing or oversized signature")
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise MessageRejected(f"{what}: the signature does not verify") from None
