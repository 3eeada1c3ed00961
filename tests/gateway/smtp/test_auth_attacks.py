"""Attacks on logins (issue 10, items 4-6), each against the real submission listener over TLS.

- Client certificates: only the certificate registered for an APP/ORG mailbox logs in, and
  only while it is unrevoked (directory and CRL), unexpired, with ``crypto.crl_soft_fail``
  deciding what a stale or missing CRL means.
- Throttle: attempts are counted before the Argon2 check (parallel logins cannot race past
  the limit), on the normalised address the login uses.
- Lockout: an attacker locks out only his own source, never the clinician's other sources.

Delays go through ``Authenticator.sleep`` and time through ``Throttle.clock``: the tests
replace both and never wait on the wall clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import threading
from base64 import b64encode
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from smtp_world import (
    DOMAIN,
    PASSWORD,
    CertFiles,
    PeerCerts,
    World,
    message,
    populate,
    started,
    write_settings,
)

from certs.pki import issue_certificate, load_certificate, load_dev_pki, load_private_key, revoke_certificate
from certs.pki import save_certificate_and_key as save_pair
from cli.main import cli
from directory import passwords
from directory.certificates import register_certificate
from directory.db import transaction
from gateway.auth import Authenticator, Throttle
from gateway.config import load_settings

SEC = f"sec@{DOMAIN}"
APP = f"app@{DOMAIN}"


@asynccontextmanager
async def running(home: Path, certs: PeerCerts, extra: dict[str, dict[str, object]] | None = None
                  ) -> AsyncIterator[World]:
    """A gateway like the ``world`` fixture's, with settings overridden by ``extra``."""
    write_settings(home, extra)
    populate(load_settings(home), certs)
    async with started(home, certs) as world:
        yield world


def authenticator(world: World) -> Authenticator:
    auth = world.gateway.authenticator
    assert auth is not None
    return auth


class Sleeps:
    """Stands in for ``asyncio.sleep`` in the Authenticator: records each delay, returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class CountingHasher:
    """Wraps the directory's Argon2 hasher and counts real password checks (``verify`` calls)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.verifies = 0

    def verify(self, stored: str, password: str) -> bool:
        with self._lock:
            self.verifies += 1
        return bool(self._inner.verify(stored, password))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def cmd(smtp: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    verb, _, arg = line.partition(" ")
    response = await smtp.execute_command(verb.encode(), *([arg.encode()] if arg else []))
    return response.code, response.message


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + b64encode(f"\0{user}\0{password}".encode()).decode()


async def auth_from(world: World, source: str, user: str, password: str) -> tuple[int, str]:
    """One AUTH PLAIN over implicit TLS from the loopback address ``source`` (127.0.0.0/8 all work)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port("submissions"), use_tls=True,
                           tls_context=world.client_context(), timeout=30, source_address=(source, 0))
    await smtp.connect()
    try:
        await smtp.ehlo()
        return await cmd(smtp, plain(user, password))
    finally:
        await smtp.quit()


async def mail_with_certificate(world: World, cert: CertFiles) -> tuple[int, str]:
    """STARTTLS with ``cert`` as client certificate, no AUTH, then MAIL FROM the APP mailbox."""
    smtp = world.client(cert=cert)
    await smtp.connect()
    try:
        await smtp.starttls(server_hostname="localhost")
        await smtp.ehlo()
        code, text = await cmd(smtp, f"MAIL FROM:<{APP}>")
        if code == 250:
            assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
            response = await smtp.data(message(sender=APP))
            return response.code, response.message
        return code, text
    finally:
        await smtp.quit()


def issue_app_cert(world: World, name: str, **kwargs: Any) -> CertFiles:
    """A certificate from the operator's own (client) CA for app@, written next to the test's home."""
    pki = load_dev_pki(world.home / "pki")
    cert, key = issue_certificate(pki, kind="app", email=APP, **kwargs)
    files = CertFiles(world.home / f"{name}.pem", world.home / f"{name}.key")
    save_pair(cert, key, files.cert, files.key)
    return files


def write_crl(world: World, *, last_update: dt.datetime, next_update: dt.datetime) -> None:
    """Re-sign the dev CA's CRL (no entries) with the given dates, in place of ``pki/crl.pem``."""
    pki = load_dev_pki(world.home / "pki")
    crl = (x509.CertificateRevocationListBuilder().issuer_name(load_certificate(pki.ca_cert).subject)
           .last_update(last_update).next_update(next_update)
           .sign(load_private_key(pki.ca_key), hashes.SHA256()))
    pki.crl.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def stale_crl(world: World) -> None:
    now = dt.datetime.now(dt.UTC)
    write_crl(world, last_update=now - dt.timedelta(days=10), next_update=now - dt.timedelta(days=3))


# --- item 4: client certificates ------------------------------------------------------------------


async def test_registered_certificate_logs_in(world: World) -> None:
    code, text = await mail_with_certificate(world, world.certs.app)
    assert code == 250, text


async def test_revoked_certificate_no_longer_logs_in(world: World) -> None:
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["--data-dir", str(world.home), "certs", "revoke", APP])
    assert result.exit_code == 0, result.output
    code, text = await mail_with_certificate(world, world.certs.app)
    assert (code, text[:5]) == (530, "5.7.0"), text
    assert "revoked" in text


async def test_certificate_on_the_crl_only_is_refused(world: World) -> None:
    """The directory still says valid; the issuer's CRL says revoked: the CRL wins."""
    serial = x509.load_pem_x509_certificate(world.certs.app.cert.read_bytes()).serial_number
    revoke_certificate(load_dev_pki(world.home / "pki"), serial)
    authenticator(world).keystore.invalidate()  # the trust store's CRLs are cached for 30 s
    code, text = await mail_with_certificate(world, world.certs.app)
    assert (code, text[:5]) == (530, "5.7.0") and "revoked" in text, text


async def test_unregistered_certificate_naming_an_app_mailbox_is_refused(world: World) -> None:
    """Issued by the client CA for app@ (e-mail in the SAN), but not the one registered for app@."""
    other = issue_app_cert(world, "unregistered")
    code, text = await mail_with_certificate(world, other)
    assert (code, text[:5]) == (530, "5.7.0") and "not registered" in text, text


async def test_expired_registered_certificate_is_refused(world: World) -> None:
    """The TLS handshake already refuses it; the Authenticator refuses it on its own too."""
    now = dt.datetime.now(dt.UTC)
    old = issue_app_cert(world, "expired", not_before=now - dt.timedelta(days=400),
                         not_after=now - dt.timedelta(days=1))
    pem = old.cert.read_bytes()
    assert world.gateway.sessions is not None
    with transaction(world.gateway.sessions) as db:
        register_certificate(db, pem, address=APP, purpose="tls-client")
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    outcome = await authenticator(world).check_certificate(der, client="192.0.2.1", protocol="smtp")
    assert (outcome.ok, outcome.reason) == (False, "expired")
    with pytest.raises((aiosmtplib.SMTPException, OSError)):
        await mail_with_certificate(world, old)


async def test_stale_crl_with_soft_fail_logs_in_with_a_warning(world: World,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    assert world.settings.crypto.crl_soft_fail is True
    stale_crl(world)
    with caplog.at_level(logging.WARNING, logger="mssgw.auth"):
        code, text = await mail_with_certificate(world, world.certs.app)
    assert code == 250, text
    assert any("crl_status=stale" in r.getMessage() for r in caplog.records)


async def test_stale_or_missing_crl_with_hard_fail_is_a_temporary_refusal(sqlite_home: Path,
                                                                          peer_certs: PeerCerts) -> None:
    async with running(sqlite_home, peer_certs, {"crypto": {"crl_soft_fail": False}}) as world:
        assert (await mail_with_certificate(world, world.certs.app))[0] == 250  # fresh CRL: fine
        stale_crl(world)
        authenticator(world).keystore.invalidate()
        code, text = await mail_with_certificate(world, world.certs.app)
        assert (code, text[:5]) == (454, "4.7.0") and "stale" in text, text
        (world.home / "pki" / "crl.pem").unlink()
        authenticator(world).keystore.invalidate()
        code, text = await mail_with_certificate(world, world.certs.app)
        assert (code, text[:5]) == (454, "4.7.0") and "unavailable" in text, text


async def test_password_login_still_works_with_a_refused_certificate(world: World) -> None:
    """A refused certificate is not a session killer: AUTH is still possible."""
    other = issue_app_cert(world, "unregistered")
    smtp = world.client(cert=other)
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo()
    assert (await cmd(smtp, plain(SEC, PASSWORD)))[0] == 235
    assert (await cmd(smtp, f"MAIL FROM:<{SEC}>"))[0] == 250
    await smtp.quit()


# --- item 5: counting before the check, on the normalised address ---------------------------------


async def parallel_wrong_logins(world: World, users: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, set[int]]:
    """Every user in ``users`` tried at once with a wrong password from 127.0.0.1; (Argon2 checks, codes)."""
    hasher = CountingHasher(passwords._HASHER)
    passwords._dummy_hash()  # made before counting starts
    monkeypatch.setattr(passwords, "_HASHER", hasher)
    authenticator(world).sleep = Sleeps()
    results = await asyncio.gather(*(auth_from(world, "127.0.0.1", u, "wrong password!!") for u in users))
    return hasher.verifies, {code for code, _ in results}


async def test_parallel_wrong_logins_are_counted_before_the_check(sqlite_home: Path, peer_certs: PeerCerts,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(sqlite_home, peer_certs, {"auth": {"max_failures": 5}}) as world:
        checks, codes = await parallel_wrong_logins(world, [SEC] * 100, monkeypatch)
    assert checks <= 5, f"{checks} real password checks for 100 parallel wrong logins (limit 5)"
    assert codes == {535, 454}


async def test_username_variants_count_as_one_account(sqlite_home: Path, peer_certs: PeerCerts,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    variants = [f" {SEC}", f"<{SEC}>", SEC.upper(), f" <{SEC.title()}> ", SEC]
    async with running(sqlite_home, peer_certs, {"auth": {"max_failures": 5}}) as world:
        checks, _ = await parallel_wrong_logins(world, variants * 20, monkeypatch)
        assert checks <= 5, f"{checks} real password checks for 100 parallel wrong logins with variants"
        assert (await auth_from(world, "127.0.0.1", SEC, PASSWORD))[0] == 454  # this source, this account


async def test_a_burst_of_right_logins_from_one_source_all_get_in(world: World) -> None:
    """Attempts in flight count against the limit (3 here), but the ones beyond it wait, not fail."""
    results = await asyncio.gather(*(auth_from(world, "127.0.0.1", SEC, PASSWORD) for _ in range(12)))
    assert [code for code, _ in results] == [235] * 12


# --- item 6: no lockout as a weapon ---------------------------------------------------------------


async def test_attacker_cannot_lock_the_clinician_out(world: World) -> None:
    sleeps = authenticator(world).sleep = Sleeps()
    for _ in range(10):  # auth.max_failures = 3 here: the attacker's own source is locked after 3
        assert (await auth_from(world, "127.0.0.66", SEC, "guess!!"))[0] in (535, 454)
    assert (await auth_from(world, "127.0.0.66", SEC, PASSWORD))[0] == 454
    code, text = await auth_from(world, "127.0.0.1", SEC, PASSWORD)  # the clinician, from elsewhere
    assert code == 235, text
    assert max(sleeps.delays) <= world.settings.auth.max_delay


async def test_other_accounts_from_an_attacking_source_are_refused_too(world: World) -> None:
    """Username rotation from one source hits the per-source limit (4 x max_failures)."""
    authenticator(world).sleep = Sleeps()
    codes = [(await auth_from(world, "127.0.0.77", f"user{i}@{DOMAIN}", "guess!!"))[0] for i in range(14)]
    assert codes[:12] == [535] * 12 and codes[12:] == [454, 454]
    assert (await auth_from(world, "127.0.0.77", SEC, PASSWORD))[0] == 454
    assert (await auth_from(world, "127.0.0.78", SEC, PASSWORD))[0] == 235


# --- the throttle on its own: injected clock and sleep --------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: FakeClock, **kwargs: Any) -> Throttle:
    return Throttle(max_failures=5, lockout_seconds=900, base_delay=0.5, max_delay=8.0, clock=clock, **kwargs)


def fail(t: Throttle, account: str, source: str) -> float:
    ticket = t.begin(account, source)
    assert ticket.allowed, ticket
    return t.finish(ticket, ok=False)


def test_account_wide_failures_grow_the_delay_but_never_lock() -> None:
    clock = FakeClock()
    t = throttle(clock)
    delays = []
    for i in range(40):  # a distributed attack: one guess from each of 40 sources
        ticket = t.begin(SEC, f"198.51.100.{i}")
        assert ticket.allowed
        delays.append(ticket.wait)
        t.finish(ticket, ok=False)
    assert delays[:5] == [0.0] * 5 and delays[5] == 0.5 and delays[6] == 1.0 and delays[-1] == 8.0
    assert delays == sorted(delays)
    ticket = t.begin(SEC, "203.0.113.5")  # the clinician, new address: delayed, never refused
    assert ticket.allowed and ticket.wait == 8.0
    t.finish(ticket, ok=True)
    trusted = t.begin(SEC, "203.0.113.5")  # a source that logged in before skips the account-wide delay
    assert trusted.allowed and trusted.wait == 0.0
    clock.now += 901  # the streak is forgotten
    assert t.begin(SEC, "198.51.100.200").wait == 0.0


def test_source_and_pair_locks_expire() -> None:
    clock = FakeClock()
    t = throttle(clock)
    for _ in range(5):
        fail(t, SEC, "192.0.2.1")
    locked = t.begin(SEC, "192.0.2.1")
    assert not locked.allowed and locked.retry_after == 900
    assert t.begin(f"bob@{DOMAIN}", "192.0.2.1").allowed  # pair lock: other accounts from there still try
    clock.now += 901
    assert t.begin(SEC, "192.0.2.1").allowed


def test_in_flight_attempts_count() -> None:
    t = throttle(FakeClock())
    tickets = [t.begin(SEC, "192.0.2.1") for _ in range(100)]
    assert sum(tk.allowed for tk in tickets) == 5 and all(tk.busy for tk in tickets if not tk.allowed)
    for tk in tickets[:5]:
        t.finish(tk, ok=False)
    assert not t.begin(SEC, "192.0.2.1").busy  # now locked for good: refused, not waiting


def test_ipv6_sources_share_their_64() -> None:
    t = throttle(FakeClock())
    for i in range(5):
        fail(t, SEC, f"2001:db8:1:2::{i + 1}")
    assert not t.begin(SEC, "2001:db8:1:2:ffff::9").allowed
    assert t.begin(SEC, "2001:db8:1:3::1").allowed
    assert t.source_key("::ffff:192.0.2.7") == t.source_key("192.0.2.7")


def test_counters_are_bounded() -> None:
    t = throttle(FakeClock(), capacity=200)
    for i in range(5_000):  # rotating usernames and addresses
        fail(t, f"u{i}@{DOMAIN}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert t.size() <= 4 * 200


class PeakHasher(CountingHasher):
    """Also records how many Argon2 checks ran at the same moment."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.running = 0
        self.peak = 0

    def verify(self, stored: str, password: str) -> bool:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return super().verify(stored, password)
        finally:
            with self._lock:
                self.running -= 1


async def test_a_burst_of_first_logins_runs_a_bounded_number_of_argon2_checks_at_once(
        operator_home: Path, peer_certs: PeerCerts, monkeypatch: pytest.MonkeyPatch) -> None:
    """40 first logins to 40 accounts from 40 sources (no throttle applies, nothing cached): each
    full check holds 19 MiB, so only a few run at once, process-wide. (On SQLite the checks
    also take turns on the write lock; PostgreSQL runs them side by side.)"""
    async with running(operator_home, peer_certs) as world:
        await _burst_of_first_logins(world, monkeypatch)


async def _burst_of_first_logins(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    hasher = PeakHasher(passwords._HASHER)
    passwords._dummy_hash()
    monkeypatch.setattr(passwords, "_HASHER", hasher)
    authenticator(world).sleep = Sleeps()
    users = [f"nobody{i}@{DOMAIN}" for i in range(39)] + [SEC]
    results = await asyncio.gather(*(auth_from(world, f"127.0.0.{10 + i}", u, "wrong password!!")
                                     for i, u in enumerate(users)))
    assert {code for code, _ in results} == {535}
    assert hasher.verifies == 40
    assert hasher.peak <= max(2, os.cpu_count() or 2), f"{hasher.peak} Argon2 checks at once"


async def test_a_password_typed_as_the_username_is_never_recorded(world: World) -> None:
    """A username that is no address is kept only as a digest: the audit trail never holds it."""
    from gateway.audit.trail import query

    code, _ = await auth_from(world, "127.0.0.1", "my secret passphrase", "whatever it was")
    assert code == 535
    await world.gateway.audit.flush()  # type: ignore[union-attr]
    with world.gateway.sessions() as db:  # type: ignore[misc]
        records = list(query(db, event="auth", limit=100))
    assert records and all("passphrase" not in repr(r) for r in records), records


async def test_mechanism_names_are_case_insensitive(world: World) -> None:
    """RFC 4954 4: ``AUTH plain`` is ``AUTH PLAIN`` (aiosmtpd alone answered 504 5.5.4)."""
    code, text = await auth_from(world, "127.0.0.1", SEC, PASSWORD)
    assert code == 235, text
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port("submissions"), use_tls=True,
                           tls_context=world.client_context(), timeout=30)
    await smtp.connect()
    try:
        await smtp.ehlo()
        assert await cmd(smtp, plain(SEC, PASSWORD).replace("AUTH PLAIN", "AUTH pLaIn")) == (
            235, "2.7.0 Authentication successful")
    finally:
        await smtp.quit()
