"""Who is this client? Password and client-certificate logins, throttled and audited.

SMTP AUTH and IMAP LOGIN share one ``Authenticator`` so a brute force against one is
counted for both.

Throttle (README "Security model"): every attempt is counted *before* its Argon2 check
(in-flight checks count: parallel attempts beyond a limit wait for those in flight to
finish, then are checked or refused, so they cannot race past it), on the
normalised address the login uses (``" <Dave@X>"`` is ``dave@x``), in three bounded tables:

- per source (IPv4 address, IPv6 /64): ``SOURCE_FACTOR * auth.max_failures`` failures lock
  that source out for ``auth.lockout_seconds``;
- per (account, source): ``auth.max_failures`` failures lock that pair out as long;
- per account, from all sources: never a lock. Past ``auth.max_failures`` failures, each
  attempt from a source that has not logged in to the account before waits
  ``auth.base_delay`` doubling per failure up to ``auth.max_delay`` before its check.

So an attacker locks out only his own sources; the clinician logging in from elsewhere
gets in (after at most ``auth.max_delay`` seconds). A failed answer is delayed
exponentially on the pair's failures. Unknown accounts cost the same Argon2 work as wrong
passwords. The counters live in memory (a restart clears them) and are bounded: the
least recently touched entries are dropped first. ``Throttle.clock`` and
``Authenticator.sleep`` are injectable so tests never wait on the wall clock.

Client certificates: a certificate logs in only when its SHA-256 fingerprint is
registered (``tls-client`` or ``smime``) and unrevoked for an active local APP/ORG
mailbox, and the trust store validates it for clientAuth now (chain, validity period,
the issuer's CRL). A stale or missing CRL is accepted with a warning when
``crypto.crl_soft_fail`` is set and refused as a temporary failure otherwise.

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
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from directory import passwords
from directory.identifiers import InvalidIdentifier, normalise_address
from directory.models import Certificate, Mailbox, MailboxType
from gateway.audit.trail import AuditEvent, AuditWriter
from gateway.config import Settings
from gateway.core import replies as R
from gateway.core.replies import Reply
from gateway.crypto.keystore import KeyStore

log = logging.getLogger("mssgw.auth")


@dataclass(frozen=True)
class AuthOutcome:
    ok: bool
    identity: str | None  # the mailbox address the login acts as
    #: ok, bad-credentials, locked, unavailable; certificates: unknown-certificate, revoked, expired,
    #: not-yet-valid, untrusted-certificate, certificate-not-for-software, inactive, crl-stale, crl-unavailable
    reason: str
    retry_after: float = 0.0
    warning: str | None = None  # accepted despite this (crl-stale, crl-unavailable under soft fail)


#: The per-source limit is this many times ``auth.max_failures``: one source may be a NAT
#: in front of a whole hospital, where a few users mistyping must not lock the others out.
SOURCE_FACTOR = 4
#: Entries per throttle table (sources, pairs, accounts, trusted pairs).
THROTTLE_CAPACITY = 100_000
#: How long a successful (account, source) pair skips the account-wide delay.
TRUSTED_SECONDS = 30 * 86400.0


@dataclass
class _Counter:
    failures: int = 0
    inflight: int = 0
    last: float = 0.0  # time of the last failure
    locked_until: float = 0.0


@dataclass(frozen=True)
class Ticket:
    """The throttle's answer to one attempt; an allowed ticket must be handed back to ``finish``."""

    allowed: bool
    account: str
    source: str
    wait: float = 0.0  # seconds to wait before checking (account-wide delay)
    retry_after: float = 0.0  # when refused
    busy: bool = False  # refused only because of attempts in flight: ask again when one finishes


class _Table:
    """Counters by key, least recently touched first; never more than ``capacity`` entries."""

    def __init__(self, capacity: int, forget_after: float) -> None:
        self.capacity = capacity
        self.forget_after = forget_after
        self.rows: OrderedDict[str, _Counter] = OrderedDict()

    def touch(self, key: str, now: float) -> _Counter:
        row = self.rows.get(key)
        if row is None:
            self._trim(now)
            row = self.rows[key] = _Counter()
        else:
            self.rows.move_to_end(key)
        if row.failures and now - row.last > self.forget_after:
            row.failures = 0  # an old streak is forgotten
        return row

    def _trim(self, now: float) -> None:
        """Make room for one entry: idle forgotten entries at the old end first, then the oldest."""
        for _ in range(2):
            if not self.rows:
                return
            key, oldest = next(iter(self.rows.items()))
            if oldest.inflight or now - oldest.last <= self.forget_after or oldest.locked_until > now:
                break
            del self.rows[key]
        while len(self.rows) >= self.capacity:
            self.rows.popitem(last=False)


class Throttle:
    """Failure counters per source, per (account, source) and per account; see the module docstring."""

    def __init__(self, max_failures: int = 5, lockout_seconds: float = 900.0, base_delay: float = 0.5,
                 max_delay: float = 8.0, clock: Callable[[], float] = time.monotonic, *,
                 capacity: int = THROTTLE_CAPACITY, source_factor: int = SOURCE_FACTOR,
                 trusted_seconds: float = TRUSTED_SECONDS) -> None:
        self.max_failures = max_failures
        self.source_limit = source_factor * max_failures
        self.lockout_seconds = lockout_seconds
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self.trusted_seconds = trusted_seconds
        self._sources = _Table(capacity, lockout_seconds)
        self._pairs = _Table(capacity, lockout_seconds)
        self._accounts = _Table(capacity, lockout_seconds)
        self._trusted: OrderedDict[str, float] = OrderedDict()  # pair key -> until
        self._capacity = capacity

    @staticmethod
    def source_key(client: str | None) -> str:
        """``ip:ADDRESS`` for IPv4 (and IPv4-mapped IPv6), ``ip:PREFIX/64`` for IPv6: one host's share."""
        if not client:
            return "ip:unknown"
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:
            return f"ip:{client[:64]}"
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return f"ip:{ip.ipv4_mapped}"
            return f"ip:{ipaddress.IPv6Network((ip, 64), strict=False)}"
        return f"ip:{ip}"

    @staticmethod
    def _pair(account: str, source: str) -> str:
        return f"pair:{account}|{source}"

    def begin(self, account: str, client: str | None) -> Ticket:
        """Count one attempt before its check: refused (locked or too many in flight) or allowed."""
        now = self.clock()
        source = self.source_key(client)
        src = self._sources.touch(source, now)
        pair = self._pairs.touch(self._pair(account, source), now)
        locked = max(src.locked_until, pair.locked_until) - now
        if locked > 0:
            return Ticket(False, account, source, retry_after=locked)
        if src.failures + src.inflight >= self.source_limit or pair.failures + pair.inflight >= self.max_failures:
            # Under the limit without the attempts in flight: those decide (they may all fail).
            busy = src.failures < self.source_limit and pair.failures < self.max_failures
            return Ticket(False, account, source, retry_after=self.max_delay, busy=busy)
        acc = self._accounts.touch(f"user:{account}", now)
        wait = 0.0 if self._is_trusted(account, source, now) else self._account_delay(acc.failures + acc.inflight)
        for row in (src, pair, acc):
            row.inflight += 1
        return Ticket(True, account, source, wait=wait)

    def finish(self, ticket: Ticket, ok: bool | None) -> float:
        """Hand back an allowed ticket: ``True`` logged in, ``False`` a failed check, ``None`` no check
        (outage, cancelled before checking). Returns the delay before answering a failure."""
        now = self.clock()
        rows = (self._sources.touch(ticket.source, now),
                self._pairs.touch(self._pair(ticket.account, ticket.source), now),
                self._accounts.touch(f"user:{ticket.account}", now))
        src, pair, _acc = rows
        for row in rows:
            row.inflight = max(0, row.inflight - 1)
        if ok is None:
            return 0.0
        if ok:
            pair.failures, pair.locked_until = 0, 0.0
            self._trust(self._pair(ticket.account, ticket.source), now)
            return 0.0
        for row in rows:
            row.failures += 1
            row.last = now
        if src.failures >= self.source_limit:
            src.locked_until = now + self.lockout_seconds
        if pair.failures >= self.max_failures:
            pair.locked_until = now + self.lockout_seconds
        return float(min(self.base_delay * (2 ** (pair.failures - 1)), self.max_delay))

    def _account_delay(self, failures: int) -> float:
        if failures < self.max_failures:
            return 0.0
        return float(min(self.base_delay * (2 ** min(failures - self.max_failures, 32)), self.max_delay))

    def _is_trusted(self, account: str, source: str, now: float) -> bool:
        until = self._trusted.get(self._pair(account, source))
        return until is not None and until > now

    def _trust(self, pair: str, now: float) -> None:
        self._trusted.pop(pair, None)
        while len(self._trusted) >= self._capacity:
            self._trusted.popitem(last=False)
        self._trusted[pair] = now + self.trusted_seconds

    def success(self, *keys: str) -> None:
        """Forget counters by key (``ip:ADDRESS``, ``user:ADDRESS``, ``pair:ADDRESS|ip:ADDRESS``): admin use."""
        for key in keys:
            for table in (self._sources, self._pairs, self._accounts):
                table.rows.pop(key, None)

    def size(self) -> int:
        """Entries held in all tables (bounded by four times the capacity)."""
        return len(self._sources.rows) + len(self._pairs.rows) + len(self._accounts.rows) + len(self._trusted)


def account_key(username: str) -> str:
    """The address a login acts as (what the directory looks up), so spelling variants count as one.

    A username that is no address at all is often a password typed in the wrong field: it is
    kept (for the throttle and the audit trail) only as a digest, never as text.
    """
    try:
        return normalise_address(username)
    except InvalidIdentifier:
        return "invalid:" + hashlib.sha256(username.strip().lower().encode("utf-8", "replace")).hexdigest()[:16]


def certificate_fingerprint(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()


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


#: ``ChainResult.failure`` -> login reason; any other failure is "untrusted-certificate".
_CHAIN_FAILURES = {"revoked": "revoked", "expired": "expired", "not-yet-valid": "not-yet-valid",
                   "crl-stale": "crl-stale", "crl-unavailable": "crl-unavailable"}


#: Full Argon2 checks running at once, process-wide. Each holds ``m`` (19 MiB) of memory and a
#: core: without a bound, a burst of first logins to many accounts (nothing cached yet) grew
#: the gateway by hundreds of MB while answering no faster than the cores allow.
_FULL_CHECKS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


class Authenticator:
    """Password and certificate logins for SMTP and IMAP: ``check_password``, ``check_certificate``."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings, audit: AuditWriter | None = None,
                 *, readers: sessionmaker[Session] | None = None) -> None:
        self._factory = factory
        self._readers = readers or factory
        self._audit = audit
        self.credentials = CredentialCache()
        self.throttle = Throttle(
            max_failures=settings.auth.max_failures,
            lockout_seconds=settings.auth.lockout_seconds,
            base_delay=settings.auth.base_delay,
            max_delay=settings.auth.max_delay,
        )
        #: Anchors and CRLs for client certificates (cached 30 s: ``keystore.invalidate()`` to reload now).
        self.keystore = KeyStore(settings, self._readers)
        self.crl_soft_fail = settings.crypto.crl_soft_fail
        #: How delays are waited (tests replace it to record them instead).
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        #: Set (and replaced) each time a password check finishes: attempts waiting on ``Ticket.busy``.
        self._finished = asyncio.Event()

    def _record(self, outcome: AuthOutcome, *, actor: str, client: str | None, protocol: str, method: str) -> None:
        if self._audit is not None:
            detail = {"protocol": protocol, "method": method}
            if outcome.warning:
                detail["warning"] = outcome.warning
            self._audit.submit(AuditEvent("auth", "accept" if outcome.ok else "refuse",
                                          actor=(outcome.identity or actor)[:320], client=client,
                                          rule=outcome.reason, detail=detail))  # fmt: skip

    async def check_password(self, username: str, password: str, *, client: str | None, protocol: str) -> AuthOutcome:
        account = account_key(username)
        while True:
            finished = self._finished  # taken with begin(), no await between: no finish is missed
            ticket = self.throttle.begin(account, client)
            if not ticket.busy:
                break
            await finished.wait()  # a burst of right passwords waits its turn instead of being refused
        if not ticket.allowed:
            outcome = AuthOutcome(False, None, "locked", ticket.retry_after)
            self._record(outcome, actor=account, client=client, protocol=protocol, method="password")
            return outcome
        checked: bool | None = None  # None until a check ran: a cancelled wait is not a guess
        try:
            if ticket.wait > 0:
                await self.sleep(ticket.wait)
            checked = False  # from here on, a cancellation counts as a failure
            key = self.credentials.key(account, password)
            try:
                identity = await asyncio.to_thread(self._verify_cached, key, account, password)
            except Exception:  # the directory cannot answer: temporary, not a wrong password
                checked = None
                outcome = AuthOutcome(False, None, "unavailable")
                self._record(outcome, actor=account, client=client, protocol=protocol, method="password")
                return outcome
            checked = identity is not None
        finally:
            delay = self.throttle.finish(ticket, checked)
            self._finished.set()
            self._finished = asyncio.Event()
        if identity is None:
            outcome = AuthOutcome(False, None, "bad-credentials")
            self._record(outcome, actor=account, client=client, protocol=protocol, method="password")
            await self.sleep(delay)
            return outcome
        outcome = AuthOutcome(True, identity, "ok")
        self._record(outcome, actor=account, client=client, protocol=protocol, method="password")
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
        with _FULL_CHECKS, self._factory() as session, session.begin():
            box = passwords.verify_password(session, username, password)
            if box is None:
                return None
            address, stored = box.address, box.password_hash
        if stored:  # after the commit: the hash now stored (rehashed if its parameters were old)
            self.credentials.put(key, address, stored)
        return address

    async def check_certificate(self, der: bytes, *, client: str | None, protocol: str) -> AuthOutcome:
        """The APP/ORG mailbox whose registered certificate this verified TLS client certificate is."""
        try:
            outcome = await asyncio.to_thread(self._match_certificate, der)
        except Exception as exc:  # directory or trust store unreadable: temporary
            log.warning("certificate login outcome=unavailable error=%s", type(exc).__name__)
            outcome = AuthOutcome(False, None, "unavailable")
        if outcome.warning:
            log.warning("certificate login of %s accepted with crl_status=%s (crypto.crl_soft_fail)",
                        outcome.identity, outcome.warning.removeprefix("crl-"))
        self._record(outcome, actor="(certificate)", client=client, protocol=protocol, method="certificate")
        return outcome

    def _match_certificate(self, der: bytes) -> AuthOutcome:
        cert = x509.load_der_x509_certificate(der)
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        with self._readers() as session, session.begin():
            rows = session.execute(
                select(Certificate.address, Certificate.revoked_at).where(
                    Certificate.fingerprint == fingerprint, Certificate.purpose.in_(["tls-client", "smime"]),
                    Certificate.address.is_not(None))
            ).all()
            live = sorted({r.address for r in rows if r.revoked_at is None and r.address})
            if not live:
                return AuthOutcome(False, None, "revoked" if rows else "unknown-certificate")
            boxes = [b for b in session.scalars(select(Mailbox).where(Mailbox.address.in_(live))) if b.local]
            software = [b for b in boxes if b.type in (MailboxType.APP, MailboxType.ORG)]
            if not software:
                return AuthOutcome(False, None, "certificate-not-for-software" if boxes else "unknown-certificate")
            active = [b.address for b in software if b.active]
            if not active:
                return AuthOutcome(False, None, "inactive")
            identity = active[0]
        result = self.keystore.trust_store().validate(cert, purpose="clientAuth")
        if not result.valid:
            return AuthOutcome(False, None, _CHAIN_FAILURES.get(result.failure or "", "untrusted-certificate"))
        if result.crl_status in ("stale", "unavailable"):
            reason = f"crl-{result.crl_status}"
            if not self.crl_soft_fail:
                return AuthOutcome(False, None, reason)
            return AuthOutcome(True, identity, "ok", warning=reason)
        return AuthOutcome(True, identity, "ok")


#: Why a client certificate did not log in, in words (the reason codes of ``Authenticator``).
_CERTIFICATE_REFUSALS = {
    "unknown-certificate": "Client certificate not registered for a mailbox",
    "revoked": "Client certificate revoked",
    "expired": "Client certificate expired",
    "not-yet-valid": "Client certificate not valid yet",
    "untrusted-certificate": "Client certificate not valid for client authentication",
    "certificate-not-for-software": "Client certificate login is for APP and ORG mailboxes",
    "inactive": "Mailbox of this client certificate is deactivated",
}


def certificate_refusal(reason: str, *, instead: str = "") -> Reply:
    """The reply to a client certificate that did not log in, the same on every edge (RFC 4954 6:
    530 5.7.0 "authentication required"; a revocation list that cannot be checked now is 454 4.7.0,
    an outage 451 4.3.5).  ``instead`` names what the client may do instead (the SMTP edge: AUTH)."""
    if reason in ("crl-stale", "crl-unavailable"):
        status = "stale" if reason == "crl-stale" else "unavailable"
        return R.S454_4_7_0_AUTH_UNAVAILABLE.with_text(
            f"Revocation list of the client certificate's issuer {status}, try again later")
    if reason == "unavailable":
        return R.S451_4_3_5_POLICY_UNAVAILABLE
    text = _CERTIFICATE_REFUSALS.get(reason, "Client certificate refused")
    if instead and reason != "inactive":
        text = f"{text}: {instead}"
    return R.S530_5_7_0_AUTH_REQUIRED.with_text(text)
