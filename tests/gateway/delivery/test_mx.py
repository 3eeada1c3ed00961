"""Relay by MX records (RFC 5321 §5.1, RFC 7505) against a small real DNS server and aiosmtpd sinks on loopback.

The DNS server answers UDP queries from a table each test fills in; the preferred MX points at
127.0.0.2, where nothing listens (the sink binds 127.0.0.1 only), to prove the fallback.
"""

from __future__ import annotations

import asyncio
import ssl
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from cryptography import x509

from gateway.config import ConfigError, load_settings, parse_nameserver, render_toml, validate
from gateway.delivery.relay import Attempt, Relay, Route

MESSAGE = b"From: a@a.mssante.test\r\nTo: x@b.example\r\nSubject: x\r\n\r\nciphertext stands here\r\n"
SENDER = "a@a.mssante.test"


class FakeDns(asyncio.DatagramProtocol):
    """Answers from ``records`` ((name, type) -> rdata texts); NXDOMAIN, SERVFAIL or silence on demand."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.nxdomain: set[str] = set()
        self.servfail: set[str] = set()
        self.silent = False
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if self.silent or self.transport is None:
            return
        response = dns.message.make_response(query)
        if name in self.nxdomain:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif values := self.records.get((name, rdtype)):
            response.answer.append(dns.rrset.from_text(question.name, 300, "IN", rdtype, *values))
        self.transport.sendto(response.to_wire(), addr)

    def asked(self, name: str, rdtype: str) -> int:
        return self.queries.count((name, rdtype))


@pytest.fixture
async def fake_dns() -> AsyncIterator[tuple[FakeDns, int]]:
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(FakeDns, local_addr=("127.0.0.1", 0))
    try:
        yield proto, int(transport.get_extra_info("sockname")[1])
    finally:
        transport.close()


class Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued"


@pytest.fixture
async def sink(sqlite_home: Path) -> AsyncIterator[tuple[Sink, int]]:
    """A STARTTLS-only SMTP server with the dev PKI's server certificate, on 127.0.0.1 only."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(sqlite_home / "pki" / "server.pem", sqlite_home / "pki" / "server.key")
    tls.load_verify_locations(sqlite_home / "pki" / "ca.pem")
    tls.verify_mode = ssl.CERT_OPTIONAL
    handler = Sink()
    server = await asyncio.get_running_loop().create_server(
        lambda: AioSMTP(handler, tls_context=tls, require_starttls=True, hostname="peer.test"), "127.0.0.1", 0)
    try:
        yield handler, int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def _relay(home: Path, dns_port: int, mx_port: int, *, dns_timeout: float = 5.0) -> Relay:
    """A relay whose MX lookups go to the fake DNS and whose MX hosts listen on ``mx_port``."""
    raw = tomllib.loads((home / "mssgw.toml").read_text())
    raw.setdefault("relay", {}).update({"mx_port": mx_port, "nameservers": [f"127.0.0.1:{dns_port}"],
                                        "dns_timeout": dns_timeout})  # fmt: skip
    raw["operator"]["hostname"] = "gw.a.mssante.test"  # not "localhost", which is an MX host below
    (home / "mssgw.toml").write_text(render_toml(raw))
    return Relay(load_settings(home), anchors_pem=[(home / "pki" / "ca.pem").read_bytes()])


def _server_dn(home: Path) -> str:
    return x509.load_pem_x509_certificate((home / "pki" / "server.pem").read_bytes()).subject.rfc4514_string()


async def _send(relay: Relay, route: Route, rcpts: list[str] | None = None) -> list[Attempt]:
    try:
        return await asyncio.wait_for(relay.send(route, SENDER, rcpts or ["x@b.example"], MESSAGE), 10)
    finally:
        await relay.close()


def _mx_route(domain: str, operator_dn: str | None = None) -> Route:
    return Route(domain, domain, 25, operator_dn, use_mx=True)


async def test_falls_back_to_the_next_mx_checks_its_name_and_caches(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    handler, port = sink
    dns_server.records = {
        ("b.example.", "MX"): ["20 localhost.", "10 mx1.b.example."],
        ("mx1.b.example.", "A"): ["127.0.0.2"],  # preferred, but nothing listens there
        ("localhost.", "A"): ["127.0.0.1"],  # a name the dev server certificate carries
    }
    relay = _relay(sqlite_home, dns_port, port)
    route = _mx_route("b.example")  # no operator DN: the MX host name is checked
    try:
        first = await relay.send(route, SENDER, ["x@b.example", "y@b.example"], MESSAGE)
        second = await relay.send(route, SENDER, ["z@b.example"], MESSAGE)
    finally:
        await relay.close()
    assert all(a.ok for a in first + second), first + second
    assert first[0].remote == f"localhost:{port}"
    assert dns_server.asked("mx1.b.example.", "A") == 1  # the preferred MX was looked up (and refused us)
    assert [m[1] for m in handler.messages] == [["x@b.example", "y@b.example"], ["z@b.example"]]
    assert handler.messages[0][2] == MESSAGE
    assert dns_server.asked("b.example.", "MX") == 1  # the second message used the cached answer
    assert dns_server.asked("localhost.", "A") == 1


async def test_implicit_mx_is_the_domain_itself(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    handler, port = sink
    dns_server.records = {("c.example.", "A"): ["127.0.0.1"]}  # no MX record at all
    attempts = await _send(_relay(sqlite_home, dns_port, port), _mx_route("c.example", _server_dn(sqlite_home)))
    assert attempts[0].ok and attempts[0].remote == f"c.example:{port}"
    assert len(handler.messages) == 1
    assert dns_server.asked("c.example.", "MX") == 1


async def test_null_mx_is_a_permanent_failure(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    handler, port = sink
    dns_server.records = {("b.example.", "MX"): ["0 ."], ("b.example.", "A"): ["127.0.0.1"]}
    attempts = await _send(_relay(sqlite_home, dns_port, port), _mx_route("b.example"), ["x@b.example", "y@b.example"])
    assert [(a.code, a.enhanced) for a in attempts] == [(556, "5.1.10")] * 2
    assert attempts[0].permanent and attempts[0].text == "b.example accepts no mail (null MX)"
    assert handler.messages == []
    assert dns_server.asked("b.example.", "A") == 0  # nothing more is looked up


async def test_nxdomain_is_a_permanent_failure(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    dns_server.nxdomain = {"gone.example."}
    attempts = await _send(_relay(sqlite_home, dns_port, sink[1]), _mx_route("gone.example"))
    assert (attempts[0].code, attempts[0].enhanced) == (550, "5.1.2") and attempts[0].permanent
    assert "gone.example" in attempts[0].text and attempts[0].remote == ""


async def test_silent_dns_is_a_temporary_failure_bounded_by_the_timeout(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    dns_server.silent = True
    relay = _relay(sqlite_home, dns_port, sink[1], dns_timeout=0.5)
    started = asyncio.get_running_loop().time()
    attempts = await _send(relay, _mx_route("b.example"))
    elapsed = asyncio.get_running_loop().time() - started
    assert (attempts[0].code, attempts[0].enhanced) == (451, "4.4.3") and not attempts[0].permanent
    assert "0.5 s" in attempts[0].text and dns_server.queries
    assert elapsed < 3


async def test_servfail_is_a_temporary_failure(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    dns_server.servfail = {"b.example."}
    attempts = await _send(_relay(sqlite_home, dns_port, sink[1]), _mx_route("b.example"))
    assert (attempts[0].code, attempts[0].enhanced) == (451, "4.4.3") and "no nameserver answered" in attempts[0].text


async def test_mx_host_name_not_in_the_certificate_gets_nothing(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    handler, port = sink
    dns_server.records = {("b.example.", "MX"): ["10 mx.wrong.test."], ("mx.wrong.test.", "A"): ["127.0.0.1"]}
    attempts = await _send(_relay(sqlite_home, dns_port, port), _mx_route("b.example"))
    assert (attempts[0].code, attempts[0].enhanced) == (454, "4.7.5")
    assert "mx.wrong.test" in attempts[0].text and "not trusted" in attempts[0].text
    # Behind an unreachable preferred MX too: the certificate problem is the one reported, both are named.
    dns_server.records.update({("b.example.", "MX"): ["10 mx1.b.example.", "20 mx.wrong.test."],
                               ("mx1.b.example.", "A"): ["127.0.0.2"]})  # fmt: skip
    attempts = await _send(_relay(sqlite_home, dns_port, port), _mx_route("b.example"))
    assert (attempts[0].code, attempts[0].enhanced) == (454, "4.7.5") and not attempts[0].permanent
    assert "no MX host of b.example could be used" in attempts[0].text
    assert "cannot connect to mx1.b.example[127.0.0.2]" in attempts[0].text
    assert handler.messages == []


async def test_operator_dn_is_pinned_on_mx_hosts(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    handler, port = sink
    dns_server.records = {("b.example.", "MX"): ["10 mx.b.example."], ("mx.b.example.", "A"): ["127.0.0.1"]}
    # With the operator DN the host name is not checked: the DN is.
    ok = await _send(_relay(sqlite_home, dns_port, port), _mx_route("b.example", _server_dn(sqlite_home)))
    wrong = await _send(_relay(sqlite_home, dns_port, port), _mx_route("b.example", "CN=other,O=Other,C=FR"))
    assert ok[0].ok and len(handler.messages) == 1
    assert wrong[0].enhanced == "4.7.5" and "does not match the operator DN" in wrong[0].text


async def test_own_host_name_as_best_mx_is_a_loop(
    sqlite_home: Path, fake_dns: tuple[FakeDns, int], sink: tuple[Sink, int]
) -> None:
    dns_server, dns_port = fake_dns
    dns_server.records = {("b.example.", "MX"): ["10 gw.a.mssante.test.", "20 localhost."],
                          ("localhost.", "A"): ["127.0.0.1"]}  # fmt: skip
    attempts = await _send(_relay(sqlite_home, dns_port, sink[1]), _mx_route("b.example"))
    assert (attempts[0].code, attempts[0].enhanced) == (554, "5.4.6") and sink[0].messages == []


def test_route_for_a_domain_routed_by_mx(sqlite_home: Path) -> None:
    from directory import admin
    from directory.db import make_engine, session_factory, transaction
    from gateway.process.common import route_for

    engine = make_engine(load_settings(sqlite_home).database_url)
    try:
        factory = session_factory(engine)
        with transaction(factory) as session:
            admin.trust_domain(session, "d.example", use_mx=True, operator_dn="CN=d-operator,O=D,C=FR")
            admin.trust_domain(session, "e.example", relay="127.0.0.1:2525", operator_dn="CN=e-operator")
        with factory() as session:
            d, e = route_for(session, "d.example"), route_for(session, "e.example")
            assert route_for(session, "unknown.example") is None
    finally:
        engine.dispose()
    assert d is not None and d.use_mx and d.domain == "d.example" and d.operator_dn == "CN=d-operator,O=D,C=FR"
    assert e == Route("e.example", "127.0.0.1", 2525, "CN=e-operator") and not e.use_mx


@pytest.mark.parametrize(
    ("relay", "message"),
    [
        ({"mx_port": 0}, "relay.mx_port: must be a port"),
        ({"mx_port": 70000}, "relay.mx_port: must be a port"),
        ({"nameservers": ["dns.example"]}, "relay.nameservers: 'dns.example' is not an IP address"),
        ({"nameservers": ["127.0.0.1:x"]}, "relay.nameservers: bad port"),
        ({"nameservers": ["[::1"]}, "relay.nameservers: expected IP or IP:PORT"),
        ({"dns_timeout": 0}, "relay.dns_timeout: must be more than 0"),
        ({"dns_timeout": "soon"}, "relay.dns_timeout: expected a number"),
    ],
)
def test_relay_settings_are_validated(tmp_path: Path, relay: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate({"relay": relay}, tmp_path, environ={})
    assert message in str(info.value)


def test_nameserver_forms() -> None:
    assert parse_nameserver("192.0.2.1", "k") == ("192.0.2.1", 53)
    assert parse_nameserver("192.0.2.1:5353", "k") == ("192.0.2.1", 5353)
    assert parse_nameserver("2001:db8::1", "k") == ("2001:db8::1", 53)
    assert parse_nameserver("[2001:db8::1]:5353", "k") == ("2001:db8::1", 5353)
    settings = validate({"relay": {"nameservers": ["192.0.2.1", "[::1]:5353"], "dns_timeout": 2}}, Path("/x"), environ={})
    assert settings.relay.dns_timeout == 2.0 and settings.relay.mx_port == 25

