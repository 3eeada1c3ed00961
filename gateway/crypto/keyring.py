"""Keeping a node's GnuPG home in step with the directory's OpenPGP keys (``PgpKey`` rows, sealed secret keys).

Why: every node has a GnuPG home of its own (gpg keeps its keyring in files), yet any node may
protect or open any message.  The directory is the truth: each ``PgpKey`` row holds the armored
public key (with its revocation signature once revoked: ``certs.service.pgp_revoke`` writes it
back), and our own key pairs' secret parts are sealed as ``pgp:<fingerprint>``
(``directory.secrets``).  ``KeyringSync`` imports what the rows say into the node's home at the
first use and again whenever they changed: before each use it compares a memo of the table
(count, highest id, revoked and secret counts, total armored length) taken at most every
``ttl`` seconds, so a key imported or revoked on node 1 is used by node 2 within seconds,
without a restart, and an unchanged table costs one small query per ``ttl``.

Secret keys in a home are protected by gpg itself with the keyring passphrase
(``keyring_passphrase``: 32 random bytes, sealed as ``gnupg-passphrase``, the same on every
node), so ``private-keys-v1.d`` holds no key in clear: a key pair is generated with it, and a
secret key imported from the directory (or an older, unprotected one) is protected with it at once.

What it does not do: remove from a home a key whose row was deleted (rows are revoked, not
deleted, by ``mssgw certs pgp revoke``).

Errors: none raised to the caller.  A database or KEK failure is logged (its sentence, never key
material) and the keyring keeps what it has; an operation that needs a missing key then fails
as gpg says (the pipeline defers), and the next try comes after ``ttl``.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from directory.models import PgpKey
from directory.secrets import load_kek, put, read
from gateway.config import Settings
from gateway.core.errors import MssgwError

if TYPE_CHECKING:
    from gateway.crypto.openpgp import OpenPgp

__all__ = ["PASSPHRASE_NAME", "TTL_SECONDS", "KeyringSync", "keyring_passphrase", "secret_name", "sync_keyring"]

log = logging.getLogger("mssgw.openpgp")

TTL_SECONDS = 5.0
PASSPHRASE_NAME = "gnupg-passphrase"  # noqa: S105 (the name of a sealed row, not a secret)


def keyring_passphrase(session: Session, settings: Settings, *, make: bool = False) -> str | None:
    """The passphrase that protects our secret keys inside each node's GnuPG home.

    Sealed in the database (``gnupg-passphrase``); with ``make`` it is created when absent, in
    the caller's transaction (the CLI that generates or imports a key pair)."""
    kek = load_kek(settings)
    value = read(session, kek, PASSPHRASE_NAME)
    if value is None and make:
        value = base64.b64encode(os.urandom(32))
        put(session, kek, PASSPHRASE_NAME, value)
    return None if value is None else value.decode("ascii")


def secret_name(fingerprint: str) -> str:
    """The sealed name of one of our OpenPGP secret keys."""
    return f"pgp:{fingerprint.upper()}"


def revocation_name(fingerprint: str) -> str:
    """The sealed name of the revocation certificate gpg made with one of our key pairs."""
    return f"pgp-revocation:{fingerprint.upper()}"


def _memo(session: Session) -> tuple[object, ...]:
    row = session.execute(select(
        func.count(), func.max(PgpKey.id), func.sum(case((PgpKey.revoked.is_(True), 1), else_=0)),
        func.sum(case((PgpKey.has_secret.is_(True), 1), else_=0)), func.sum(func.length(PgpKey.armored)),
    ).select_from(PgpKey)).one()  # fmt: skip
    return tuple(row)


def sync_keyring(ring: OpenPgp, session: Session, settings: Settings) -> int:
    """Import every row's public key, and the secret keys the home lacks; returns how many imported."""
    rows = list(session.scalars(select(PgpKey).order_by(PgpKey.id)))
    if not rows:
        return 0
    public = "\n".join(r.armored for r in rows if r.armored)
    count = len(ring.import_key(public)) if public else 0
    wanted = {r.fingerprint.upper() for r in rows if r.has_secret}
    if wanted:
        passphrase = keyring_passphrase(session, settings)
        if passphrase is not None:
            ring.passphrase = passphrase
        present = {str(k["fingerprint"]).upper() for k in ring.list_keys(secret=True)}
        missing = sorted(wanted - present)
        if passphrase is None:  # never put a secret key in a home unprotected
            if missing:
                log.warning("openpgp: %d secret keys not imported: no keyring passphrase in the database "
                            "(made by mssgw certs pgp generate or import)", len(missing))  # fmt: skip
            return count
        kek = load_kek(settings)
        for fpr in missing:
            armored = read(session, kek, secret_name(fpr))
            if armored is not None:
                count += len(ring.import_key(armored))
        for fpr in sorted(wanted & {str(k["fingerprint"]).upper() for k in ring.list_keys(secret=True)}):
            ring.protect_secret_key(fpr)  # imported now, or left unprotected by an older version
    return count


class KeyringSync:
    """Run before each use of a node's keyring: re-import when the directory's keys changed."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings, *, ttl: float = TTL_SECONDS) -> None:
        self._factory = factory
        self._settings = settings
        self.ttl = ttl
        self._lock = threading.Lock()
        self._memo: tuple[object, ...] | None = None
        self._checked = float("-inf")
        self._passphrase: str | None = None

    def __call__(self, ring: OpenPgp) -> None:
        self._check(ring)
        if self._passphrase is not None:  # every ring object of this home signs and decrypts with it
            ring.passphrase = self._passphrase

    def _check(self, ring: OpenPgp) -> None:
        if time.monotonic() - self._checked < self.ttl:
            return
        with self._lock:
            if time.monotonic() - self._checked < self.ttl:
                return
            try:
                with self._factory() as session:
                    memo = _memo(session)
                    if memo != self._memo:
                        imported = sync_keyring(ring, session, self._settings)
                        self._passphrase = ring.passphrase
                        log.info("openpgp: keyring brought in step with the directory (%d keys imported)",
                                 imported)  # fmt: skip
                        self._memo = memo
            except Exception as exc:  # the keyring keeps what it has; the operation says what is missing
                log.warning("openpgp: keyring not brought in step with the directory: %s", exc.__class__.__name__
                            if not isinstance(exc, MssgwError) else exc)  # fmt: skip
            self._checked = time.monotonic()
