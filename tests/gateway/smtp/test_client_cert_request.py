"""TLS towards people: only the listeners for software and peers ask for a client certificate, naming the CAs.

``openssl s_client`` (an independent TLS client) talks to the real listeners and reports whether
the server sent a CertificateRequest (``-msg``) and which "Acceptable client certificate CA
names" it carried.  Clinicians' submission ports must not ask (a smart-card user would get a
certificate picker); the inbound port always asks; ``tls.request_client_cert`` chooses the
others; a trust anchor added at run time is named after the live reload.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from smtp_world import DOMAIN, PeerCerts, World, message, populate, started, write_settings

from certs.pki import create_dev_pki
from directory.certificates import register_certificate
from directory.db import transaction
from gateway.config import TlsSettings, load_settings


async def cmd(smtp: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    verb, _, arg = line.partition(" ")
    response = await smtp.execute_command(verb.encode(), *([arg.encode()] if arg else []))
    return response.code, response.message


async def send_data(smtp: aiosmtplib.SMTP, data: bytes) -> tuple[int, str]:
    try:
        response = await smtp.data(data)
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    return response.code, response.message


def queue_id_of(text: str) -> str:
    match = re.search(r"queued as ([0-9a-f]{32})", text)
    assert match, text
    return match.group(1)


@dataclass(frozen=True)
class Handshake:
    requested: bool  # the server sent a CertificateRequest
    ca_names: tuple[str, ...]  # the names it carried, as s_client prints them


async def s_client(port: int, *, starttls: bool) -> Handshake:
    """One handshake by ``openssl s_client`` (run off the event loop the gateway uses)."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-msg", "-servername", "localhost"]
    if starttls:
        args += ["-starttls", "smtp"]
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(b""), timeout=30)
    text = out.decode("utf-8", "replace")
    assert "Cipher is" in text or "Cipher    :" in text, text  # the handshake completed
    names: list[str] = []
    m = re.search(r"^Acceptable client certificate CA names\n((?:(?!Requested Signature|Client Certificate Types)"
                  r".+\n)+)", text, re.MULTILINE)  # fmt: skip
    if m:
        names = [line.strip() for line in m.group(1).splitlines() if line.strip()]
    return Handshake("CertificateRequest" in text, tuple(names))


def common_name(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def _world(home: Path, certs: PeerCerts, request_client_cert: list[str]) -> AsyncIterator[World]:
    write_settings(home, {"tls": {"request_client_cert": request_client_cert}})
    populate(load_settings(home), certs)
    async with started(home, certs) as running:
        yield running


@pytest.fixture
async def world(sqlite_home: Path, peer_certs: PeerCerts) -> AsyncIterator[World]:
    """The gateway as installed: ``tls.request_client_cert`` at its default."""
    async for running in _world(sqlite_home, peer_certs, TlsSettings().request_client_cert):
        yield running


@pytest.fixture
async def software_world(sqlite_home: Path, peer_certs: PeerCerts) -> AsyncIterator[World]:
    """The same gateway with port 465 set aside for software: it asks for a certificate."""
    async for running in _world(sqlite_home, peer_certs, ["submissions", "api"]):
        yield running


async def test_clinicians_ports_do_not_ask_inbound_asks_and_names_our_cas(world: World) -> None:
    assert world.settings.tls.request_client_cert == ["api"]  # the default
    for listener, starttls in (("submission", True), ("submissions", False)):
        shake = await s_client(world.port(listener), starttls=starttls)
        assert shake == Handshake(False, ()), listener
    inbound = await s_client(world.port("inbound"), starttls=True)
    assert inbound.requested
    dev_ca = common_name(world.ca.read_bytes())
    assert any(f"CN = {dev_ca}" in name for name in inbound.ca_names), inbound.ca_names
    assert not any("trustme" in name.lower() for name in inbound.ca_names)  # a CA we do not trust: not named


async def test_a_port_set_aside_for_software_asks_and_logs_in_with_the_certificate(software_world: World) -> None:
    world = software_world
    assert await s_client(world.port("submission"), starttls=True) == Handshake(False, ())
    shake = await s_client(world.port("submissions"), starttls=False)
    assert shake.requested and any(f"CN = {common_name(world.ca.read_bytes())}" in n for n in shake.ca_names)

    smtp = world.client("submissions", cert=world.certs.app)  # the prescription software
    await smtp.connect()
    await smtp.ehlo()
    assert (await cmd(smtp, f"MAIL FROM:<app@{DOMAIN}>"))[0] == 250
    assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
    code, text = await send_data(smtp, message(sender=f"app@{DOMAIN}"))
    assert code == 250, text
    assert world.gateway.store is not None
    assert world.gateway.store.get(queue_id_of(text))["auth_identity"] == f"app@{DOMAIN}"
    await smtp.quit()


async def test_a_certificate_offered_where_none_is_asked_logs_nobody_in(world: World) -> None:
    """On the clinicians' port the client's certificate is never sent: the mail client must AUTH."""
    smtp = world.client("submission", cert=world.certs.app)
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo()
    code, text = await cmd(smtp, f"MAIL FROM:<app@{DOMAIN}>")
    assert code == 530 and text.startswith("5.7.0"), (code, text)
    await smtp.quit()


async def test_an_anchor_added_at_run_time_is_named_after_the_reload(world: World, tmp_path: Path) -> None:
    other = create_dev_pki(tmp_path / "other-ca", "z.mssante.test", "mx.z.mssante.test")
    ca_pem = (tmp_path / "other-ca" / "ca.pem").read_bytes()
    assert other is not None
    new_name = common_name(ca_pem)
    before = await s_client(world.port("inbound"), starttls=True)
    assert not any(f"CN = {new_name}" in n for n in before.ca_names)
    with transaction(world.gateway.sessions) as s:  # type: ignore[arg-type]
        register_certificate(s, ca_pem, address=None, purpose="anchor")
    assert await world.gateway.reload_trust()
    after = await s_client(world.port("inbound"), starttls=True)
    assert any(f"CN = {new_name}" in n for n in after.ca_names), after.ca_names
    assert set(before.ca_names) < set(after.ca_names)
    assert await s_client(world.port("submission"), starttls=True) == Handshake(False, ())
