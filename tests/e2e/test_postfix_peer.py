"""A private Postfix 3.7 as a peer operator, both ways, over verified mutual TLS, including its bounces.

Operator A is a real mssgw (``e2e_support._start``: real listeners, workers driven here); the
peer ``p.postfix.test`` is a real Postfix (``postfix_peer``) on its own loopback port with its
own CA from the dev PKI.  A trusts the peer's domain with ``relay=127.0.0.1:<port>`` and the
pinned operator DN of Postfix's certificate; Postfix requires and verifies A's client
certificate, and relays mail for A's domain to A's inbound listener with its own certificate,
verifying A's.

- A → Postfix: a prescription arrives in Postfix's Maildir signed and encrypted; ``openssl cms``
  decrypts it with the recipient's key and verifies A's user's signature.  Postfix's Received
  header says it verified A's client certificate.  A mailbox A has no certificate for gets the
  prescription signed only (the peer need not encrypt: pinned mutual TLS, the MSSanté model).
- A → Postfix, unknown user: Postfix refuses at RCPT (550 5.1.1) and A bounces with a DSN
  quoting Postfix's reply to its sender.
- Postfix → A: a mailbox Postfix accepted fails at local delivery; Postfix's own bounce (from
  MAILER-DAEMON, null reverse-path, in clear) reaches A's sender as a report, marked as
  authenticated by its transport (``x-peer-tls=pass``), not quarantined.
- Postfix refuses a client without a certificate from A's CA.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509
from e2e_support import (
    A_DOMAIN,
    CLINICIAN,
    PDF,
    Operator,
    Template,
    _start,
    free_port,
    parse,
    prescription,
)
from postfix_peer import PostfixPeer, make_postfix_peer, until

from certs.pki import DevPki, create_dev_pki, issue_certificate, save_certificate_and_key
from directory import admin
from directory.certificates import register_certificate
from directory.db import make_engine, session_factory, transaction
from gateway.config import load_settings

P_DOMAIN = "p.postfix.test"
P_HOST = f"mx.{P_DOMAIN}"
PHARMA = f"pharma@{P_DOMAIN}"  # a Postfix mailbox whose certificate A has
DESK = f"accueil@{P_DOMAIN}"  # a Postfix mailbox without a certificate: signed only (the MSSanté model)
FULL = f"full@{P_DOMAIN}"  # accepted by Postfix, then bounced by its delivery command
NOBODY = f"nobody@{P_DOMAIN}"  # A has a certificate for it; Postfix has no such mailbox


@dataclass
class World:
    a: Operator
    peer: PostfixPeer
    pki: DevPki
    keys: dict[str, tuple[Path, Path]]  # address -> (certificate, key) of the peer's users
    a_ca: Path

    async def until_a(self, predicate, what: str, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
        """Run A's workers until ``predicate`` holds (Postfix works in its own processes)."""
        await until(predicate, what, timeout=timeout, step=self.a.workers.run_once,  # type: ignore[attr-defined]
                    detail=self.peer.log_tail)  # fmt: skip


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _a_template(templates: dict[str, Template], root: Path, pki: DevPki, port: int,
                keys: dict[str, tuple[Path, Path]]) -> Template:  # fmt: skip
    """A's home trusting Postfix's domain: route, pinned DN, Postfix's CA as anchor and client CA."""
    t = templates["a"]
    home = root / "a-template"
    shutil.copytree(t.home, home)
    p_ca = pki.ca_cert.read_bytes()
    clients = home / "pki" / "clients.pem"
    clients.write_bytes(clients.read_bytes() + p_ca)
    p_dn = x509.load_pem_x509_certificate(pki.operator_cert.read_bytes()).subject.rfc4514_string()
    engine = make_engine(load_settings(home).database_url)
    with transaction(session_factory(engine)) as s:
        # Pinned mutual TLS to the operator DN: a recipient without a certificate gets signed mail.
        admin.trust_domain(s, P_DOMAIN, relay=f"127.0.0.1:{port}", operator_dn=p_dn, require_encryption=False)
        admin.add_mailbox(s, DESK, type="ORG")
        register_certificate(s, p_ca, address=None, purpose="anchor")
        for address, (cert, _key) in keys.items():
            admin.add_mailbox(s, address, type="ORG")
            register_certificate(s, cert.read_bytes(), address=address, purpose="smime")
    engine.dispose()
    return Template(home, t.domain, t.hostname, t.operator_dn, t.ca_pem)


@pytest.fixture
async def world(templates: dict[str, Template], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.delenv("MSSGW_DATABASE_URL", raising=False)
    pki = create_dev_pki(tmp_path / "postfix-pki", P_DOMAIN, P_HOST)
    keys: dict[str, tuple[Path, Path]] = {}
    (tmp_path / "users").mkdir()
    for address in (PHARMA, FULL, NOBODY):
        cert, key = issue_certificate(pki, kind="user", email=address)
        paths = (tmp_path / "users" / f"{address}.pem", tmp_path / "users" / f"{address}.key")
        save_certificate_and_key(cert, key, *paths)
        keys[address] = paths
    port = free_port()
    a = await _start("a", _a_template(templates, tmp_path, pki, port, keys), tmp_path / "run")
    a_ca = tmp_path / "a-ca.pem"
    a_ca.write_bytes(templates["a"].ca_pem)
    peer: PostfixPeer | None = None
    try:
        peer = make_postfix_peer(domain=P_DOMAIN, hostname=P_HOST, port=port, cert=pki.operator_cert,
                                 key=pki.operator_key, peer_ca=a_ca, peer_domain=A_DOMAIN,
                                 peer_hostname=a.settings.hostname, peer_port=a.inbound_port,
                                 mailboxes=["pharma", "accueil"], full_mailbox="full")  # fmt: skip
        peer.start()
        await until(lambda: _listening(port), "Postfix listening", detail=peer.log_tail)
        yield World(a, peer, pki, keys, a_ca)
    finally:
        if peer is not None:
            peer.stop()
        await a.workers.stop()  # type: ignore[attr-defined]
        await a.gateway.stop(grace=2)  # type: ignore[attr-defined]


def _openssl(*argv: str, data: bytes) -> bytes:
    done = subprocess.run(["openssl", *argv], input=data, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def _report_fields(msg: EmailMessage) -> str:
    """The message/delivery-status part's text (the per-message and per-recipient fields)."""
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            raw = part.as_bytes(policy=policy.SMTP).decode(errors="replace")
            return raw.partition("\r\n\r\n")[2]
    raise AssertionError(f"no message/delivery-status part in {msg.get_content_type()}")


async def test_a_relays_signed_and_encrypted_to_postfix_over_mutual_tls(world: World) -> None:
    a, peer = world.a, world.peer
    message_id = f"<{uuid.uuid4().hex}@{A_DOMAIN}>"
    queue_id = a.enqueue(prescription(to=PHARMA, mdn=False, message_id=message_id), CLINICIAN, [PHARMA])
    await world.until_a(lambda: len(peer.mailbox("pharma")) == 1, "Postfix delivered to pharma")

    states = {r["address"]: r["state"] for r in a.queue(queue_id)["recipient_states"]}
    assert states == {PHARMA: "delivered"}
    stored = peer.mailbox("pharma")[0]
    outer = message_from_bytes(stored, policy=policy.default)
    # Postfix verified A's client certificate (smtpd_tls_req_ccert would have refused it otherwise).
    received = " ".join(str(outer["Received"]).split())
    assert f'Client CN "{a.settings.hostname}"' in received and "(verified OK)" in received, received
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert "enveloped-data" in str(outer["Content-Type"]).lower()
    assert b"PRESCRIPTION-SECRET" not in stored and b"amoxicilline" not in stored

    cert, key = world.keys[PHARMA]
    signed = _openssl("cms", "-decrypt", "-recip", str(cert), "-inkey", str(key), data=stored)
    # The signature is A's user's, chaining to A's CA: openssl verifies it.
    content = _openssl("cms", "-verify", "-CAfile", str(world.a_ca), data=signed)
    inner = message_from_bytes(content, policy=policy.default)
    attachments = [p for p in inner.walk() if p.get_content_type() == "application/pdf"]
    assert [p.get_payload(decode=True) for p in attachments] == [PDF]


async def test_a_relays_signed_only_to_a_postfix_mailbox_without_certificate(world: World) -> None:
    """No certificate for the recipient, a peer that need not encrypt: signed, over pinned mutual TLS."""
    a, peer = world.a, world.peer
    queue_id = a.enqueue(prescription(to=DESK, mdn=False), CLINICIAN, [DESK])
    await world.until_a(lambda: len(peer.mailbox("accueil")) == 1, "Postfix delivered to accueil")

    assert {r["address"]: r["state"] for r in a.queue(queue_id)["recipient_states"]} == {DESK: "delivered"}
    stored = peer.mailbox("accueil")[0]
    outer = message_from_bytes(stored, policy=policy.default)
    received = " ".join(str(outer["Received"]).split())
    assert f'Client CN "{a.settings.hostname}"' in received and "(verified OK)" in received, received
    assert "enveloped-data" not in str(outer["Content-Type"]).lower()
    content = _openssl("cms", "-verify", "-CAfile", str(world.a_ca), data=stored)
    inner = message_from_bytes(content, policy=policy.default)
    attachments = [p for p in inner.walk() if p.get_content_type() == "application/pdf"]
    assert [p.get_payload(decode=True) for p in attachments] == [PDF]


async def test_unknown_user_refused_by_postfix_is_bounced_by_a_to_its_sender(world: World) -> None:
    a, peer = world.a, world.peer
    queue_id = a.enqueue(prescription(to=NOBODY, mdn=False), CLINICIAN, [NOBODY])
    await world.until_a(lambda: len(a.mailbox(CLINICIAN)) == 1, "A's DSN in the sender's mailbox")

    states = {r["address"]: r["state"] for r in a.queue(queue_id)["recipient_states"]}
    assert states == {NOBODY: "bounced"}
    assert f"to=<{NOBODY}> proto=ESMTP" in peer.maillog.read_text()  # Postfix itself refused it
    dsn = parse(a.mailbox(CLINICIAN)[0])
    assert dsn.get_content_type() == "multipart/report"
    fields = " ".join(_report_fields(dsn).split())
    assert f"Final-Recipient: rfc822; {NOBODY}" in fields or f"Final-Recipient: rfc822;{NOBODY}" in fields
    assert "Action: failed" in fields and "Status: 5.1.1" in fields
    # The diagnostic quotes Postfix's own reply.
    assert "550 5.1.1" in fields and "User unknown in virtual mailbox table" in fields, fields
    assert peer.mailbox("pharma") == []


async def test_postfix_bounce_reaches_a_sender_as_a_transport_authenticated_report(world: World) -> None:
    a, peer = world.a, world.peer
    original_id = f"<{uuid.uuid4().hex}@{A_DOMAIN}>"
    sent = a.enqueue(prescription(to=FULL, mdn=False, message_id=original_id), CLINICIAN, [FULL])
    await world.until_a(lambda: len(a.mailbox(CLINICIAN)) == 1, "Postfix's bounce in the sender's mailbox")

    # Postfix accepted the message (A delivered it), then its delivery command failed for good.
    assert {r["address"]: r["state"] for r in a.queue(sent)["recipient_states"]} == {FULL: "delivered"}
    log = peer.maillog.read_text()
    assert f"to=<{FULL}>, relay=full" in log and "status=bounced" in log
    assert f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{a.inbound_port}" in log, peer.log_tail()

    assert a.store.quarantined() == []
    inbound = [m for m in a.store.list(include_done=True) if m["origin"] == "inbound"]
    assert len(inbound) == 1
    info = a.queue(inbound[0]["id"])
    assert info["sender"] == "<>"  # the null reverse-path of an MTA's bounce (as the queue shows it)
    states = {r["address"]: (r["state"], r["protection"]) for r in info["recipient_states"]}
    assert states == {CLINICIAN: ("delivered", "peer-tls")}

    delivered = a.mailbox(CLINICIAN)[0]
    report = parse(delivered)
    assert report.get_content_type() == "multipart/report"
    assert report["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{P_HOST}"
    results = " ".join(str(report["Authentication-Results"]).split())
    assert results.startswith(f"{a.settings.hostname};")
    assert "smime=none" in results and f"x-peer-tls=pass policy.peer-operator={P_DOMAIN}" in results
    fields = " ".join(_report_fields(report).split())
    assert f"Reporting-MTA: dns; {P_HOST}" in fields
    assert f"Final-Recipient: rfc822; {FULL}" in fields and "Action: failed" in fields
    assert "Status: 5.2.0" in fields and "mailbox full" in fields
    assert original_id.encode() in delivered  # the report is about the message A sent
    # A's sender is told once: the report itself, no DSN or notice of A's own about it.
    assert [m for m in a.store.list(include_done=True) if m["kind"] in ("dsn", "mdn", "notice")] == []


@pytest.mark.parametrize("client_cert", ["none", "foreign-ca"])
async def test_postfix_refuses_a_client_without_a_certificate_from_a_ca(world: World, client_cert: str) -> None:
    """Postfix's side of mutual TLS: only A's CA vouches for clients (its own CA does not)."""
    ctx = ssl.create_default_context(cafile=str(world.pki.ca_cert))
    ctx.check_hostname = False
    if client_cert == "foreign-ca":
        ctx.load_cert_chain(str(world.pki.operator_cert), str(world.pki.operator_key))
    refused = False
    with smtplib.SMTP("127.0.0.1", world.peer.port, timeout=30) as smtp:
        smtp.ehlo(A_DOMAIN)
        try:
            smtp.starttls(context=ctx)
            smtp.ehlo(A_DOMAIN)
            code, _reply = smtp.mail(CLINICIAN)
            refused = code >= 400
        except (smtplib.SMTPServerDisconnected, ssl.SSLError, ConnectionError):
            refused = True
    assert refused
    why = "No client certificate presented" if client_cert == "none" else "Client certificate not trusted"
    line = f"NOQUEUE: abort: TLS from localhost[127.0.0.1]: {why}"
    await until(lambda: line in world.peer.maillog.read_text(), "Postfix logged the refusal",
                detail=world.peer.log_tail)  # fmt: skip
    assert world.peer.mailbox("pharma") == []
