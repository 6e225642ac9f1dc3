"""Throwaway X.509 certificates for the TLS tests: a CA, and the certificates it issues.

:class:`TestCA` makes a self-signed CA (RSA 2048, which DCMTK's BCP 195 profiles and Orthanc
accept) in a folder and issues PEM certificate + unencrypted key pairs good for both TLS server
and client authentication (Orthanc uses one certificate for its SCP and its SCU), naming the hosts
given (DNS names and IP addresses in the Subject Alternative Name). Nothing here is secret or
kept: the files live in pytest's tmp folders.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: What a certificate names by default: this machine by name and by loopback address.
LOOPBACK = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Issued:
    """One certificate and its key, as PEM files."""

    certificate: Path
    private_key: Path
    subject: str  # RFC 4514, as the node logs it


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Hospital"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class TestCA:
    """A certification authority in ``folder`` (``<slug>-ca.crt``) that issues certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, name: str = "Test Hospital CA") -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = _name(name)
        self.key = _new_key()
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        self.certificate = self.folder / f"{_slug(name)}.crt"
        self.certificate.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, hosts: tuple[str, ...] = LOOPBACK,
              days: float = 365, expired: bool = False) -> Issued:
        """A certificate for ``common_name`` naming ``hosts``, valid for ``days`` from now (or,
        with ``expired``, one that expired yesterday)."""
        key = _new_key()
        now = datetime.now(UTC)
        start, end = ((now - timedelta(days=30), now - timedelta(days=1)) if expired
                      else (now - timedelta(minutes=5), now + timedelta(days=days)))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False))
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        slug = _slug(common_name)
        path = self.folder / f"{slug}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(path, _write_key(key, self.folder / f"{slug}.key"),
                      cert.subject.rfc4514_string())


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def write_encrypted_key(issued: Issued, path: Path, password: bytes = b"secret") -> Path:
    """The key of ``issued`` again, encrypted with ``password`` (a key the node must refuse)."""
    key = serialization.load_pem_private_key(issued.private_key.read_bytes(), password=None)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(password)))
    return path
