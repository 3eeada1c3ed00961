"""Certificate operations behind ``mssgw certs``: issue, import, list, revoke, trust anchors, CRLs, export.

Certificates are recorded in the directory (``Certificate`` rows); private keys
are sealed in the database under the nodes' key-encryption key (``directory.secrets``,
``key:<fingerprint>``, PKCS#8), referenced by ``key_path`` = ``sealed:key:<fingerprint>``,
and never printed: every node sharing the database signs and decrypts with them.  Keys of
homes made before that (files under ``DATA/keys``) keep working and ``seal_key_files``
(``mssgw certs seal-keys``) moves them in.  Our OpenPGP key pairs' secret parts are sealed
the same way (``pgp:<fingerprint>``), with gpg's revocation certificate
(``pgp-revocation:<fingerprint>``), so any node can use or revoke them. A mailbox certificate has purpose ``smime``
(signature and encryption; for ORG and APP mailboxes it is also their TLS
client identity). Revoking a certificate issued by the development CA also
rewrites the CA's CRL.  The development CA's own key is sealed too (``key:<CA fingerprint>``,
``dev_ca``), so any node issues, revokes and re-signs the CRL; its CRL is made from the
directory's revoked rows (plus ``pki/revoked.json`` of an older home), the same on every node.

Errors: ``CertError`` (a sentence for the admin).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import select
from sqlalchemy.orm import Session

from certs import pki
from directory import admin
from directory import secrets as sealed
from directory.certificates import register_certificate
from directory.models import Certificate, MailboxType, PgpKey
from gateway.config import Settings
from gateway.core.errors import DirectoryError
from gateway.core.keys import private_key_from_pem
from gateway.crypto.cms_keys import encryption_problem, signing_problem


class CertError(DirectoryError):
    """A certificate operation cannot be done; the message says why."""


class CertNotFound(CertError):
    """No such certificate, anchor or key: the CLI exits 1 (not found), not 2 (usage)."""

    exit_code = 1


_KIND_FOR_TYPE = {MailboxType.PER: "user", MailboxType.ORG: "org", MailboxType.APP: "app"}


@dataclass(frozen=True)
class LoadedMaterial:
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    private_key: Any | None


def fingerprint_of(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _seal_key(session: Session, settings: Settings, fingerprint: str, key: Any) -> str:
    """Seal a private key in the database (the caller's transaction); returns its ``key_path``."""
    return sealed.seal_private_key(session, sealed.load_kek(settings), fingerprint, key)


@dataclass(frozen=True)
class SealReport:
    sealed: list[str]  # fingerprints whose key is now in the database
    files: list[Path]  # key files to remove once the transaction is committed
    problems: list[str]  # key files that could not be read (left as they are)


def seal_key_files(session: Session, settings: Settings, *, pki_files: bool = True) -> SealReport:
    """Move the key files of older homes into the database (idempotent).

    The caller removes ``files`` once the transaction is committed, never before.  The TLS
    listener's key (``server`` rows) stays a file of each node; a key file that is missing or
    unreadable is left as it is and named in ``problems``.  ``pki/ca.key`` and ``pki/operator.key``
    are sealed when they are the keys of this operator's CA (an ``anchor`` row) and operator
    certificate; ``pki_files=False`` (``mssgw init`` on the first node) seals them but leaves the
    development PKI's copies in place."""
    kek = sealed.load_kek(settings)
    done: dict[str, None] = {}
    files: dict[Path, None] = {}
    problems: list[str] = []
    for fpr, path in _pki_key_files(session, settings, problems):
        if not sealed.exists(session, sealed.key_name(fpr)):
            sealed.seal_private_key(session, kek, fpr, pki.load_private_key(path))
            done[fpr] = None
        if pki_files:
            files[path] = None
    rows = session.scalars(select(Certificate).where(Certificate.key_path.is_not(None)).order_by(Certificate.id))
    for row in list(rows):
        if row.purpose == "server" or sealed.sealed_name(row.key_path) is not None:
            continue
        path = Path(row.key_path or "")
        try:
            key = private_key_from_pem(path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:  # the text could quote key material: class only
            problems.append(f"{row.fingerprint[:16]}... ({path.name}: {exc.__class__.__name__})")
            continue
        if row.fingerprint not in done:
            sealed.seal_private_key(session, kek, row.fingerprint, key)
        row.key_path = sealed.sealed_ref(sealed.key_name(row.fingerprint))
        done[row.fingerprint] = None
        files[path] = None
    session.flush()
    return SealReport(list(done), list(files), problems)


def _pki_key_files(session: Session, settings: Settings, problems: list[str]) -> list[tuple[str, Path]]:
    """(certificate fingerprint, key file) of ``pki/ca.key`` and ``pki/operator.key`` when each file
    holds the key of a certificate of the directory (an anchor, our ``sign`` certificate)."""
    dev = pki.dev_paths(settings.pki_dir)
    found = []
    for cert_path, key_path, purpose in ((dev.ca_cert, dev.ca_key, "anchor"),
                                         (dev.operator_cert, dev.operator_key, "sign")):  # fmt: skip
        if not (cert_path.is_file() and key_path.is_file()):
            continue
        try:
            cert, key = pki.load_certificate(cert_path), pki.load_private_key(key_path)
        except pki.PkiError as exc:
            problems.append(str(exc))
            continue
        fpr = fingerprint_of(cert)
        row = session.scalar(select(Certificate.id).where(Certificate.fingerprint == fpr,
                                                          Certificate.purpose == purpose).limit(1))  # fmt: skip
        if row is None or key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            continue  # not this operator's (a copied or stale file): never sealed under its name
        found.append((fpr, key_path))
    return found


@dataclass(frozen=True)
class DevCa:
    """The development CA as any node uses it: the public folder, the certificate, the key."""

    paths: pki.DevPki
    certificate: x509.Certificate
    key: rsa.RSAPrivateKey


def dev_ca(session: Session, settings: Settings) -> DevCa:
    """The development CA: ``pki/ca.pem`` with its key sealed in the database (``key:<fingerprint>``),
    or ``pki/ca.key`` of an older home.  ``CertError`` when neither holds it (a CA outside mssgw)."""
    paths = pki.dev_paths(settings.pki_dir)
    try:
        cert = pki.load_certificate(paths.ca_cert)
    except pki.PkiError:
        raise CertError(f"no CA certificate {paths.ca_cert}: run 'mssgw init' on this node (with this operator's "
                        "database URL and key-encryption key, it joins the operator and writes it)") from None
    name = sealed.key_name(fingerprint_of(cert))
    key: Any
    if sealed.exists(session, name):
        try:
            key = sealed.load_private_key(session, sealed.load_kek(settings), sealed.sealed_ref(name))
        except sealed.SealedSecretError as exc:
            raise CertError(str(exc)) from None
    elif paths.ca_key.is_file():
        key = pki.load_private_key(paths.ca_key)
    else:
        raise CertError(f"the private key of the CA {cert.subject.rfc4514_string()} is not in the database: this "
                        "operator's CA is not the development CA; have it issue the certificate and import it "
                        "with 'mssgw certs import'")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertError("the development CA's key is not an RSA key")
    return DevCa(paths, cert, key)


def crl_entries(session: Session, ca: DevCa) -> list[dict[str, object]]:
    """What the CA's CRL lists: the directory's revoked certificates it issued (every node sees
    the same), and the entries of an older home's ``pki/revoked.json``."""
    entries: dict[str, dict[str, object]] = {}
    for raw in pki._read_revoked(ca.paths):
        entries[str(raw.get("serial"))] = raw
    subject = ca.certificate.subject.rfc4514_string()
    rows = session.scalars(select(Certificate).where(Certificate.issuer == subject, Certificate.revoked_at.is_not(None),
                                                     Certificate.purpose != "anchor").order_by(Certificate.id))  # fmt: skip
    for row in rows:
        serial = format(int(row.serial, 16), "x")
        when = row.revoked_at if row.revoked_at is None or row.revoked_at.tzinfo else row.revoked_at.replace(tzinfo=UTC)
        try:
            reason: str | None = x509.ReasonFlags[row.revocation_reason or "unspecified"].value
        except KeyError:
            reason = None
        entries.setdefault(serial, {"serial": serial, "date": when.replace(microsecond=0).isoformat() if when else "",
                                    "reason": reason})  # fmt: skip
    return list(entries.values())


def write_dev_crl(session: Session, ca: DevCa) -> Path:
    """Re-sign this node's copy of the development CA's CRL (``pki/crl.pem``) from ``crl_entries``."""
    pki.write_crl(ca.paths.crl, ca.certificate, ca.key, crl_entries(session, ca))
    return ca.paths.crl


def issue_for_mailbox(session: Session, settings: Settings, address: str, *, days: int | None = None) -> dict[str, Any]:
    """Issue a certificate from the development CA for one of our mailboxes and record it."""
    box = admin.get_mailbox(session, address)
    if not box.local:
        raise CertError(f"{box.address} is not one of our mailboxes: import its certificate instead")
    ca = dev_ca(session, settings)
    not_after = datetime.now(UTC) + timedelta(days=days) if days is not None else None
    cert, key = pki.issue_certificate(
        ca.paths,
        kind=_KIND_FOR_TYPE[box.type],  # type: ignore[arg-type]
        email=box.address,
        common_name=box.display_name or box.address,
        not_after=not_after,
        ca_key=ca.key,
    )
    fpr = fingerprint_of(cert)
    key_path = _seal_key(session, settings, fpr, key)
    register_certificate(session, cert.public_bytes(serialization.Encoding.PEM), address=box.address,
                         purpose="smime", key_path=key_path)
    return certificate_dict(_row(session, fpr, box.address))


def load_material(data: bytes, password: bytes | None = None) -> LoadedMaterial:
    """A certificate (and optionally its key and chain) from PEM, DER or PKCS#12 bytes."""
    if b"-----BEGIN" in data:
        certs = x509.load_pem_x509_certificates(data) if b"CERTIFICATE" in data else []
        key = None
        if b"PRIVATE KEY" in data:
            try:
                key = serialization.load_pem_private_key(data, password=password)
            except (ValueError, TypeError) as exc:
                raise CertError(f"the private key cannot be read ({exc})") from None
        if not certs:
            raise CertError("no certificate found in the PEM data")
        return LoadedMaterial(certs[0], certs[1:], key)
    with contextlib.suppress(ValueError):  # not DER: PKCS#12 below
        return LoadedMaterial(x509.load_der_x509_certificate(data), [], None)
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError as exc:
        raise CertError(f"not a PEM, DER or PKCS#12 certificate (or wrong passphrase): {exc}") from None
    if cert is None:
        raise CertError("the PKCS#12 file holds no certificate")
    return LoadedMaterial(cert, list(extra or []), key)


def _emails(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [e.lower() for e in san.get_values_for_type(x509.RFC822Name)]
    except x509.ExtensionNotFound:
        return []


def import_certificate(
    session: Session,
    settings: Settings,
    address: str,
    data: bytes,
    *,
    password: bytes | None = None,
    purpose: str = "smime",
) -> dict[str, Any]:
    """Record a mailbox's (or a domain's) certificate, with its private key when given (ours only)."""
    material = load_material(data, password)
    cert = material.certificate
    target = address.strip().lower()
    is_domain = "@" not in target
    if not is_domain:
        box = admin.get_mailbox(session, target)
        target = box.address
        emails = _emails(cert)
        if emails and target not in emails and purpose == "smime":
            raise CertError(f"the certificate is for {', '.join(emails)}, not {target}")
        if material.private_key is not None and not box.local:
            raise CertError(f"{target} is a remote mailbox: never import its private key here")
    if cert.not_valid_after_utc < datetime.now(UTC):
        raise CertError(f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if material.private_key is not None:
        if not isinstance(material.private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise CertError("only RSA and EC private keys are supported")
        if material.private_key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CertError("the private key does not match the certificate")
    if purpose == "smime":
        _check_smime_usable(cert, material.private_key)
    fpr = fingerprint_of(cert)
    key_path = _seal_key(session, settings, fpr, material.private_key) if material.private_key is not None else None
    register_certificate(session, cert.public_bytes(serialization.Encoding.PEM), address=target, purpose=purpose,
                         key_path=key_path)
    return certificate_dict(_row(session, fpr, target, purpose))


def _check_smime_usable(cert: x509.Certificate, private_key: Any | None) -> None:
    """Refuse now, with the reason, a certificate that delivery could not use later: mail is
    encrypted to every S/MIME certificate (RSA key transport or ECDH, RFC 8551 §2.3), and one
    imported with its private key also signs (RSA or ECDSA, RFC 8551 §2.2)."""
    problem = encryption_problem(cert)
    if problem is None and private_key is not None:
        problem = signing_problem(cert, private_key)
    if problem is not None:
        raise CertError(f"this certificate cannot be used for S/MIME: {problem}")


def _row(session: Session, fingerprint: str, address: str | None, purpose: str | None = None) -> Certificate:
    stmt = select(Certificate).where(Certificate.fingerprint == fingerprint, Certificate.address == address)
    if purpose:
        stmt = stmt.where(Certificate.purpose == purpose)
    row = session.scalars(stmt).first()
    if row is None:
        raise CertNotFound(f"no certificate {fingerprint[:16]}... for {address}")
    return row


def certificate_dict(row: Certificate, *, pem: bool = False) -> dict[str, Any]:
    now = datetime.now(UTC)
    not_after = row.not_after if row.not_after.tzinfo else row.not_after.replace(tzinfo=UTC)
    data: dict[str, Any] = {
        "address": row.address,
        "purpose": row.purpose,
        "fingerprint": row.fingerprint,
        "subject": row.subject,
        "issuer": row.issuer,
        "serial": row.serial,
        "not_before": row.not_before.isoformat(),
        "not_after": row.not_after.isoformat(),
        "status": "revoked" if row.revoked_at else ("expired" if not_after < now else "valid"),
        "has_private_key": bool(row.key_path),
    }
    if pem:
        data["pem"] = row.pem
    return data


def list_certificates(session: Session, *, address: str | None = None, purpose: str | None = None) -> list[dict[str, Any]]:
    stmt = select(Certificate).order_by(Certificate.address, Certificate.purpose, Certificate.not_after)
    if address:
        stmt = stmt.where(Certificate.address == address.lower())
    if purpose:
        stmt = stmt.where(Certificate.purpose == purpose)
    return [certificate_dict(row) for row in session.scalars(stmt)]


def find(session: Session, selector: str) -> list[Certificate]:
    """Certificates named by an address, a domain or a fingerprint (prefix of 8+ hex digits)."""
    sel = selector.strip().lower().replace(":", "")
    if len(sel) >= 8 and all(c in "0123456789abcdef" for c in sel):
        rows = list(session.scalars(select(Certificate).where(Certificate.fingerprint.startswith(sel))))
        if rows:
            return rows
    rows = list(session.scalars(select(Certificate).where(Certificate.address == sel).order_by(Certificate.not_after)))
    if not rows:
        raise CertNotFound(f"no certificate for {selector}")
    return rows


def revoke(session: Session, settings: Settings, selector: str, *, reason: str = "unspecified") -> list[str]:
    """Mark certificates revoked; those issued by our development CA also go into its CRL."""
    rows = [r for r in find(session, selector) if r.purpose != "anchor"]
    if not rows:
        raise CertNotFound(f"no revocable certificate for {selector}")
    try:
        flag = x509.ReasonFlags[reason.replace("-", "_")]
    except KeyError:
        flag = x509.ReasonFlags.unspecified
    ca: DevCa | None = None
    with contextlib.suppress(CertError):  # not the development CA's: the directory's row is enough
        ca = dev_ca(session, settings)
    done = []
    ours = False
    for row in rows:
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
            row.revocation_reason = flag.name
        ours = ours or (ca is not None and row.issuer == ca.certificate.subject.rfc4514_string())
        done.append(row.fingerprint)
    if ca is not None and ours:
        session.flush()
        write_dev_crl(session, ca)
    return done


def add_trust_anchor(session: Session, data: bytes, *, peer: str | None = None) -> dict[str, Any]:
    """Trust a CA for S/MIME signatures and for operators' TLS certificates (both directions).

    ``peer`` records which peer operator's domain brought the anchor (``mssgw peers add``, or
    ``certs trust-anchor add --domain``), so ``peers remove`` takes it away again; for S/MIME such
    an anchor vouches for signatures of that domain only (a Direct trust bundle), unless the same
    CA is also trusted without a domain. An anchor without one (IGC-Santé, our own CA) vouches
    for every domain and stays until ``certs trust-anchor remove``. Every anchor is accepted for mutual TLS on the inbound
    port: the running gateway picks it up within seconds (``gateway.app``'s trust watch).
    """
    cert = load_material(data).certificate
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CertError("a trust anchor must be a CA certificate (basicConstraints CA:TRUE)")
    if cert.not_valid_after_utc < datetime.now(UTC):
        raise CertError(f"the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    owner = peer.strip().lower().rstrip(".") if peer else None
    fpr = register_certificate(session, cert.public_bytes(serialization.Encoding.PEM), address=owner, purpose="anchor")
    return certificate_dict(_row(session, fpr, owner, "anchor"))


def anchor_pems(session: Session) -> list[bytes]:
    """PEM of every unrevoked trust anchor: the client CAs of the inbound port and the relay's CAs."""
    rows = session.scalars(
        select(Certificate.pem).where(Certificate.purpose == "anchor", Certificate.revoked_at.is_(None))
        .order_by(Certificate.id)
    )
    return list(dict.fromkeys(pem.encode("ascii") for pem in rows))


def remove_trust_anchor(session: Session, selector: str) -> None:
    rows = [r for r in find(session, selector) if r.purpose == "anchor"]
    if not rows:
        raise CertNotFound(f"no trust anchor {selector}")
    for row in rows:
        session.delete(row)


def refresh_dev_crl(settings: Settings, session: Session | None = None) -> Path:
    """Re-sign the development CA's CRL (new thisUpdate/nextUpdate), on any node."""
    if session is not None:
        return write_dev_crl(session, dev_ca(session, settings))
    from directory.db import make_engine, read_session_factory

    engine = make_engine(settings.database_url)
    try:
        with read_session_factory(engine)() as own:
            return write_dev_crl(own, dev_ca(own, settings))
    finally:
        engine.dispose()


def export_pkcs12(session: Session, address: str, passphrase: bytes, settings: Settings | None = None) -> bytes:
    """The mailbox's newest valid certificate and key as PKCS#12, for its owner's mail client."""
    if len(passphrase) < 8:
        raise CertError("the export passphrase must have at least 8 characters")
    rows = [r for r in find(session, address) if r.key_path and r.revoked_at is None and r.purpose == "smime"]
    if not rows:
        raise CertError(f"no certificate with a private key for {address}")
    row = rows[-1]
    cert = x509.load_pem_x509_certificate(row.pem.encode())
    kek = sealed.load_kek(settings) if settings is not None and sealed.sealed_name(row.key_path) else None
    try:
        key = sealed.load_private_key(session, kek, row.key_path or "")
    except sealed.SealedSecretError as exc:
        raise CertError(str(exc)) from None
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(50000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(passphrase)
    )
    return pkcs12.serialize_key_and_certificates(
        (row.address or "").encode(), key, cert, None, encryption  # type: ignore[arg-type]
    )


# --- OpenPGP keys --------------------------------------------------------------------------


def _keyring(settings: Settings, session: Session | None = None) -> Any:
    """The node's keyring; with ``session``, unlocked by the keyring passphrase (made when absent)
    that protects our secret keys in every node's GnuPG home."""
    from gateway.crypto.keyring import keyring_passphrase
    from gateway.crypto.openpgp import OpenPgp

    ring = OpenPgp(settings.gnupg_dir)
    if session is not None:
        ring.passphrase = keyring_passphrase(session, settings, make=True)
    return ring


def pgp_import(session: Session, settings: Settings, address: str, armored: bytes) -> list[str]:
    """Import a recipient's public key (or our own key pair) for ``address``; its user id must name it."""
    from email.utils import getaddresses

    box = admin.get_mailbox(session, address)
    if b"PRIVATE KEY BLOCK" in armored and not box.local:
        raise CertError(f"{box.address} is a remote mailbox: never import its secret key here")
    ring = _keyring(settings, session if b"PRIVATE KEY BLOCK" in armored else None)
    try:
        fingerprints = ring.import_key(armored)
        if not fingerprints:
            raise CertError("no OpenPGP key found in the file")
        secret = {k["fingerprint"] for k in ring.list_keys(secret=True)}
        for fpr in dict.fromkeys(fingerprints):
            info = next((k for k in ring.list_keys() if k["fingerprint"] == fpr), None)
            uids = [a.lower() for uid in (info or {}).get("uids", []) for _, a in getaddresses([uid])]
            if box.address not in uids:
                ring.delete(fpr)
                raise CertError(f"key {fpr} has no user id for {box.address} (it names {', '.join(uids) or 'nobody'})")
            row = session.scalar(select(PgpKey).where(PgpKey.address == box.address, PgpKey.fingerprint == fpr))
            if row is None:
                row = PgpKey(address=box.address, fingerprint=fpr, armored="")
                session.add(row)
            row.armored = ring.export_public(fpr)
            row.has_secret = fpr in secret
            row.revoked = False
            if row.has_secret:
                _seal_pgp_secret(session, settings, ring, fpr)
        session.flush()
        return list(dict.fromkeys(fingerprints))
    finally:
        ring.close()


def _seal_pgp_secret(session: Session, settings: Settings, ring: Any, fpr: str) -> None:
    """Seal our key pair's secret part and gpg's revocation certificate: any node can use or revoke it."""
    from gateway.crypto.keyring import revocation_name, secret_name

    kek = sealed.load_kek(settings)
    ring.protect_secret_key(fpr)  # an imported key pair may come unprotected: never kept so on disk
    sealed.put(session, kek, secret_name(fpr), ring.export_secret(fpr).encode("ascii"))
    revocation = ring.revocation_certificate(fpr)
    if revocation is not None:
        sealed.put(session, kek, revocation_name(fpr), revocation.encode("utf-8"))
        ring.forget_revocation_certificate(fpr)


def pgp_generate(session: Session, settings: Settings, address: str) -> str:
    """Create an OpenPGP key pair for one of our mailboxes (its secret part sealed in the database)."""
    box = admin.get_mailbox(session, address)
    if not box.local:
        raise CertError(f"{box.address} is not one of our mailboxes")
    ring = _keyring(settings, session)
    try:
        fpr = str(ring.generate_key(box.address, box.display_name or box.address))
        session.add(PgpKey(address=box.address, fingerprint=fpr, armored=ring.export_public(fpr), has_secret=True))
        _seal_pgp_secret(session, settings, ring, fpr)
        session.flush()
        return fpr
    finally:
        ring.close()


def pgp_list(session: Session, address: str | None = None) -> list[dict[str, Any]]:
    stmt = select(PgpKey).order_by(PgpKey.address, PgpKey.created_at)
    if address:
        stmt = stmt.where(PgpKey.address == address.lower())
    return [
        {"address": r.address, "fingerprint": r.fingerprint, "has_secret": r.has_secret,
         "status": "revoked" if r.revoked else "valid"}
        for r in session.scalars(stmt)
    ]


def pgp_revoke(session: Session, settings: Settings, fingerprint: str) -> None:
    """Stop using a key: revoked in the directory; our own keys are revoked in the keyring too."""
    fpr = fingerprint.replace(" ", "").upper()
    rows = list(session.scalars(select(PgpKey).where(PgpKey.fingerprint == fpr)))
    if not rows:
        raise CertNotFound(f"no OpenPGP key {fingerprint}")
    from gateway.crypto.keyring import revocation_name, sync_keyring

    ring = _keyring(settings)
    try:
        if any(row.has_secret for row in rows):
            sync_keyring(ring, session, settings)  # a key pair made on another node
            certificate = sealed.read(session, sealed.load_kek(settings), revocation_name(fpr))
            ring.revoke(fpr, None if certificate is None else certificate.decode("utf-8"))
            revoked = ring.export_public(fpr)  # with the revocation signature: every node imports it
        for row in rows:
            row.revoked = True
            if row.has_secret:
                row.armored = revoked
    finally:
        ring.close()


# --- CRLs from distribution points ---------------------------------------------------------------


@dataclass(frozen=True)
class CrlFetch:
    url: str
    ok: bool
    detail: str


def distribution_points(session: Session) -> list[str]:
    """HTTP(S) CRL distribution points named by the certificates in the directory."""
    urls: dict[str, None] = {}
    for row in session.scalars(select(Certificate).where(Certificate.revoked_at.is_(None))):
        cert = x509.load_pem_x509_certificate(row.pem.encode("ascii"))
        try:
            points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            continue
        for point in points:
            for name in point.full_name or []:
                if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith(("http://", "https://")):
                    urls[name.value] = None
    return list(urls)


def fetch_crls(settings: Settings, urls: list[str], *, timeout: float = 15.0,
               max_bytes: int = 20 * 1024 * 1024) -> list[CrlFetch]:
    """Download each CRL into ``DATA/pki/crls`` (where the trust store reads them), keeping the old copy on failure."""
    import hashlib
    import urllib.request

    target = settings.pki_dir / "crls"
    target.mkdir(parents=True, exist_ok=True)
    results = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http/https only, above)
                data = response.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise CertError(f"larger than {max_bytes} bytes")
            crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        except (OSError, ValueError, CertError) as exc:
            results.append(CrlFetch(url, False, f"kept the cached copy: {exc}"))
            continue
        path = target / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.pem"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, path)
        next_update = crl.next_update_utc.isoformat() if crl.next_update_utc else "unknown"
        results.append(CrlFetch(url, True, f"{len(list(crl))} revoked, next update {next_update}"))
    return results
