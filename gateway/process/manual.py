"""Protect or open one message by hand, as the pipeline would (``mssgw message protect|open``).

For admins and integrators: the same keys (``KeyStore``), the same crypto jobs
(``protect_job``, ``open_job``) and the same OpenPGP keyring as the workers, run
once in this process. S/MIME is used when every recipient has a certificate
(its own or its domain's); otherwise PGP/MIME when every recipient has an
OpenPGP key; otherwise nothing is produced and the error names who cannot be
protected.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from directory.models import PgpKey
from gateway.config import Settings
from gateway.core.errors import CryptoError
from gateway.crypto.keystore import KeyStore, KeyStoreError
from gateway.crypto.result import SecurityResult
from gateway.process.inbound import _is_pgp, open_job
from gateway.process.outbound import protect_job


class ManualError(CryptoError):
    """The message cannot be protected or opened; the message says why."""


def _pgp_keys(factory: sessionmaker[Session], address: str, *, secret: bool) -> list[str]:
    with factory() as session:
        stmt = select(PgpKey.fingerprint).where(PgpKey.address == address.lower(), PgpKey.revoked.is_(False))
        if secret:
            stmt = stmt.where(PgpKey.has_secret.is_(True))
        return list(session.scalars(stmt))


def protect_message(settings: Settings, factory: sessionmaker[Session], data: bytes, *, sender: str,
                    recipients: Sequence[str]) -> tuple[bytes, str]:
    """The protected message and the method used ("smime" or "openpgp")."""
    if not recipients:
        raise ManualError("give at least one --to")
    keys = KeyStore(settings, factory)
    certs: list[bytes] = []
    missing: list[str] = []
    for rcpt in recipients:
        try:
            certs.extend(keys.recipient_certs(rcpt))
        except KeyStoreError:
            missing.append(rcpt)
    if not missing:
        try:
            signer = keys.signer_for(sender)
        except KeyStoreError as exc:
            raise ManualError(str(exc)) from None
        crypto = settings.crypto
        out = protect_job(data, signer, tuple(dict.fromkeys(certs)), crypto.encrypt_for_sender, crypto.outer_subject,
                          crypto.content_encryption, crypto.rsa_key_transport, crypto.rsa_signature)  # fmt: skip
        return out, "smime"
    pgp_recipients = [fpr for r in recipients for fpr in _pgp_keys(factory, r, secret=False)[:1]]
    no_key = [r for r in recipients if not _pgp_keys(factory, r, secret=False)]
    if no_key:
        raise ManualError(f"no certificate or OpenPGP key for: {', '.join(no_key)}")
    signers = _pgp_keys(factory, sender, secret=True)
    if not signers:
        raise ManualError(f"no OpenPGP secret key for the sender {sender} (mssgw certs pgp generate)")
    from gateway.crypto.openpgp import OpenPgp

    ring = OpenPgp(settings.gnupg_dir)
    try:
        return ring.protect(data, signers[0], pgp_recipients), "openpgp"
    finally:
        ring.close()


def open_message(settings: Settings, factory: sessionmaker[Session], data: bytes, *, recipient: str,
                 now: _dt.datetime | None = None) -> tuple[bytes | None, SecurityResult]:
    """Decrypt and verify ``data`` for our mailbox ``recipient``."""
    keys = KeyStore(settings, factory)  # also keeps the node's OpenPGP keyring in step with the directory
    if _is_pgp(data):
        from gateway.crypto.openpgp import OpenPgp

        ring = OpenPgp(settings.gnupg_dir)
        try:
            return ring.open(data)
        finally:
            ring.close()
    try:
        candidates = tuple(keys.decryption_keys(recipient))
        trust = keys.trust()
    except KeyStoreError as exc:
        raise ManualError(str(exc)) from None
    if not candidates:
        raise ManualError(f"no private key of ours can open mail for {recipient}")
    return open_job(data, candidates, trust, now)
