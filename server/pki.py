"""Key material for a deployment, made with the `cryptography` package.

* a CA (EC P-256, self-signed), the root that SuperNodes and the `flwr` CLI trust;
* the SuperLink's TLS certificate, signed by the CA, valid for the addresses it serves
  (SAN ``IP:127.0.0.1`` and ``DNS:localhost`` by default: Flower's own SuperExec connects to the
  SuperLink's address and checks it);
* one SuperNode authentication key pair per node: EC P-384 in OpenSSH format, which is what
  ``flwr supernode register`` and ``flower-supernode --auth-supernode-private-key`` read.

Private keys are written with mode 0600 and never overwritten: an existing directory keeps its
CA, so nodes enrolled earlier stay valid.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpa.foundation.errors import FedpaError


@dataclass(frozen=True)
class ServerFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    private: Path
    public: Path


def _write_private(path: Path, key, fmt) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never replaces a key
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_server_files(directory: str | Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30) -> ServerFiles:
    """CA + SuperLink certificate in ``directory`` (created; the CA is reused when it exists)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = ServerFiles(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")
    now = dt.datetime.now(dt.UTC)
    if files.ca_cert.exists() and files.ca_key.exists():
        try:
            ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
            ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        except ValueError as e:
            raise FedpaError(f"{d}: unreadable CA files ({e}); move them away to start a new CA") from None
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (x509.CertificateBuilder().subject_name(_name("fedpa deployment CA"))
                   .issuer_name(_name("fedpa deployment CA"))
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
        for p in (files.ca_key, files.ca_cert):
            p.unlink(missing_ok=True)
        _write_private(files.ca_key, ca_key, serialization.PrivateFormat.PKCS8)
        files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    for p in (files.key, files.cert):
        p.unlink(missing_ok=True)  # the server certificate is re-issued on every start
    _write_private(files.key, key, serialization.PrivateFormat.PKCS8)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_node_key(directory: str | Path, name: str) -> NodeKey:
    """An EC P-384 key pair for SuperNode authentication (OpenSSH format); kept if it exists."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    nk = NodeKey(d / f"{name}.key", d / f"{name}.key.pub")
    if nk.private.exists() and nk.public.exists():
        return nk
    key = ec.generate_private_key(ec.SECP384R1())
    nk.private.unlink(missing_ok=True)
    _write_private(nk.private, key, serialization.PrivateFormat.OpenSSH)
    nk.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + b"\n")
    return nk


def issue_node_certificate(ca: ServerFiles, node: NodeKey, name: str, node_id: int, *, days: int = 30) -> Path:
    """A certificate, signed by the deployment's CA, for a node's authentication key and its node id (the
    one the SuperLink assigned when the key was registered): its SecAgg+ identity
    (`fedpa.common.secagg.identity`). Peers check their neighbours' signed keys and survivor sets against
    it, so the CA, not the server, decides who takes part (whoever holds the CA key can add participants),
    and one certified key speaks for one node id only. Re-issued on every call; the key is never touched."""
    from fedpa.common.secagg.identity import node_name
    try:
        ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
        key = serialization.load_ssh_private_key(node.private.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise FedpaError(f"cannot issue a certificate for {node.private}: {e}") from None
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(node_name(name, node_id)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    path = node.private.with_name(f"{name}.crt")
    tmp = path.with_suffix(".crt.tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)
    return path
