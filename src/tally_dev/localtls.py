"""Certificates for the local broker's TLS listener (`tally kafka start --tls`).

A throwaway certificate authority and one server certificate for 127.0.0.1, made once per
data dir with `cryptography` and kept beside the broker's config as PEM files: the broker
reads its key and chain from `broker.pem` (Kafka's PEM keystore type, no keytool), and
clients trust `ca.pem` (KAFKA_SSL_CA_FILE). For trying TLS end to end on one machine, not
for production: the CA key stays on disk unencrypted, next to the data.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TlsFiles", "client_context", "ensure_tls_files"]

VALID_FOR = dt.timedelta(days=3650)


@dataclass(frozen=True)
class TlsFiles:
    """Where a data dir keeps its CA and the broker's key and chain."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def keystore(self) -> Path:
        """The broker's private key (PKCS#8), its certificate and the CA's, in one file."""
        return self.directory / "broker.pem"

    def exist(self) -> bool:
        return self.ca.is_file() and self.keystore.is_file()


def ensure_tls_files(directory: Path, host: str) -> TlsFiles:
    """The CA and a certificate for `host` (an IP address) in `directory`, made once."""
    files = TlsFiles(directory)
    if files.exist():
        return files
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Tally local Kafka CA")
    ca = (_certificate(ca_name, ca_name, ca_key.public_key(), now)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (_certificate(_name(host), ca_name, key.public_key(), now)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.SubjectAlternativeName(
                  [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files.keystore.write_bytes(key_pem + server.public_bytes(pem) + ca.public_bytes(pem))
    files.keystore.chmod(0o600)
    files.ca.write_bytes(ca.public_bytes(pem))
    return files


def client_context(ca: Path) -> ssl.SSLContext:
    """What a client trusting only `ca` connects with (hostname checked)."""
    return ssl.create_default_context(cafile=str(ca))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
                 now: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR))
