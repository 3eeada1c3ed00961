"""Mailbox passwords: Argon2id hashing and the login check, in constant time whoever asks.

``hash_password`` refuses passwords under 12 characters (``DirectoryError``); ``verify_password``
answers ``None`` for a wrong password and for an unknown, remote, deactivated or password-less
account alike, after the same amount of work, and rehashes old parameters on success.
"""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from directory.identifiers import InvalidIdentifier, normalise_address
from directory.models import Mailbox
from gateway.core.errors import DirectoryError

#: Argon2id with RFC 9106 / OWASP parameters sized for a mail server that checks a
#: password on every new connection (19 MiB, 2 passes, 1 lane: tens of ms, not hundreds).
#: Hashes made with other parameters verify as before and are rehashed with these on the
#: next successful login (``verify_password``).
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19_456
ARGON2_PARALLELISM = 1
_HASHER = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB,
                         parallelism=ARGON2_PARALLELISM)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the account does not exist, so unknown users cost the same time."""
    return _HASHER.hash("mssgw-no-such-account")


def hash_password(password: str) -> str:
    if len(password) < 12:
        raise DirectoryError("a password must have at least 12 characters")
    return _HASHER.hash(password)


def verify_password(session: Session, address: str, password: str) -> Mailbox | None:
    """The active local mailbox when the password is right, else ``None``.

    Unknown, remote, deactivated and password-less accounts cost one Argon2
    verification too, so timing does not tell which addresses exist.
    """
    try:
        addr = normalise_address(address)
    except InvalidIdentifier:
        addr = ""
    row = session.scalar(select(Mailbox).where(Mailbox.address == addr)) if addr else None
    stored = row.password_hash if row is not None and row.password_hash else _dummy_hash()
    ok: bool
    try:
        ok = _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok or row is None or not row.password_hash or not row.active or not row.local:
        return None
    if _HASHER.check_needs_rehash(stored):
        row.password_hash = _HASHER.hash(password)
    return row
