"""TLS contexts of the SMTP edge and the relay: protocol floor, cipher suites, certificates.

Servers (submission, submissions, inbound) use TLS 1.2 or newer (``tls.min_version``)
with ECDHE key exchange and AEAD suites (AES-GCM, ChaCha20-Poly1305) plus the two
ECDHE-RSA SHA-2 CBC suites of the MSSanté client profile. Client certificates are
requested only where they are used: always on inbound (peer operators must present one,
checked by ``gateway.smtp.inbound``), and on the listeners of ``tls.request_client_cert``
(software logging in with one: the API, or a submission port set aside for software). The
clinicians' submission ports do not ask, so a smart-card user's mail client shows no
certificate picker. Where asked, a certificate is verified against the directory's trust
anchors (``mssgw peers add``, ``mssgw certs trust-anchor add``) plus ``tls.client_ca``
(default: the development CA, ``DATA/pki/ca.pem``), and the request names those CAs
(``certificate_authorities``, RFC 8446 §4.2.4; RFC 5246 §7.4.4), so a client offers only a
certificate that can work. Python's ``ssl`` has no call for that list (OpenSSL's
``SSL_CTX_set_client_CA_list``): ``_CaNames`` reaches it through the ``_ssl`` module's own
OpenSSL and refuses to act unless the context it found answers exactly like the Python one.
RFC 8314 (implicit TLS for submission), RFC 3207 (STARTTLS), RFC 7525 (TLS BCP).

Live reload: the listeners keep one ``ReloadableServerTls.context`` for their whole life;
its SNI callback (run on every ClientHello, with or without SNI) hands the handshake to the
newest context built by ``replace``, so a new anchor or certificate applies to the next
connection and a removed anchor stops being accepted, without a restart.

Our operator key (mutual TLS towards peers): when ``tls.operator_key`` is not set, it is the
key sealed in the database (``directory.secrets``), which the running gateway hands over
through ``set_operator_key_source``; this floor never reads the database itself.  OpenSSL
loads keys from files only, so the clear key is given to it as an anonymous in-memory file
(``memfd_create``, read through ``/proc/self/fd``) that never touches a disk and is closed
as soon as the context holds the key; where that is unavailable, a 0600 file in a fresh
0700 folder removed at once.  The TLS listener's own key (``tls.key``) stays a file of each node.

Errors: ``TlsConfigError`` names the setting and the file when a certificate or key is
missing, unreadable, expired, or does not match its key.
"""

from __future__ import annotations

import _ssl
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from gateway.config import Settings
from gateway.core.errors import ConfigurationError

log = logging.getLogger("mssgw.tls")

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


#: Per operator home: the operator key sealed in the database, as PEM, or None (then
#: ``tls.operator_key``'s file); set by the running gateway (``gateway.app``), which alone reaches
#: the database.  Keyed by home: one process may run several operators (the tests do).
_operator_key_sources: dict[str, Callable[[], bytes | None]] = {}


def set_operator_key_source(home: Path, source: Callable[[], bytes | None] | None) -> None:
    """Where ``client_context`` gets the operator key of ``home`` when ``tls.operator_key`` is not set."""
    if source is None:
        _operator_key_sources.pop(str(home), None)
    else:
        _operator_key_sources[str(home)] = source


@contextlib.contextmanager
def _key_file(pem: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``pem`` from for a moment: an anonymous memory file, else a private temp file."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("mssgw-operator-key", os.MFD_CLOEXEC)
        try:
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view):]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    folder = tempfile.mkdtemp(prefix="mssgw-key-")  # 0700
    try:
        path = os.path.join(folder, "operator.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _load_chain(ctx: ssl.SSLContext, files: TlsFiles, cert_setting: str, key_setting: str,
                key_pem: bytes | None = None) -> None:  # fmt: skip
    check_certificate(files.cert, cert_setting)
    if key_pem is not None:
        try:
            with _key_file(key_pem) as path:
                ctx.load_cert_chain(files.cert, path)
        except (OSError, ssl.SSLError) as exc:  # never the key's text: the reason's class and OpenSSL's words
            raise TlsConfigError(f"{key_setting}: the key sealed in the database does not load for {files.cert} "
                                 f"({getattr(exc, 'reason', None) or exc.__class__.__name__})") from None
        return
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


def requests_client_cert(settings: Settings, listener: str) -> bool:
    """Whether ``listener`` asks clients for a certificate: inbound always, others when listed."""
    return listener == "inbound" or listener in settings.tls.request_client_cert


def server_context(settings: Settings, anchors: Sequence[bytes] = (), *,
                   request_client_cert: bool = True) -> ssl.SSLContext:  # fmt: skip
    """A listener's context: our certificate, and a client certificate asked for or not.

    Asking (``CERT_OPTIONAL``): the request names the acceptable CAs, and a certificate, when
    presented, must chain to a trust anchor (``anchors``, from the directory) or
    ``tls.client_ca``, or the handshake fails. The inbound listener then *requires* one before
    MAIL (with a reply the peer can log), rather than failing the handshake blindly.
    Not asking (``CERT_NONE``): no certificate request at all; the CA files are still loaded,
    so a broken ``tls.client_ca`` is reported the same way whichever listeners are on.
    """
    files = server_files(settings)
    ctx = _base_context(settings, ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, files, "tls.cert", "tls.key")
    _load_ca(ctx, settings, files.client_ca, anchors)
    ctx.check_hostname = False
    if request_client_cert:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        CA_NAMES.set(ctx, ctx.get_ca_certs(binary_form=True))
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _CaNames:
    """The CA names a server sends with its certificate request (OpenSSL's client CA list).

    Python's ``ssl`` module loads CAs for verification but never names them to the client, so
    clients see "no client certificate CA names" and offer any certificate they hold. OpenSSL's
    ``SSL_CTX_add_client_CA`` is called through ``ctypes`` on the very OpenSSL the ``_ssl``
    module is linked with (symbols looked up from its handle). The ``SSL_CTX`` pointer is the
    first field after the object header of CPython's ``PySSLContext``; before any write it is
    checked by reading the verify mode and options back through OpenSSL and comparing them with
    the Python object's. Anything unexpected (another layout, missing symbols): nothing is
    written, one warning is logged, and the handshake works as before, only without names.
    """

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._warned = False

    def _load(self) -> ctypes.CDLL | None:
        if not self._tried:
            self._tried = True
            try:
                lib = ctypes.CDLL(_ssl.__file__)
                vp = ctypes.c_void_p
                for name, args, res in (
                    ("SSL_CTX_get_verify_mode", [vp], ctypes.c_int),
                    ("SSL_CTX_get_options", [vp], ctypes.c_uint64),
                    ("SSL_CTX_add_client_CA", [vp, vp], ctypes.c_int),
                    ("SSL_CTX_set_client_CA_list", [vp, vp], None),
                    ("d2i_X509", [vp, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long], vp),
                    ("X509_free", [vp], None),
                ):
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = args, res
                self._lib = lib
            except (OSError, AttributeError) as exc:
                self._unavailable(f"OpenSSL functions not found ({exc.__class__.__name__})")
                self._lib = None
        return self._lib

    def _unavailable(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("tls: client certificate requests name no CA: %s", why)

    def _pointer(self, ctx: ssl.SSLContext) -> int | None:
        lib = self._load()
        if lib is None or not isinstance(ctx, _ssl._SSLContext):
            return None
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not pointer or lib.SSL_CTX_get_verify_mode(pointer) != int(ctx.verify_mode) \
                or lib.SSL_CTX_get_options(pointer) != int(ctx.options):  # fmt: skip
            self._unavailable("the SSL context's layout is not the one expected")
            return None
        return int(pointer)

    def set(self, ctx: ssl.SSLContext, ders: Sequence[bytes]) -> bool:
        """Name the CAs of ``ders`` (DER certificates, duplicates ignored) in ``ctx``'s requests."""
        pointer = self._pointer(ctx)
        if pointer is None:
            return False
        lib = self._lib
        assert lib is not None
        lib.SSL_CTX_set_client_CA_list(pointer, None)
        for der in dict.fromkeys(ders):
            buf = ctypes.c_char_p(der)
            cert = lib.d2i_X509(None, ctypes.byref(buf), len(der))
            if not cert:
                continue
            try:
                lib.SSL_CTX_add_client_CA(pointer, cert)  # copies the subject name
            finally:
                lib.X509_free(cert)
        return True


CA_NAMES = _CaNames()


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
        """New connections from now on use ``context``; sessions already in TLS keep theirs.

        The CA names of a certificate request are read from the switched context too (a new
        anchor is named from the next handshake on): ``test_client_cert_request`` checks it."""
        self.current = context
        self.generation += 1


def client_context(settings: Settings, *, with_certificate: bool = True, anchors: Sequence[bytes] = ()) -> ssl.SSLContext:
    """The relay's context towards peer operators: verify their server, present our operator certificate."""
    files = client_files(settings)
    ctx = _base_context(settings, ssl.Purpose.SERVER_AUTH)
    _load_ca(ctx, settings, files.client_ca, anchors)
    if with_certificate:
        source = _operator_key_sources.get(str(settings.home)) if not settings.tls.operator_key else None
        _load_chain(ctx, files, "tls.operator_cert", "tls.operator_key", source() if source is not None else None)
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
