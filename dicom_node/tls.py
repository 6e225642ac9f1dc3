"""DICOM TLS (PS3.15 Annex B, the BCP 195 profiles): SSL contexts built from the config's PEM
files, the facts about a certificate that ``doctor`` shows, and what the node logs of a TLS peer.

The TLS itself is Python's :mod:`ssl` (OpenSSL); certificates and keys are read with
``cryptography`` so that a bad file gets a message that names it and says what is wrong, before
OpenSSL is given it. Every function here raises :class:`~dicom_node.errors.ConfigError` for a
file that cannot be used; its message names the key (``certificate``, ``private_key``,
``ca_certificates``) and the path, and ``config.py`` puts the section in front of it.

The contexts:

- :func:`server_context`: the receiver's TLS listener (``[node.tls]``): the node's certificate
  chain and key; client certificates verified against ``ca_certificates``, and required when
  ``require_client_certificate`` is set.
- :func:`client_context`: associations the node opens (``[[destinations]].tls``,
  ``[worklist.tls]``): the peer verified against ``ca_certificates`` (or the system's trusted
  CAs), its host name or IP address checked unless ``verify_hostname = false``, and the node's
  own certificate presented when one is configured.

Both refuse protocol versions below ``min_version`` (TLS 1.2 by default, as BCP 195 asks) and keep
OpenSSL's default cipher list and security level.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from dicom_node.errors import ConfigError

#: ``min_version`` values of the config → the protocol version.
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# The settings the contexts are built from, as the config's sections hold them
# (config.NodeTlsSection, config.ClientTlsSection). Described here rather than imported: the
# config validates its sections by building their contexts, so it imports this module, and this
# module does not import the config back.


class ServerTlsSettings(Protocol):
    """What :func:`server_context` reads (``[node.tls]``)."""

    @property
    def certificate(self) -> Path: ...
    @property
    def private_key(self) -> Path: ...
    @property
    def ca_certificates(self) -> Path | None: ...
    @property
    def require_client_certificate(self) -> bool: ...
    @property
    def min_version(self) -> str: ...


class ClientTlsSettings(Protocol):
    """What :func:`client_context` reads (``[[destinations]].tls``, ``[worklist.tls]``)."""

    @property
    def ca_certificates(self) -> Path | None: ...
    @property
    def certificate(self) -> Path | None: ...
    @property
    def private_key(self) -> Path | None: ...
    @property
    def verify_hostname(self) -> bool: ...
    @property
    def min_version(self) -> str: ...


@dataclass(frozen=True)
class CertificateInfo:
    """What the node tells about a certificate (never its key)."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime

    def days_left(self, now: datetime | None = None) -> float:
        """Days until it expires; negative once it has."""
        return (self.not_after - (now or datetime.now(UTC))).total_seconds() / 86400


def _info(cert: x509.Certificate) -> CertificateInfo:
    return CertificateInfo(cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(),
                           cert.not_valid_before_utc, cert.not_valid_after_utc)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read: {exc.strerror}") from None


def _certificates(path: Path, key: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path, key))
    except ValueError:
        raise ConfigError(f"{key} {path}: no PEM certificate in it (expected text beginning "
                          "with -----BEGIN CERTIFICATE-----)") from None


def read_certificates(path: Path, key: str = "certificate") -> list[CertificateInfo]:
    """The certificates of a PEM file, first (the leaf of a chain) first."""
    return [_info(cert) for cert in _certificates(path, key)]


def _check_key_pair(certificate: Path, private_key: Path) -> None:
    """The key is an unencrypted PEM private key, and the certificate's first one is its own."""
    data = _read(private_key, "private_key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise ConfigError(f"private_key {private_key}: the key is encrypted; the node needs it "
                          "unencrypted (openssl pkey -in KEY -out KEY.plain), readable only by "
                          "the node's user") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"private_key {private_key}: not a PEM private key ({exc})") from None
    leaf = _certificates(certificate, "certificate")[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ConfigError(f"private_key {private_key} does not belong to certificate "
                          f"{certificate} (their public keys differ)")


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    _check_key_pair(certificate, private_key)

    def no_password() -> str:  # never prompt on a terminal (the key was checked above)
        raise ValueError("the private key is encrypted")

    try:
        context.load_cert_chain(certificate, private_key, password=no_password)
    except (ssl.SSLError, ValueError) as exc:  # e.g. a key too weak for OpenSSL's level
        raise ConfigError(f"certificate {certificate}, private_key {private_key}: OpenSSL "
                          f"refuses them: {_ssl_reason(exc)}") from None


def _load_trust(context: ssl.SSLContext, ca_certificates: Path) -> None:
    _certificates(ca_certificates, "ca_certificates")
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except ssl.SSLError as exc:
        raise ConfigError(f"ca_certificates {ca_certificates}: OpenSSL refuses it: "
                          f"{_ssl_reason(exc)}") from None


def server_context(section: ServerTlsSettings) -> ssl.SSLContext:
    """The receiver's context for ``[node.tls]``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[section.min_version]
    _load_chain(context, section.certificate, section.private_key)
    if section.ca_certificates is not None:
        _load_trust(context, section.ca_certificates)
        context.verify_mode = (ssl.CERT_REQUIRED if section.require_client_certificate
                               else ssl.CERT_OPTIONAL)
    elif section.require_client_certificate:
        raise ConfigError("require_client_certificate = true needs ca_certificates, the CA "
                          "bundle that client certificates are verified against (or set "
                          "require_client_certificate = false)")
    return context


def client_context(section: ClientTlsSettings) -> ssl.SSLContext:
    """The context of an association the node opens (a destination, the worklist)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer's certificate
    context.minimum_version = MIN_VERSIONS[section.min_version]
    context.check_hostname = section.verify_hostname
    if section.ca_certificates is not None:
        _load_trust(context, section.ca_certificates)
    else:
        context.load_default_certs()
    if section.certificate is not None and section.private_key is not None:
        _load_chain(context, section.certificate, section.private_key)
    return context


def tls_args(section: ClientTlsSettings | None, host: str
             ) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``host`` (None: plain TCP)."""
    return None if section is None else (client_context(section), host)


# --------------------------------------------------------------------------------------------
# peers


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


#: OpenSSL's reasons when the first bytes were not a TLS ClientHello.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD", "WRONG_SSL_VERSION"}


def closed_by_peer(exc: BaseException) -> bool:
    """Whether a handshake failed because the peer just closed the connection (a TCP health
    check does that), rather than because of something it sent or did not send in time."""
    return isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError)


def handshake_failure(exc: BaseException, timeout: float) -> str:
    """Why a server-side handshake failed, in words for the log."""
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake within {timeout:g} s"
    if closed_by_peer(exc):
        return "the peer closed the connection during the handshake"
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None) in _NOT_TLS:
        return f"not a TLS client ({_ssl_reason(exc)}): plain DICOM to the TLS port?"
    return _ssl_reason(exc)


def handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    """The server side of the handshake, with one deadline for all of it.

    CPython's ``do_handshake`` on a socket with a timeout gives the whole handshake one deadline
    (not one per read), so a peer that sends a byte at a time is cut off too
    (``tests/test_tls.py`` checks it). The socket is blocking again afterwards, as pynetdicom
    expects."""
    sock.settimeout(timeout)
    sock.do_handshake()
    sock.settimeout(None)


def peer_fields(sock: socket.socket | None) -> dict[str, Any]:
    """Log fields of an association's TLS session: protocol, cipher, client certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return {}
    cipher = sock.cipher()
    der = sock.getpeercert(binary_form=True)
    return {"tls_version": sock.version(), "tls_cipher": cipher[0] if cipher else None,
            "client_certificate": (x509.load_der_x509_certificate(der).subject.rfc4514_string()
                                   if der else None)}
