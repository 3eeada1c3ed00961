"""Directory-backed key lookup: which certificate and key sign, encrypt and decrypt for an address.

The job: turn the directory's ``Certificate`` rows and their sealed private keys into the
references the crypto code needs, and nothing else.

- Signing (RFC 8550 §3, RFC 8551 §2.5): the sender's own ``sign``/``smime`` certificate with
  a private key; else, when ``crypto.sign_with_organisation`` is set, the operator
  (organisation) certificate registered for the sender's domain, as in the Direct Project's
  domain-bound certificates.
- Encryption (RFC 8551 §2.7): the recipient's own ``encrypt``/``smime`` certificates; else the
  domain-bound certificate of its domain.
- Decryption for a local recipient: its own keys, then the keys of its domain (operator).
- Trust: anchors are ``anchor`` rows plus ``tls.client_ca``; CRLs are ``DATA/pki/crl.pem`` and
  any ``*.pem``/``*.crl`` under ``DATA/pki/crls/`` (RFC 5280 §5).

Keys never leave this process boundary as objects: lookups return ``KeyRef`` (certificate PEM
plus the key's place: the *sealed* row, still encrypted, or a key file of a home made before
the keys moved into the database), which pickles to worker processes; ``load_keypair`` opens it
there with the key-encryption key that process loads itself (``directory.secrets.load_kek``:
``MSSGW_KEK``, else the file named in the ref), so neither the KEK nor a clear key is ever
pickled.  Key material is never logged or put in an exception message.

Errors: ``KeyStoreError`` with a sentence naming the address (never the key) when no usable
certificate or key exists; the pipeline maps it to a bounce or a deferral.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from directory.models import Certificate
from directory.secrets import (
    KekError,
    SealedSecretError,
    kek_path,
    load_kek,
    open_sealed,
    sealed_name,
    sealed_row,
)
from gateway.config import Settings
from gateway.core.errors import CryptoError
from gateway.core.keys import private_key_from_der, private_key_from_pem
from gateway.crypto.cms_keys import PrivateKey
from gateway.crypto.keyring import KeyringSync
from gateway.crypto.openpgp import keep_in_step
from gateway.crypto.trust import TrustStore

__all__ = ["KeyRef", "KeyStore", "KeyStoreError", "TrustRef", "load_keypair", "load_trust"]

SIGN_PURPOSES = ("sign", "smime")
ENCRYPT_PURPOSES = ("encrypt", "smime")
CACHE_SECONDS = 30.0


class KeyStoreError(CryptoError):
    """No usable certificate or key for an address; the message names the address, never a key."""


@dataclass(frozen=True)
class KeyRef:
    """A certificate (PEM) and where its private key is: picklable, opened where used.

    ``key_path`` is ``sealed:key:<fingerprint>`` with ``sealed`` = (KEK id, nonce, ciphertext) of
    that row, opened with the KEK of ``kek_file`` (or ``MSSGW_KEK``); or the path of a key file."""

    cert_pem: bytes
    key_path: str
    address: str = ""
    sealed: tuple[str, bytes, bytes] | None = None
    kek_file: str = ""

    @property
    def cert(self) -> x509.Certificate:
        return _load_cert(self.cert_pem)


@dataclass(frozen=True)
class TrustRef:
    """Anchors and CRLs as PEM: picklable, turned into a ``TrustStore`` (cached) where used."""

    anchors: tuple[bytes, ...]
    crls: tuple[bytes, ...] = ()
    #: (anchor PEM, mail domain) for those of ``anchors`` that vouch for S/MIME signatures of some
    #: domains only (``peers add``, ``certs trust-anchor add --domain``); mutual TLS uses them all.
    scopes: tuple[tuple[bytes, str], ...] = ()


@functools.lru_cache(maxsize=512)
def _load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


@functools.lru_cache(maxsize=256)
def _load_key(path: str, _mtime: float) -> PrivateKey:
    """A mailbox's or operator's S/MIME private key: RSA, or EC for ECDSA signatures and ECDH key
    agreement (RFC 5753).  Other key types are refused here, as ``certs import`` refuses them."""
    try:
        key = private_key_from_pem(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        # The message deliberately omits the exception text: it could quote key material.
        raise KeyStoreError(f"cannot read private key {path}: {exc.__class__.__name__}") from None
    return _checked(key, path)


def _checked(key: object, where: str) -> PrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyStoreError(f"private key {where} is neither an RSA nor an EC key")
    return key


@functools.lru_cache(maxsize=256)
def _open_key(name: str, sealed: tuple[str, bytes, bytes], kek_file: str) -> PrivateKey:
    """A sealed private key, opened with this process's KEK (errors are not cached: a fixed KEK works)."""
    try:
        der = open_sealed(load_kek(path=kek_file or None), name, *sealed)
        key = private_key_from_der(der)
    except (KekError, SealedSecretError) as exc:
        raise KeyStoreError(str(exc)) from None
    except (ValueError, TypeError) as exc:  # the text could quote key material: class only
        raise KeyStoreError(f"cannot read private key {name}: {exc.__class__.__name__}") from None
    return _checked(key, name)


def load_keypair(ref: KeyRef) -> tuple[x509.Certificate, PrivateKey]:
    """The certificate and private key of ``ref`` (cached per process; a key file is reloaded when it changes)."""
    name = sealed_name(ref.key_path)
    if name is not None:
        if ref.sealed is None:
            raise KeyStoreError(f"private key of {ref.address or 'a certificate'} is not in the database")
        return _load_cert(ref.cert_pem), _open_key(name, ref.sealed, ref.kek_file)
    try:
        mtime = Path(ref.key_path).stat().st_mtime
    except OSError:
        raise KeyStoreError(f"private key of {ref.address or 'a certificate'} is missing") from None
    return _load_cert(ref.cert_pem), _load_key(ref.key_path, mtime)


@functools.lru_cache(maxsize=16)
def load_trust(ref: TrustRef) -> TrustStore:
    """The ``TrustStore`` for ``ref`` (cached per process)."""
    anchors: list[x509.Certificate] = []
    for pem in ref.anchors:
        anchors.extend(x509.load_pem_x509_certificates(pem))
    crls = []
    for pem in ref.crls:
        try:
            crls.append(x509.load_pem_x509_crl(pem) if b"-----BEGIN" in pem else x509.load_der_x509_crl(pem))
        except ValueError:
            continue  # an unreadable CRL counts as absent: revocation status "unavailable"
    scopes: dict[x509.Certificate, set[str]] = {}
    for pem, domain in ref.scopes:
        for cert in x509.load_pem_x509_certificates(pem):
            scopes.setdefault(cert, set()).add(domain)
    return TrustStore(anchors, crls, scopes=scopes)


def _usable(row: Certificate, now: _dt.datetime) -> bool:
    nb = row.not_before if row.not_before.tzinfo else row.not_before.replace(tzinfo=_dt.UTC)
    na = row.not_after if row.not_after.tzinfo else row.not_after.replace(tzinfo=_dt.UTC)
    return row.revoked_at is None and nb <= now <= na


class KeyStore:
    """Key and certificate lookups for one operator, cached for ``CACHE_SECONDS``."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self._factory = factory
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, object]] = {}
        # This process's OpenPGP keyring follows the directory's keys (imported or revoked on any node).
        keep_in_step(settings.gnupg_dir, KeyringSync(factory, settings))

    # --- cache -------------------------------------------------------------------------

    def _cached(self, kind: str, key: str, compute):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((kind, key))
            if hit is not None and now - hit[0] < CACHE_SECONDS:
                return hit[1]
        value = compute()
        with self._lock:
            self._cache[(kind, key)] = (now, value)
        return value

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()

    def _rows(self, owners: Sequence[str], purposes: Sequence[str], *, with_key: bool) -> list[Certificate]:
        now = _dt.datetime.now(_dt.UTC)
        with self._factory() as session:
            stmt = select(Certificate).where(
                Certificate.address.in_(list(owners)), Certificate.purpose.in_(list(purposes))
            )
            if with_key:
                stmt = stmt.where(Certificate.key_path.is_not(None))
            rows = [
                r for r in session.scalars(stmt.order_by(Certificate.not_after.desc())) if _usable(r, now)
            ]
        rank = {o: i for i, o in enumerate(owners)}
        return sorted(rows, key=lambda r: rank.get(r.address or "", len(owners)))

    def _keyref(self, row: Certificate) -> KeyRef | None:
        """The ``KeyRef`` of a row with a private key, or None when the key is not there (yet)."""
        if not row.key_path:
            return None
        name = sealed_name(row.key_path)
        if name is None:
            if not Path(row.key_path).is_file():
                return None
            return KeyRef(row.pem.encode("ascii"), row.key_path, row.address or "")
        with self._factory() as session:
            sealed = sealed_row(session, name)
        if sealed is None:
            return None
        return KeyRef(row.pem.encode("ascii"), row.key_path, row.address or "", sealed,
                      str(kek_path(self.settings)))  # fmt: skip

    # --- lookups -----------------------------------------------------------------------

    def signer_for(self, address: str) -> KeyRef:
        """The certificate and key that sign mail from ``address`` (its own, else its organisation's)."""
        addr = address.lower()
        domain = addr.rpartition("@")[2] if addr else self.settings.domains[0]

        def compute() -> KeyRef:
            own = self._rows([addr], SIGN_PURPOSES, with_key=True) if addr else []
            rows = own
            if not rows and self.settings.crypto.sign_with_organisation:
                rows = self._rows([domain], SIGN_PURPOSES, with_key=True)
            for row in rows:
                ref = self._keyref(row)
                if ref is not None:
                    return KeyRef(ref.cert_pem, ref.key_path, addr or domain, ref.sealed, ref.kek_file)
            raise KeyStoreError(f"no signing certificate with a private key for {addr or domain}")

        return self._cached("sign", addr or domain, compute)  # type: ignore[no-any-return]

    def organisation_signer(self) -> KeyRef:
        """The operator certificate of our first domain (receipts from postmaster)."""
        return self.signer_for(f"postmaster@{self.settings.domains[0]}")

    def recipient_certs(self, address: str) -> list[bytes]:
        """PEM certificates to encrypt for ``address``: its own, else its domain's (domain-bound)."""
        addr = address.lower()
        domain = addr.rpartition("@")[2]

        def compute() -> list[bytes]:
            own = self._rows([addr], ENCRYPT_PURPOSES, with_key=False)
            rows = own or self._rows([domain], ENCRYPT_PURPOSES, with_key=False)
            return list(dict.fromkeys(r.pem.encode("ascii") for r in rows))

        certs: list[bytes] = self._cached("encrypt", addr, compute)
        if not certs:
            raise KeyStoreError(f"no encryption certificate for {addr} or its domain {domain}")
        return certs

    def decryption_keys(self, address: str) -> list[KeyRef]:
        """Our keys that may open mail for the local ``address``: its own, then its domain's."""
        addr = address.lower()
        domain = addr.rpartition("@")[2]

        def compute() -> list[KeyRef]:
            rows = self._rows([addr, domain], ("encrypt", "smime", "sign"), with_key=True)
            out: dict[str, KeyRef] = {}
            for r in rows:
                if r.fingerprint not in out and (ref := self._keyref(r)) is not None:
                    out[r.fingerprint] = ref
            return list(out.values())

        return self._cached("decrypt", addr, compute)  # type: ignore[no-any-return]

    def known_fingerprints(self, owner: str) -> set[str]:
        """SHA-256 fingerprints of every certificate registered for ``owner`` (address or domain)."""

        def compute() -> set[str]:
            with self._factory() as session:
                return set(
                    session.scalars(
                        select(Certificate.fingerprint).where(
                            Certificate.address == owner.lower(), Certificate.revoked_at.is_(None)
                        )
                    )
                )

        return self._cached("fp", owner.lower(), compute)  # type: ignore[no-any-return]

    def trust(self) -> TrustRef:
        """Anchors (directory ``anchor`` rows + ``tls.client_ca``) and CRLs (pki/crl.pem, pki/crls/)."""

        def compute() -> TrustRef:
            with self._factory() as session:
                rows = [r for r in session.scalars(select(Certificate).where(Certificate.purpose == "anchor"))
                        if r.revoked_at is None]  # fmt: skip
            anchors = [r.pem.encode("ascii") for r in rows]  # all of them: mutual TLS uses every anchor
            # For S/MIME an anchor brought by a peer (its row names the peer's domain) vouches for
            # that peer's domains only, unless it is also trusted without a domain.
            unscoped = {r.fingerprint for r in rows if not r.address}
            extra = self.settings.path("tls", "client_ca", Path())
            if str(extra) not in ("", ".") and extra.is_file():
                bundle = extra.read_bytes()
                anchors.append(bundle)
                with contextlib.suppress(ValueError):  # an unreadable bundle fails where TLS loads it
                    unscoped.update(c.fingerprint(hashes.SHA256()).hex() for c in x509.load_pem_x509_certificates(bundle))
            scoped = tuple(dict.fromkeys((r.pem.encode("ascii"), r.address) for r in rows
                                         if r.address and r.fingerprint not in unscoped))  # fmt: skip
            crls: list[bytes] = []
            pki = self.settings.pki_dir
            candidates = [
                pki / "crl.pem",
                *sorted((pki / "crls").glob("*.pem")),
                *sorted((pki / "crls").glob("*.crl")),
            ]
            for path in candidates:
                if path.is_file():
                    crls.append(path.read_bytes())
            if not anchors:
                raise KeyStoreError("no trust anchor in the directory: run 'mssgw init' or add one")
            return TrustRef(tuple(dict.fromkeys(anchors)), tuple(crls), scoped)

        return self._cached("trust", "", compute)  # type: ignore[no-any-return]

    def trust_store(self) -> TrustStore:
        return load_trust(self.trust())

    def operator_tls(self) -> tuple[Path, Path]:
        """Our client certificate and key towards peer operators (mutual TLS)."""
        pki = self.settings.pki_dir
        cert = self.settings.path("tls", "operator_cert", pki / "operator.pem")
        key = self.settings.path("tls", "operator_key", pki / "operator.key")
        return cert, key
