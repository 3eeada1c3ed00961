"""Attacks on the SMTP edge (issue 10: items 2, 7, 10, 11, 13), each as the exact bytes on a real listener.

Every test talks to the gateway's real submission (after STARTTLS) or inbound listener over
loopback with a raw TLS stream, so the bytes under test reach the server unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from smtp_world import DOMAIN, PASSWORD, CertFiles, PeerCerts, World, message, started, write_settings

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from gateway.app import Gateway
from gateway.audit.trail import query
from gateway.config import load_settings
from gateway.crypto import _mime
from gateway.policy.content import decide_content, inspect_content
from gateway.policy.limits import (
    EDGE_MAX_HEADER_BYTES,
    EDGE_MAX_HEADER_FIELDS,
    MAX_HEADER_BYTES,
    MAX_HEADER_FIELDS,
    MAX_MIME_DEPTH,
    MAX_PARTS,
)
from gateway.smtp.commands import GuardedSMTP

pytestmark = pytest.mark.asyncio

SECRET_WORDS = ("Glioblastome", "Seropositif", "Chimiotherapie")


class Raw:
    """A raw SMTP client: write exact bytes, read whole replies (multi-line folded into one list)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> tuple[int, str]:
        """The next reply: (code, text of its last line without the code)."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout=10)
            assert line, "connection closed instead of a reply"
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode().rstrip("\r\n")

    async def send(self, data: bytes) -> tuple[int, str]:
        self.writer.write(data if data.endswith(b"\n") else data + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def closed(self) -> list[bytes]:
        """Every line until the server closes the connection (waits on EOF, not on a clock)."""
        lines = []
        while line := await asyncio.wait_for(self.reader.readline(), timeout=10):
            lines.append(line)
        return lines


@asynccontextmanager
async def raw(world: World, listener: str = "submission", *, cert: CertFiles | None = None,
              tls: bool = True, login: bool = False) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port(listener))
    client = Raw(reader, writer)
    try:
        assert (await client.reply())[0] == 220
        assert (await client.send(b"EHLO client.test"))[0] == 250
        if tls:
            assert (await client.send(b"STARTTLS"))[0] == 220
            await writer.start_tls(world.client_context(cert), server_hostname="localhost")
            assert (await client.send(b"EHLO client.test"))[0] == 250
        if login:
            blob = base64.b64encode(f"\0sec@{DOMAIN}\0{PASSWORD}".encode())
            assert (await client.send(b"AUTH PLAIN " + blob))[0] == 235
        yield client
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def audit_records(world: World) -> list[dict[str, object]]:
    await world.gateway.audit.flush()
    with world.gateway.sessions() as db:  # type: ignore[misc]
        return list(query(db, limit=1000))


def has_surrogate(value: object) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in str(value))


# --- item 2: bytes that are not UTF-8 never reach a record or a log ------------------------------


async def test_non_utf8_paths_refused_before_anything_is_recorded(world: World,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with raw(world) as smtp:  # submission, after STARTTLS, not logged in
        assert await smtp.send(b"MAIL FROM:<\xff@x.example>") == (
            553, "5.1.7 Sender address is not valid UTF-8 without control characters")
        assert (await smtp.send(b"MAIL FROM:<a@x.example> SIZE=\xff"))[:1] == (553,)
        assert (await smtp.send(b"MAIL FROM:<a\x01b@x.example>"))[0] == 553  # a control character
        assert (await smtp.send(b"EHLO \xc3\x28.example"))[:1] == (501,)
        assert (await smtp.send(b"MAIL FROM:<\xc3\xa9@x.example>")) == (
            553, "5.6.7 Non-ASCII address without the SMTPUTF8 parameter on MAIL")
        # Valid UTF-8 with SMTPUTF8 reaches the policy (which wants a login here).
        assert (await smtp.send("MAIL FROM:<é@x.example> SMTPUTF8".encode()))[0] == 530
    async with raw(world, login=True) as smtp:
        assert (await smtp.send(f"MAIL FROM:<sec@{DOMAIN}>".encode()))[0] == 250
        assert await smtp.send(b"RCPT TO:<\xff@a.mssante.test>") == (
            553, "5.1.3 Recipient address is not valid UTF-8 without control characters")
        assert (await smtp.send("RCPT TO:<é@a.mssante.test>".encode()))[:1] == (553,)
    async with raw(world, "inbound", cert=world.certs.peer_b) as smtp:
        assert (await smtp.send(b"MAIL FROM:<\xff@b.mssante.test>"))[0] == 553
        assert (await smtp.send(b"MAIL FROM:<doc@b.mssante.test>"))[0] == 250
        assert (await smtp.send(b"RCPT TO:<bob\xfe@a.mssante.test>"))[0] == 553
        assert (await smtp.send(f"RCPT TO:<bob@{DOMAIN}>".encode()))[0] == 250
    records = await audit_records(world)
    assert records and not [r for r in records if has_surrogate(r)]
    assert not [r for r in caplog.records if has_surrogate(r.getMessage()) or "\\xff" in r.getMessage()]


# --- item 7: everything a client sends before DATA is bounded ------------------------------------


async def test_long_command_lines_answer_500_5_5_6_and_the_session_goes_on(world: World) -> None:
    async with raw(world, login=True) as smtp:
        code, text = await smtp.send(b"NOOP " + b"x" * 600)
        assert (code, text[:5]) == (500, "5.5.6")
        code, text = await smtp.send(f"MAIL FROM:<sec@{DOMAIN}> ".encode() + b"X" * 3000)  # past the reader's limit
        assert (code, text[:5]) == (500, "5.5.6")
        assert (await smtp.send(f"MAIL FROM:<sec@{DOMAIN}> SIZE=1000 BODY=8BITMIME".encode()))[0] == 250
        assert (await smtp.send(b"NOOP"))[0] == 250


async def test_a_bare_auth_is_a_501_and_the_session_goes_on(world: World) -> None:
    """Found by the session fuzzer: ``AUTH`` without a mechanism crashed the session's handler."""
    async with raw(world, login=False) as smtp:
        code, _ = await smtp.send(b"AUTH")
        assert code == 501
        assert (await smtp.send(b"NOOP"))[0] == 250


@pytest.mark.parametrize("listener", ["submission", "submissions", "inbound"])
async def test_starttls_under_tls_is_refused_and_the_session_goes_on(world: World, listener: str) -> None:
    """Found by the session fuzzer: a second STARTTLS nested TLS inside TLS (RFC 3207 4.2 offers it
    before TLS only), each layer with its own buffers."""
    if listener == "submissions":
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port(listener), ssl=world.client_context(),
                                                       server_hostname="localhost")
        smtp = Raw(reader, writer)
        assert (await smtp.reply())[0] == 220
        assert (await smtp.send(b"EHLO client.test"))[0] == 250
        try:
            assert await smtp.send(b"STARTTLS") == (503, "5.5.1 TLS is already active")
            assert (await smtp.send(b"NOOP"))[0] == 250
        finally:
            writer.close()
        return
    cert = world.certs.peer_b if listener == "inbound" else None
    async with raw(world, listener, cert=cert) as smtp:
        assert await smtp.send(b"STARTTLS") == (503, "5.5.1 TLS is already active")
        assert (await smtp.send(b"NOOP"))[0] == 250


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_300_mb_line_is_neither_buffered_nor_read_to_its_end(world: World) -> None:
    """The server (in this process) drops the line as it comes and hangs up past 64 KiB: RSS stays flat."""
    before = rss_kib()
    sent = 0
    chunk = b"A" * (1 << 20)
    async with raw(world, login=True) as smtp:
        with pytest.raises((ConnectionError, OSError)):  # the server hung up (its 421 may be lost to the reset)
            for _ in range(300):
                smtp.writer.write(chunk)
                await smtp.writer.drain()
                sent += len(chunk)
            await smtp.closed()
    async with raw(world, login=True) as smtp:  # the listener is fine
        assert (await smtp.send(b"NOOP"))[0] == 250
    assert sent < 64 << 20, f"{sent} bytes taken before the server hung up"
    assert rss_kib() - before < 32 * 1024, f"RSS grew by {rss_kib() - before} KiB"


async def test_repeated_errors_close_the_session_with_421(world: World) -> None:
    async with raw(world, login=True) as smtp:
        for _ in range(19):
            assert (await smtp.send(b"BOGUS"))[0] == 500
        code, _ = await smtp.send(b"BOGUS")
        assert code == 500
        assert (await smtp.closed())[-1].startswith(b"421 4.7.0 Too many errors")


async def test_sasl_responses_are_bounded(world: World) -> None:
    async with raw(world) as smtp:
        assert (await smtp.send(b"AUTH PLAIN"))[0] == 334
        code, text = await smtp.send(b"A" * 5000)
        assert (code, text[:5]) == (500, "5.5.6")
        assert (await smtp.send(b"AUTH LOGIN"))[0] == 334
        assert (await smtp.send(b"*"))[:1] == (501,)
        assert (await smtp.send(b"AUTH LOGIN"))[0] == 334
        smtp.writer.write(b"B" * (200 * 1024) + b"\r\n")
        try:  # 421 4.7.0, then the server hangs up without reading the rest (which may reset the reply)
            await smtp.writer.drain()
            assert (await smtp.reply())[0] == 421
        except (ConnectionError, OSError):
            pass
    async with raw(world) as smtp:
        assert (await smtp.send(b"AUTH PLAIN " + b"Q" * 1200))[:1] == (500,)
        assert (await smtp.send(b"NOOP"))[0] == 250


async def test_login_and_tls_deadlines(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GuardedSMTP, "pre_tls_seconds", 0.2)
    monkeypatch.setattr(GuardedSMTP, "pre_auth_seconds", 0.4)
    async with raw(world, tls=False) as smtp:  # never says STARTTLS
        assert (await smtp.closed())[-1].startswith(b"421 4.7.0 STARTTLS not done in time")
    async with raw(world) as smtp:  # TLS, never logs in
        assert (await smtp.closed())[-1].startswith(b"421 4.7.0 Login not done in time")
    async with raw(world, "inbound", cert=world.certs.peer_b) as smtp:  # a peer that never sends MAIL
        assert (await smtp.closed())[-1].startswith(b"421 4.7.0")


async def test_idle_session_is_told_421_4_4_2(gateway_home: Path, peer_certs: PeerCerts) -> None:
    write_settings(gateway_home, {"limits": {"session_timeout": 1}})
    settings = load_settings(gateway_home)
    gateway = Gateway(settings, workers=False, imap=False)
    await gateway.start()
    try:
        async with raw(World(gateway_home, settings, gateway, peer_certs), login=True) as smtp:
            assert (await smtp.closed())[-1].startswith(b"421 4.4.2")  # aiosmtpd only hung up
    finally:
        await gateway.stop()


# --- item 11: no client text in the logs ----------------------------------------------------


async def test_body_pipelined_after_a_refused_data_never_reaches_a_log(world: World,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = "".join(f"{w} stade {i} confirme\r\n" for i, w in enumerate(SECRET_WORDS * 10)).encode()
    async with raw(world, login=True) as smtp:
        smtp.writer.write(f"MAIL FROM:<sec@{DOMAIN}>\r\nRCPT TO:<nobody@{DOMAIN}>\r\nDATA\r\n".encode()
                          + b"Subject: " + SECRET_WORDS[0].encode() + b"\r\n\r\n" + body + b".\r\n")
        await smtp.writer.drain()
        lines = await smtp.closed()
    assert lines[-1].startswith(b"421 4.7.0 Too many errors")
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert not [w for w in (*SECRET_WORDS, "STADE", "SUBJECT") if w.lower() in logged.lower()], logged
    summaries = [r.getMessage() for r in caplog.records if "outcome=protocol-errors" in r.getMessage()]
    assert len(summaries) == 1 and "errors=20" in summaries[0] and "unknown=" in summaries[0]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1


async def test_a_good_message_still_goes_through(world: World) -> None:
    async with raw(world, login=True) as smtp:
        assert (await smtp.send(f"MAIL FROM:<sec@{DOMAIN}>".encode()))[0] == 250
        assert (await smtp.send(f"RCPT TO:<bob@{DOMAIN}>".encode()))[0] == 250
        assert (await smtp.send(b"DATA"))[0] == 354
        code, _ = await smtp.send(message() + b".\r\n")
        assert code == 250


# --- item 10: what DATA accepts never fails later for its shape ----------------------------------


@pytest.fixture
async def roomy_world(gateway_home: Path, peer_certs: PeerCerts) -> AsyncIterator[World]:
    """The test world with messages up to 2 MB (a header block of 256 KiB fits)."""
    write_settings(gateway_home, {"limits": {"max_message_size": 2_000_000}})
    async with started(gateway_home, peer_certs) as world:
        yield world


async def submit(world: World, data: bytes) -> tuple[int, str]:
    async with raw(world, login=True) as smtp:
        assert (await smtp.send(f"MAIL FROM:<sec@{DOMAIN}>".encode()))[0] == 250
        assert (await smtp.send(f"RCPT TO:<bob@{DOMAIN}>".encode()))[0] == 250
        assert (await smtp.send(b"DATA"))[0] == 354
        return await smtp.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")


def with_headers(extra: bytes) -> bytes:
    return message().replace(b"MIME-Version:", extra + b"MIME-Version:", 1)


def nested(depth: int) -> bytes:
    opening = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    head = message().split(b"MIME-Version:")[0] + b"MIME-Version: 1.0\r\n"
    return head + opening + b"Content-Type: text/plain\r\n\r\nfin\r\n" + closing


def stored_shape_is_readable(world: World, reply: str) -> None:
    """The workers' own header parser reads what was queued (no MimeError later)."""
    queue_id = reply.rsplit(" ", 1)[1]
    assert world.gateway.store is not None
    stored = world.gateway.store.read(queue_id)
    assert _mime.parse_headers(_mime.header_block(stored))


async def test_header_limits_refused_at_data_and_what_passes_is_readable_later(roomy_world: World) -> None:
    world = roomy_world
    code, text = await submit(world, with_headers(b"X-Pad: x\r\n" * (MAX_HEADER_FIELDS + 100)))
    assert (code, text[:5]) == (550, "5.6.0") and "header fields" in text
    big = b"X-Pad: " + b"y" * 990 + b"\r\n"
    code, text = await submit(world, with_headers(big * (MAX_HEADER_BYTES // len(big) + 1)))
    assert (code, text[:5]) == (552, "5.3.4") and "header block" in text
    code, text = await submit(world, with_headers(b"X-Pad: x\r\n" * (EDGE_MAX_HEADER_FIELDS - 10)))
    assert code == 250, text
    stored_shape_is_readable(world, text)
    code, text = await submit(world, with_headers(big * (EDGE_MAX_HEADER_BYTES // len(big) - 1)))
    assert code == 250, text
    stored_shape_is_readable(world, text)


async def test_deep_or_wide_mime_refused_for_good_not_451(world: World) -> None:
    code, text = await submit(world, nested(1000))
    assert (code, text[:5]) == (550, "5.6.0") and "nested" in text
    parts = b"".join(b"--w\r\nContent-Type: text/plain\r\n\r\n%d\r\n" % i for i in range(MAX_PARTS + 1))
    wide = message().split(b"MIME-Version:")[0] + (b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="w"'
                                                  b"\r\n\r\n" + parts + b"--w--\r\n")
    code, text = await submit(world, wide)
    assert (code, text[:5]) == (550, "5.6.0") and "parts" in text
    code, text = await submit(world, nested(MAX_MIME_DEPTH - 1))
    assert code == 250, text


async def test_shape_scan_is_linear() -> None:
    """The pre-scan and the header checks take time in proportion to the bytes, not worse."""
    for data in (nested(1000), b"Subject: x\r\n" + b" y\r\n" * 60_000 + b"\r\nbody\r\n"):
        started = time.perf_counter()
        facts = inspect_content(data)
        assert time.perf_counter() - started < 1.0
        assert not decide_content(facts).accepted or facts.mime_depth <= MAX_MIME_DEPTH


# --- item 13: Sender:/Resent-*: and wildcard peer certificates -------------------------------------


@pytest.mark.parametrize("field", [b"Sender", b"Resent-From", b"Resent-Sender"])
async def test_sender_and_resent_fields_must_be_owned(world: World, field: bytes) -> None:
    code, text = await submit(world, with_headers(field + f": Bob <bob@{DOMAIN}>\r\n".encode()))
    assert (code, text[:5]) == (550, "5.7.1") and f"{field.decode()}: header" in text, text
    code, text = await submit(world, with_headers(field + f": sec@{DOMAIN}\r\n".encode()))
    assert code == 250, text


async def test_wildcard_peer_certificate_speaks_for_no_operator(world: World, tmp_path: Path) -> None:
    cert, key = issue_certificate(load_dev_pki(world.home / "pki"), kind="operator", dns_names=["*.mssante.test"],
                                  common_name="wildcard-operator")  # fmt: skip
    files = CertFiles(tmp_path / "wild.pem", tmp_path / "wild.key")
    save_certificate_and_key(cert, key, files.cert, files.key)
    async with raw(world, "inbound", cert=files) as smtp:
        code, text = await smtp.send(b"MAIL FROM:<doc@b.mssante.test>")
        assert (code, text[:5]) == (550, "5.7.1") and "does not belong" in text
        code, text = await smtp.send(b"MAIL FROM:<>")
        assert (code, text[:5]) == (550, "5.7.1")
    async with raw(world, "inbound", cert=world.certs.peer_b) as smtp:  # the operator's own certificate
        assert (await smtp.send(b"MAIL FROM:<doc@b.mssante.test>"))[0] == 250


async def test_content_in_memory_is_bounded_process_wide(roomy_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel large DATA transactions share one memory budget: past it, 452 4.3.1 (try later),
    what was buffered is let go, and the next message that fits is accepted."""
    from gateway.smtp import server

    world = roomy_world
    monkeypatch.setattr(server.DATA_BUDGET, "total", 256 * 1024)
    body = b"x" * 990 + b"\r\n"
    big = message().replace(b"\r\n\r\n", b"\r\n\r\n" + body * 400, 1)  # ~400 KiB
    code, text = await submit(world, big)
    assert (code, text[:5]) == (452, "4.3.1"), text
    assert server.DATA_BUDGET.held == 0
    results = await asyncio.gather(*(submit(world, message().replace(b"\r\n\r\n", b"\r\n\r\n" + body * 100, 1))
                                     for _ in range(5)))
    assert {code for code, _ in results} <= {250, 452}
    assert 250 in {code for code, _ in results}
    assert server.DATA_BUDGET.held == 0
    code, text = await submit(world, message())
    assert code == 250, text
