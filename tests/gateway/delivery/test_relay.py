"""The relay against plain aiosmtpd servers on loopback: STARTTLS required, verified peer, per-recipient replies."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from cryptography import x509

from gateway.config import load_settings
from gateway.delivery.relay import DsnRequest, Relay, Route, dn_equal, xtext
from gateway.smtp.dsn import xtext_decode
from tests.ports import free_port

MESSAGE = b"From: a@a.mssante.test\r\nTo: b@b.test\r\nSubject: x\r\n\r\nciphertext stands here\r\n"


class Sink:
    def __init__(self, replies: dict[str, str] | None = None) -> None:
        self.replies = replies or {}
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.client_certs: list[bytes | None] = []

    async def handle_RCPT(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        reply = self.replies.get(address, "250 2.1.5 OK")
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        ssl_object = session.ssl.get("ssl_object") if session.ssl else None
        self.client_certs.append(ssl_object.getpeercert(binary_form=True) if ssl_object else None)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued"


async def _serve(sink: Sink, tls: ssl.SSLContext | None) -> tuple[asyncio.Server, int]:
    port = free_port()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: AioSMTP(sink, tls_context=tls, require_starttls=tls is not None, hostname="peer.test"),
        "127.0.0.1", port,
    )  # fmt: skip
    return server, port


def _server_tls(home: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(home / "pki" / "server.pem", home / "pki" / "server.key")
    ctx.load_verify_locations(home / "pki" / "ca.pem")
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _relay(home: Path) -> Relay:
    settings = load_settings(home)
    return Relay(settings, anchors_pem=[(home / "pki" / "ca.pem").read_bytes()])


def _server_dn(home: Path) -> str:
    return x509.load_pem_x509_certificate((home / "pki" / "server.pem").read_bytes()).subject.rfc4514_string()


async def test_per_recipient_replies_and_mutual_tls(sqlite_home: Path) -> None:
    sink = Sink({"bad@b.test": "550 5.1.1 no such mailbox", "later@b.test": "451 4.2.0 try later"})
    server, port = await _serve(sink, _server_tls(sqlite_home))
    try:
        route = Route("b.test", "127.0.0.1", port, _server_dn(sqlite_home))
        relay = _relay(sqlite_home)
        attempts = await relay.send(route, "a@a.mssante.test", ["ok@b.test", "bad@b.test", "later@b.test"],
                                    MESSAGE)  # fmt: skip
        await relay.close()
    finally:
        server.close()
        await server.wait_closed()
    by = {a.address: a for a in attempts}
    assert by["ok@b.test"].ok and by["ok@b.test"].enhanced == "2.0.0"
    assert by["bad@b.test"].permanent and by["bad@b.test"].enhanced == "5.1.1"
    assert not by["later@b.test"].ok and not by["later@b.test"].permanent
    assert len(sink.messages) == 1 and sink.messages[0][1] == ["ok@b.test"]
    assert sink.messages[0][2] == MESSAGE
    operator = x509.load_pem_x509_certificate((sqlite_home / "pki" / "operator.pem").read_bytes())
    assert sink.client_certs[0] is not None
    assert x509.load_der_x509_certificate(sink.client_certs[0]) == operator  # our client certificate


class SlowToAccept(Sink):
    """A peer that takes its time to answer the final "." (storing, checking, scanning)."""

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        await asyncio.sleep(2.5)  # the peer's own work: this slowness is what is under test
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize(("data_timeout", "delivered"), [(30.0, True), (1.5, False)])
async def test_the_reply_to_the_final_dot_is_awaited_longer_than_a_command(
    sqlite_home: Path, data_timeout: float, delivered: bool
) -> None:
    """RFC 5321 §4.5.3.2.6: 10 minutes for the reply to the final "." (``DATA_TIMEOUT``), more than
    any other command; giving up sooner resends a message the peer then accepted."""
    sink = SlowToAccept()
    server, port = await _serve(sink, _server_tls(sqlite_home))
    try:
        relay = Relay(load_settings(sqlite_home), anchors_pem=[(sqlite_home / "pki" / "ca.pem").read_bytes()],
                      timeout=1.5, data_timeout=data_timeout)  # fmt: skip
        (attempt,) = await relay.send(Route("b.test", "127.0.0.1", port, _server_dn(sqlite_home)),
                                      "a@a.mssante.test", ["ok@b.test"], MESSAGE)  # fmt: skip
        await relay.close()
    finally:
        server.close()
        await server.wait_closed()
    assert attempt.ok is delivered, attempt
    if not delivered:  # a command's time is not enough
        assert attempt.code == 451 and attempt.enhanced == "4.4.2"


async def test_no_starttls_means_nothing_is_sent(sqlite_home: Path) -> None:
    sink = Sink()
    server, port = await _serve(sink, None)
    try:
        attempts = await _relay(sqlite_home).send(Route("b.test", "127.0.0.1", port), "a@a.mssante.test",
                                                  ["x@b.test"], MESSAGE)  # fmt: skip
    finally:
        server.close()
        await server.wait_closed()
    assert attempts[0].code == 454 and attempts[0].enhanced == "4.7.5" and "STARTTLS" in attempts[0].text
    assert sink.messages == []


async def test_a_peer_without_dsn_gets_no_dsn_parameters(sqlite_home: Path) -> None:
    """RFC 3461 §6.2: the request goes only to a peer that advertises DSN.  Plain aiosmtpd does
    not, and answers 555 to parameters it does not know: the message still goes, and the attempt
    says the peer did not take the request (so the pipeline sends the "relayed" notice)."""
    sink = Sink()
    server, port = await _serve(sink, _server_tls(sqlite_home))
    request = DsnRequest(envid="e 1", ret="HDRS", recipients={"ok@b.test": ("SUCCESS", "rfc822;ok@b.test")})
    try:
        relay = _relay(sqlite_home)
        (attempt,) = await relay.send(Route("b.test", "127.0.0.1", port, _server_dn(sqlite_home)),
                                      "a@a.mssante.test", ["ok@b.test"], MESSAGE, request)  # fmt: skip
        await relay.close()
    finally:
        server.close()
        await server.wait_closed()
    assert attempt.ok and not attempt.dsn_passed
    assert [m[1] for m in sink.messages] == [["ok@b.test"]]


def test_dsn_parameters_are_xtext_encoded() -> None:
    """RFC 3461 §4: "+", "=", space and non-ASCII octets as "+XX"; decoded back by our own SMTP edge."""
    assert xtext("rx 42+=\u00e9") == "rx+2042+2B+3D+C3+A9"
    request = DsnRequest(envid="e 1", ret="FULL", recipients={"b@b.test": ("SUCCESS,DELAY", "rfc822;b+x@b.test")})
    assert request.mail_options() == ["RET=FULL", "ENVID=e+201"]
    assert request.rcpt_options("b@b.test") == ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;b+2Bx@b.test"]
    assert request.rcpt_options("other@b.test") == []
    assert xtext_decode(xtext("printable: a+b=c"), "ENVID") == "printable: a+b=c"


async def test_operator_dn_is_pinned(sqlite_home: Path) -> None:
    sink = Sink()
    server, port = await _serve(sink, _server_tls(sqlite_home))
    try:
        route = Route("b.test", "127.0.0.1", port, "CN=mx.other.test,O=Other,C=FR")
        attempts = await _relay(sqlite_home).send(route, "a@a.mssante.test", ["x@b.test"], MESSAGE)
    finally:
        server.close()
        await server.wait_closed()
    assert attempts[0].enhanced == "4.7.5" and "does not match the operator DN" in attempts[0].text
    assert sink.messages == []


async def test_connection_refused_is_temporary(sqlite_home: Path) -> None:
    attempts = await _relay(sqlite_home).send(Route("b.test", "127.0.0.1", free_port()), "a@a.mssante.test",
                                              ["x@b.test"], MESSAGE)  # fmt: skip
    assert attempts[0].code == 451 and attempts[0].enhanced == "4.4.1" and not attempts[0].permanent


async def test_connections_are_reused_one_transaction_at_a_time(sqlite_home: Path) -> None:
    sink = Sink()
    opened: list[AioSMTP] = []
    port = free_port()
    tls = _server_tls(sqlite_home)

    def factory() -> AioSMTP:
        proto = AioSMTP(sink, tls_context=tls, require_starttls=True, hostname="peer.test")
        opened.append(proto)
        return proto

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", port)
    relay = Relay(load_settings(sqlite_home), anchors_pem=[(sqlite_home / "pki" / "ca.pem").read_bytes()],
                  pool_size=2)  # fmt: skip
    route = Route("b.test", "127.0.0.1", port, _server_dn(sqlite_home))
    try:
        for i in range(3):  # one after the other: one connection, reset between messages
            attempts = await relay.send(route, "a@a.mssante.test", [f"r{i}@b.test"], MESSAGE)
            assert attempts[0].ok
        assert len(opened) == 1
        # Five at once with a pool of two: never more than two connections, every message delivered.
        results = await asyncio.gather(*(relay.send(route, "a@a.mssante.test", [f"c{i}@b.test"], MESSAGE)
                                         for i in range(5)))  # fmt: skip
        assert all(r[0].ok for r in results)
        assert len(opened) == 2
        # A pooled connection the peer has dropped is noticed (RSET fails) and replaced.
        for proto in opened:
            if proto.transport is not None:
                proto.transport.close()
        attempts = await relay.send(route, "a@a.mssante.test", ["after@b.test"], MESSAGE)
        assert attempts[0].ok
        assert len(opened) == 3
    finally:
        await relay.close()
        server.close()
        await server.wait_closed()
    assert len(sink.messages) == 9
    assert [m[1] for m in sink.messages[:3]] == [["r0@b.test"], ["r1@b.test"], ["r2@b.test"]]


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("CN=mx.b.test,O=Operateur B,C=FR", "C=FR, O=Operateur B, CN=mx.b.test", True),
        ("CN=MX.B.TEST,O=operateur b,C=fr", "CN=mx.b.test,O=Operateur B,C=FR", True),
        ("CN=mx.b.test,O=Operateur B,C=FR", "CN=mx.b.test,O=Operateur C,C=FR", False),
        ("CN=mx.b.test,O=Operateur B,C=FR", "CN=mx.b.test,O=Operateur B", False),
        ("/C=FR/O=Operateur B/CN=mx.b.test", "CN=mx.b.test, O=Operateur B, C=FR", True),
        ("not a dn", "CN=x", False),
    ],
)
def test_dn_equal(a: str, b: str, equal: bool) -> None:
    assert dn_equal(a, b) is equal
