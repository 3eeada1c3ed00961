"""Who is this client? Password and client-certificate logins, throttled and audited.

SMTP AUTH and IMAP LOGIN share one ``Authenticator`` so a brute force against
one is counted for both. Failures are counted per client address and per
account: each failure delays the answer exponentially (``auth.base_delay`` doubling up to
``auth.max_delay``), and ``auth.max_failures`` failures lock the key for
``auth.lockout_seconds``. Unknown accounts cost the same Argon2 work as wrong
passwords. The counters live in memory: a restart clears them (documented).

Verified credentials are remembered for ``CREDENTIAL_TTL`` seconds so that a client
opening a connection per message does not pay Argon2 each time. The cache key is
HMAC-SHA256 under a per-process random secret over (address, password): neither is
stored, and the key is useless outside this process. The value is the stored hash the
password was verified against. A hit still reads the mailbox (read-only, one row): it
counts only while the mailbox is active, local and holds that same hash, so a
deactivation or a password change takes effect at once. Failures are never cached and
are throttled as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from directory import service
from directory.models import Certificate, Mailbox, MailboxType
from gateway.audit.trail import AuditEvent, AuditWriter
from gateway.config import Settings


@dataclass(frozen=True)
class AuthOutcome:
    ok: bool
    identity: str | None  # the mailbox address the login acts as
    reason: str  # ok, bad-credentials, locked, unavailable, unknown-certificate, inactive
    retry_after: float = 0.0


@dataclass
class _Counter:
    failures: int = 0
    locked_until: float = 0.0
    last: float = 0.0


@dataclass
class Throttle:
    """Failure counters per key (``ip:1.2.3.4``, ``user:x@y``) with exponential delay and lockout."""

    max_failures: int = 5
    lockout_seconds: float = 900.0
    base_delay: float = 0.5
    max_delay: float = 8.0
    clock: Callable[[], float] = time.monotonic
    _counters: dict[str, _Counter] = field(default_factory=dict)

    def locked_for(self, *keys: str) -> float:
        now = self.clock()
        return max((c.locked_until - now for k in keys if (c := self._counters.get(k))), default=0.0)

    def failure(self, *keys: str) -> float:
        """Count a failure; returns the delay to wait before answering."""
        now = self.clock()
        worst = 0
        for key in keys:
            c = self._counters.setdefault(key, _Counter())
            if now - c.last > self.lockout_seconds:
                c.failures = 0  # an old streak is forgotten
            c.failures += 1
            c.last = now
            if c.failures >= self.max_failures:
                c.locked_until = now + self.lockout_seconds
            worst = max(worst, c.failures)
        return min(self.base_delay * (2 ** (worst - 1)), self.max_delay)

    def success(self, *keys: str) -> None:
        for key in keys:
            self._counters.pop(key, None)


def certificate_fingerprint(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()


def _emails_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        emails = [e.lower() for e in san.get_values_for_type(x509.RFC822Name)]
    except x509.ExtensionNotFound:
        emails = []
    emails += [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(x509.NameOID.EMAIL_ADDRESS)]
    return emails


#: How long a verified (address, password) is remembered, and how many are kept.
CREDENTIAL_TTL = 300.0
CREDENTIAL_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class _Verified:
    address: str
    password_hash: str  # the stored hash the password was verified against
    expires: float


class CredentialCache:
    """Verified credentials keyed by HMAC-SHA256(per-process secret, address NUL password)."""

    def __init__(self, ttl: float = CREDENTIAL_TTL, size: int = CREDENTIAL_CACHE_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._secret = secrets.token_bytes(32)
        self._entries: dict[bytes, _Verified] = {}

    def key(self, username: str, password: str) -> bytes:
        msg = username.strip().lower().encode("utf-8", "surrogatepass") + b"\x00" + password.encode(
            "utf-8", "surrogatepass")
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def get(self, key: bytes) -> _Verified | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self._entries.pop(key, None)
            return None
        return entry

    def put(self, key: bytes, address: str, password_hash: str) -> None:
        if len(self._entries) >= self.size:
            now = self.clock()
            for k in [k for k, v in self._entries.items() if v.expires <= now]:
                del self._entries[k]
            while len(self._entries) >= self.size:  # still full: drop the oldest
                del self._entries[next(iter(self._entries))]
        self._entries[key] = _Verified(address, password_hash, self.clock() + self.ttl)

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class Authenticator:
    def __init__(self, factory: sessionmaker[Session], settings: Settings, audit: AuditWriter | None = None,
                 *, readers: sessionmaker[Session] | None = None) -> None:
        self._factory = factory
        self._readers = readers or factory
        self._audit = audit
        self.credentials = CredentialCache()
        self.throttle = Throttle(
            max_failures=int(settings.get("auth", "max_failures")),
            lockout_seconds=float(settings.get("auth", "lockout_seconds")),
            base_delay=float(settings.get("auth", "base_delay")),
            max_delay=float(settings.get("auth", "max_delay")),
        )

    def _record(self, outcome: AuthOutcome, *, username: str, client: str | None, protocol: str, method: str) -> None:
        if self._audit is not None:
            self._audit.submit(
                AuditEvent(
                    "auth",
                    "accept" if outcome.ok else "refuse",
                    actor=(outcome.identity or username.lower())[:320],
                    client=client,
                    rule=outcome.reason,
                    detail={"protocol": protocol, "method": method},
                )
            )

    async def check_password(self, username: str, password: str, *, client: str | None, protocol: str) -> AuthOutcome:
        keys = (f"ip:{client}", f"user:{username.lower()}")
        locked = self.throttle.locked_for(*keys)
        if locked > 0:
            outcome = AuthOutcome(False, None, "locked", locked)
            self._record(outcome, username=username, client=client, protocol=protocol, method="password")
            return outcome
        key = self.credentials.key(username, password)
        try:
            identity = await asyncio.to_thread(self._verify_cached, key, username, password)
        except Exception:  # the directory cannot answer: temporary, not a wrong password
            outcome = AuthOutcome(False, None, "unavailable")
            self._record(outcome, username=username, client=client, protocol=protocol, method="password")
            return outcome
        if identity is None:
            delay = self.throttle.failure(*keys)
            outcome = AuthOutcome(False, None, "bad-credentials")
            self._record(outcome, username=username, client=client, protocol=protocol, method="password")
            await asyncio.sleep(delay)
            return outcome
        self.throttle.success(*keys)
        outcome = AuthOutcome(True, identity, "ok")
        self._record(outcome, username=username, client=client, protocol=protocol, method="password")
        return outcome

    def _verify_cached(self, key: bytes, username: str, password: str) -> str | None:
        """A cached verification if the mailbox still matches it, else a full Argon2 check."""
        cached = self.credentials.get(key)
        if cached is not None:
            with self._readers() as session, session.begin():
                row = session.execute(
                    select(Mailbox.active, Mailbox.local, Mailbox.password_hash).where(
                        Mailbox.address == cached.address)
                ).first()
            if row is not None and row.active and row.local and row.password_hash and hmac.compare_digest(
                    row.password_hash, cached.password_hash):
                return cached.address
            self.credentials.discard(key)  # deactivated, removed or a new password: verify in full
        with self._factory() as session, session.begin():
            box = service.verify_password(session, username, password)
            if box is None:
                return None
            address, stored = box.address, box.password_hash
        if stored:  # after the commit: the hash now stored (rehashed if its parameters were old)
            self.credentials.put(key, address, stored)
        return address

    async def check_certificate(self, der: bytes, *, client: str | None, protocol: str) -> AuthOutcome:
        """Map a verified TLS client certificate to an active local APP or ORG mailbox."""
        try:
            identity, reason = await asyncio.to_thread(self._match_certificate, der)
        except Exception:
            identity, reason = None, "unavailable"
        outcome = AuthOutcome(identity is not None, identity, reason)
        self._record(outcome, username=identity or "(certificate)", client=client, protocol=protocol,
                     method="certificate")
        return outcome

    def _match_certificate(self, der: bytes) -> tuple[str | None, str]:
        cert = x509.load_der_x509_certificate(der)
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        with self._factory() as session, session.begin():
            by_fpr = session.scalars(
                select(Certificate.address).where(
                    Certificate.fingerprint == fingerprint,
                    Certificate.purpose.in_(["tls-client", "smime", "sign"]),
                    Certificate.revoked_at.is_(None),
                )
            ).all()
            candidates = [a for a in by_fpr if a] or _emails_of(cert)
            for address in candidates:
                box = session.scalar(select(Mailbox).where(Mailbox.address == address.lower()))
                if box is None or not box.local:
                    continue
                if box.type not in (MailboxType.APP, MailboxType.ORG):
                    return None, "certificate-not-for-software"
                if not box.active:
                    return None, "inactive"
                return box.address, "ok"
        return None, "unknown-certificate"
