"""TLS contexts of the SMTP edge and the relay: protocol floor, cipher suites, certificates.

Servers (submission, submissions, inbound) use TLS 1.2 or newer (``tls.min_version``)
with ECDHE key exchange and AEAD suites (AES-GCM, ChaCha20-Poly1305) plus the two
ECDHE-RSA SHA-2 CBC suites of the MSSanté client profile. Client certificates are
requested on every listener and verified against the directory's trust anchors
(``mssgw peers add``, ``mssgw certs trust-anchor add``) plus ``tls.client_ca`` (default:
the development CA, ``DATA/pki/ca.pem``): software may log in with one on submission,
and peer operators must present one on inbound (checked by ``gateway.smtp.inbound``).
RFC 8314 (implicit TLS for submission), RFC 3207 (STARTTLS), RFC 7525 (TLS BCP).

Live reload: the listeners keep one ``ReloadableServerTls.context`` for their whole life;
its SNI callback (run on every ClientHello, with or without SNI) hands the handshake to the
newest context built by ``replace``, so a new anchor or certificate applies to the next
connection and a removed anchor stops being accepted, without a restart.

Errors: ``TlsConfigError`` names the setting and the file when a certificate or key is
missing, unreadable, expired, or does not match its key.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from gateway.config import Settings
from gateway.core.errors import ConfigurationError

#: ECDHE only (forward secrecy), AEAD first; TLS 1.3 suites are OpenSSL's defaults (all AEAD).
CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES256-SHA384",  # MSSanté client profile
        "ECDHE-RSA-AES128-SHA256",  # MSSanté client profile
    )
)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(ConfigurationError):
    """A certificate, key or CA file is missing, unreadable, expired or inconsistent."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path


def server_files(settings: Settings) -> TlsFiles:
    pki = settings.pki_dir
    return TlsFiles(
        cert=settings.path("tls", "cert", pki / "server.pem"),
        key=settings.path("tls", "key", pki / "server.key"),
        client_ca=settings.path("tls", "client_ca", pki / "ca.pem"),
    )


def client_files(settings: Settings) -> TlsFiles:
    """Our certificate towards peer operators (mutual TLS), and the CAs we verify them with."""
    pki = settings.pki_dir
    return TlsFiles(
        cert=settings.path("tls", "operator_cert", pki / "operator.pem"),
        key=settings.path("tls", "operator_key", pki / "operator.key"),
        client_ca=settings.path("tls", "client_ca", pki / "ca.pem"),
    )


def check_certificate(path: Path, setting: str, *, now: datetime | None = None) -> x509.Certificate:
    """Load the first certificate of ``path``; refuse a missing, unreadable, expired or future one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{setting}: cannot read certificate {path} ({exc.strerror or exc})") from None
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        raise TlsConfigError(f"{setting}: {path} is not a PEM certificate") from None
    now = now or datetime.now(UTC)
    if now > cert.not_valid_after_utc:
        raise TlsConfigError(f"{setting}: certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if now < cert.not_valid_before_utc:
        raise TlsConfigError(f"{setting}: certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    return cert


def _base_context(settings: Settings, purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = _VERSIONS[settings.tls.min_version]
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _load_chain(ctx: ssl.SSLContext, files: TlsFiles, cert_setting: str, key_setting: str) -> None:
    check_certificate(files.cert, cert_setting)
    if not files.key.is_file():
        raise TlsConfigError(f"{key_setting}: private key {files.key} is missing")
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"{key_setting}: cannot load {files.key} for {files.cert} ({exc})") from None


def _load_ca(ctx: ssl.SSLContext, settings: Settings, path: Path, anchors: Sequence[bytes] = ()) -> None:
    """``tls.client_ca`` (when set, it must load; the default file may be absent) plus ``anchors``."""
    explicit = bool(settings.tls.client_ca)
    if explicit or path.is_file() or not anchors:
        try:
            ctx.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"tls.client_ca: cannot load CA file {path} ({exc})") from None
    for pem in anchors:
        try:
            ctx.load_verify_locations(cadata=pem.decode("ascii"))
        except (ssl.SSLError, ValueError, UnicodeDecodeError):
            continue  # an anchor the directory holds but OpenSSL refuses: the others still apply


def server_context(settings: Settings, anchors: Sequence[bytes] = ()) -> ssl.SSLContext:
    """The listeners' context: our certificate; client certificates requested and verified if sent.

    ``CERT_OPTIONAL`` on every listener: a client certificate, when presented, must chain
    to a trust anchor (``anchors``, from the directory) or ``tls.client_ca``, or the handshake
    fails. The inbound listener then *requires* one before MAIL (with a reply the peer can
    log), rather than failing the handshake blindly.
    """
    files = server_files(settings)
    ctx = _base_context(settings, ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, files, "tls.cert", "tls.key")
    _load_ca(ctx, settings, files.client_ca, anchors)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.check_hostname = False
    return ctx


class ReloadableServerTls:
    """One context for the listeners' lifetime, whose handshakes use the newest ``replace``d context.

    Why not hand the listeners a new context: aiosmtpd and ``loop.create_server`` keep the
    object they were given. The SNI callback is the one OpenSSL hook that runs on every
    ClientHello before the certificate is chosen and the client's is verified, and switching
    ``SSLObject.context`` there makes both use the new context's certificate and CA store.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.current = context
        self.context = context
        self.generation = 0
        context.sni_callback = self._switch

    def _switch(self, ssl_object: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not self.context:
            ssl_object.context = current

    def replace(self, context: ssl.SSLContext) -> None:
        """New connections from now on use ``context``; sessions already in TLS keep theirs."""
        self.current = context
        self.generation += 1


def client_context(settings: Settings, *, with_certificate: bool = True, anchors: Sequence[bytes] = ()) -> ssl.SSLContext:
    """The relay's context towards peer operators: verify their server, present our operator certificate."""
    files = client_files(settings)
    ctx = _base_context(settings, ssl.Purpose.SERVER_AUTH)
    _load_ca(ctx, settings, files.client_ca, anchors)
    if with_certificate:
        _load_chain(ctx, files, "tls.operator_cert", "tls.operator_key")
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    """The DER bytes of the client's verified certificate, or None when it sent none."""
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True)


@functools.lru_cache(maxsize=256)
def certificate_names(der: bytes) -> tuple[tuple[str, ...], str]:
    """The certificate's SAN dNSNames (lower case) and its subject (RFC 4514).

    Cached by certificate: a peer presents the same one on every message.
    """
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return names, cert.subject.rfc4514_string()


def tls_summary(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` for Received headers and logs (no secrets)."""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()
