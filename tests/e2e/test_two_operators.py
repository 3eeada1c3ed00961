"""Operator to operator, end to end: two gateways on loopback exchanging protected mail.

A (a.mssante.test) and B (b.mssante.test) run their real SMTP listeners; the tests drive the
queue workers with ``run_once`` and an injected clock.  Independent oracles: the ``email``
package parses what lands in the Maildirs, and ``openssl cms`` decrypts and verifies what an
independent MTA (a plain aiosmtpd sink) received.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme
from aiosmtpd.smtp import SMTP as AioSMTP
from e2e_support import (
    A_DOMAIN,
    B_DOMAIN,
    CLINICIAN,
    COLLEAGUE,
    GHOST,
    PDF,
    PRACTITIONER,
    SUBJECT,
    Operator,
    Pair,
    free_port,
    local_original,
    parse,
    prescription,
)

from directory import admin
from directory.certificates import register_certificate
from directory.db import transaction
from gateway.delivery.relay import Relay
from gateway.queue.models import RecipientState

BACKENDS = ("sqlite", "postgresql")  # the delivery tests run on both stores

HOUR = dt.timedelta(hours=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _states(info: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {r["address"]: r["state"] for r in info["recipient_states"]}


def _reply(info: dict, address: str) -> str:  # type: ignore[type-arg]
    return next(r["last_reply"] for r in info["recipient_states"] if r["address"] == address) or ""


def _reports(messages: list[bytes], report_type: str) -> list:  # type: ignore[type-arg]
    out = []
    for raw in messages:
        msg = parse(raw)
        if msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == report_type:
            out.append(msg)
    return out


async def test_prescription_reaches_b_intact_and_a_gets_processed_mdn(pair: Pair) -> None:
    a, b = pair.a, pair.b
    qid = a.enqueue(prescription(), CLINICIAN, [PRACTITIONER])
    await a.workers.run_once()  # type: ignore[attr-defined]
    # B stored only ciphertext (while it holds it: the bytes go once every recipient is final).
    stored = b.store.read(b.store.list(include_done=True)[0]["id"])
    assert b"application/pkcs7-mime" in stored
    assert SUBJECT.encode() not in stored and base64.b64encode(PDF)[:60] not in stored
    await pair.flow()

    info = a.queue(qid)
    assert _states(info) == {PRACTITIONER: "delivered"}, _reply(info, PRACTITIONER)
    assert info["recipient_states"][0]["protection"] == "smime"

    inbox = b.mailbox(PRACTITIONER)
    assert len(inbox) == 1
    got = parse(inbox[0])
    assert got["Subject"] == SUBJECT
    ar = str(got["Authentication-Results"])
    assert ar.startswith(f"mx.{B_DOMAIN};") and "smime=pass" in ar and f"body.smime-identifier={CLINICIAN}" in ar
    attachments = [p for p in got.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert len(attachments) == 1 and attachments[0].get_content() == PDF
    # the banner names the signer as the national directory knows them, in French (crypto.banner_language),
    # and does not call the certificate valid: these operators publish no CRL (revocation not checked)
    banner = ("[Signé par Dr Anne Martin (RPPS 10000000009) : signature vérifiée, révocation non vérifiée "
              "(liste de révocation indisponible), chiffré pendant le transport]")
    assert banner.encode() in inbox[0]
    assert len(got.get_all("Authentication-Results")) == 1 and got["Return-Path"] == f"<{CLINICIAN}>"
    # the peer hop's Received (written on the encrypted outer message) survives the unwrapping
    hops = [" ".join(str(r).split()) for r in got.get_all("Received")]
    assert len(hops) == 1 and hops[0].startswith(f"from mx.{A_DOMAIN}") and f"by mx.{B_DOMAIN} (mssgw)" in hops[0]

    # Nothing of the content crossed the wire in clear, and B stored only ciphertext.
    wire = pair.proxy.wire
    assert b"STARTTLS" in wire
    for secret in (b"PRESCRIPTION-SECRET-7f3a", SUBJECT.encode(), base64.b64encode(PDF)[:60]):
        assert secret not in wire
    # B kept the bytes only until every recipient was final: nothing left on disk.
    held = b.store.list(include_done=True)[0]
    assert held["state"] == "done" and held["bytes"] == "removed"
    assert not b.store.spool.holds(held["id"])

    # A's sender (a PER mailbox: its mail client saves its own Sent copy, so the gateway files none)
    # has the processed MDN (verified: signed by B's operator).
    assert a.mailbox(CLINICIAN, "Sent") == []
    mdns = _reports(a.mailbox(CLINICIAN), "disposition-notification")
    assert len(mdns) == 1
    mdn_raw = a.mailbox(CLINICIAN)[0]
    assert "smime=pass" in str(parse(mdn_raw)["Authentication-Results"])
    notification = next(p for p in mdns[0].walk() if p.get_content_type() == "message/disposition-notification")
    fields = notification.get_payload()[0]
    assert "processed" in fields["Disposition"]
    assert PRACTITIONER in fields["Final-Recipient"]
    assert [r["kind"] for r in b.receipts()] == ["mdn"]


async def test_local_to_local_is_verified_delivered_like_peer_mail_and_never_relayed(pair: Pair) -> None:
    a = pair.a
    qid = a.enqueue(prescription(to=COLLEAGUE, mdn=False), CLINICIAN, [COLLEAGUE])
    await pair.flow()
    info = a.queue(qid)
    assert _states(info) == {COLLEAGUE: "delivered"}
    assert info["recipient_states"][0]["protection"] == "local"
    inbox = a.mailbox(COLLEAGUE)
    assert len(inbox) == 1
    inner = local_original(inbox[0])
    assert inner["Subject"] == SUBJECT and inner["Return-Path"] == f"<{CLINICIAN}>"
    ar = str(inner["Authentication-Results"])
    assert ar.startswith(f"mx.{A_DOMAIN};") and "smime=pass" in ar and f"body.smime-identifier={CLINICIAN}" in ar
    # the banner names the signer as the directory knows them (not the operator's CN=localhost)
    # (A holds its own CA's CRL: revocation was checked, so the certificate is called valid)
    banner = "[Signé par Dr Anne Martin (RPPS 10000000009) : certificat valide, envoyé au sein de cet opérateur]"
    parts = list(inner.iter_parts())
    assert parts[0].get_content().strip() == banner and "CN=" not in parts[0].get_content()
    attachments = [p for p in inner.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert len(attachments) == 1 and attachments[0].get_content() == PDF  # not inside a wrapped message
    assert pair.proxy.wire == b""


async def test_peer_down_defers_then_delivers_after_backoff(pair: Pair) -> None:
    a, b = pair.a, pair.b
    dead_port = free_port()
    await a.set_relay(B_DOMAIN, dead_port)
    qid = a.enqueue(prescription(mdn=False), CLINICIAN, [PRACTITIONER])
    t0 = _now()
    assert await a.workers.run_once(now=t0) == 1
    info = a.queue(qid)
    assert _states(info) == {PRACTITIONER: "deferred"}
    assert "4.4.1" in _reply(info, PRACTITIONER)
    next_at = dt.datetime.fromisoformat(info["next_attempt_at"])
    base = a.settings.queue.retry_base_seconds
    assert t0 + dt.timedelta(seconds=base * 0.7) <= next_at <= t0 + dt.timedelta(seconds=base * 1.3)
    assert await a.workers.run_once(now=t0 + dt.timedelta(seconds=1)) == 0  # not due yet

    await a.set_relay(B_DOMAIN, pair.proxy.port, b.operator_dn)  # B is back
    await pair.flow(now=t0 + HOUR)
    info = a.queue(qid)
    assert _states(info) == {PRACTITIONER: "delivered"}, info
    assert len(b.mailbox(PRACTITIONER)) == 1


async def test_permanent_refusal_bounces_with_dsn_to_sender(pair: Pair) -> None:
    a = pair.a
    qid = a.enqueue(prescription(to=GHOST, mdn=False), CLINICIAN, [GHOST])
    await pair.flow()
    info = a.queue(qid)
    assert _states(info) == {GHOST: "bounced"}
    assert _reply(info, GHOST).startswith("550")
    dsns = _reports(a.mailbox(CLINICIAN), "delivery-status")
    assert len(dsns) == 1
    _check_dsn(dsns[0], GHOST, action="failed", status_prefix="5.")
    assert [r["kind"] for r in a.receipts()] == ["dsn"]
    assert a.receipts()[0]["id"] in [r["id"] for r in info["receipts"]]


def _check_dsn(dsn, recipient: str, *, action: str, status_prefix: str) -> None:  # type: ignore[no-untyped-def]
    parts = [p.get_content_type() for p in dsn.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = list(dsn.iter_parts())[1]
    per_rcpt = status.get_payload()[1]
    assert recipient in per_rcpt["Final-Recipient"]
    assert per_rcpt["Action"] == action
    assert per_rcpt["Status"].startswith(status_prefix)
    headers = list(dsn.iter_parts())[2].get_content()
    assert SUBJECT in headers and "PRESCRIPTION-SECRET" not in dsn.as_string()


async def test_delay_warning_once_then_expiry_bounce(pair: Pair) -> None:
    a = pair.a
    await a.set_relay(B_DOMAIN, free_port())  # nobody listens
    qid = a.enqueue(prescription(mdn=False), CLINICIAN, [PRACTITIONER])
    t0 = _now()
    await a.workers.run_once(now=t0)
    await a.workers.drain(now=t0 + 5 * HOUR)  # past delay_warning_hours: one "delayed" DSN
    await a.workers.drain(now=t0 + 10 * HOUR)  # no second warning
    delayed = _reports(a.mailbox(CLINICIAN), "delivery-status")
    assert len(delayed) == 1
    _check_dsn(delayed[0], PRACTITIONER, action="delayed", status_prefix="4.")
    assert _states(a.queue(qid)) == {PRACTITIONER: "deferred"}

    lifetime = a.settings.queue.lifetime_hours
    await a.workers.drain(now=t0 + dt.timedelta(hours=lifetime + 1))
    info = a.queue(qid)
    assert _states(info) == {PRACTITIONER: "bounced"}
    assert "expired" in _reply(info, PRACTITIONER)
    dsns = _reports(a.mailbox(CLINICIAN), "delivery-status")
    assert len(dsns) == 2
    _check_dsn(dsns[1], PRACTITIONER, action="failed", status_prefix="4.4.7")


async def test_untrusted_or_mismatching_peer_certificate_is_never_given_the_message(pair: Pair) -> None:
    a, b = pair.a, pair.b
    # 1. B's certificate does not carry the DN our trust list pins.
    await a.set_relay(B_DOMAIN, pair.proxy.port, "CN=mx.evil.test,O=Operateur evil,C=FR")
    qid = a.enqueue(prescription(mdn=False), CLINICIAN, [PRACTITIONER])
    await a.workers.run_once()
    info = a.queue(qid)
    assert _states(info) == {PRACTITIONER: "deferred"}
    assert "does not match the operator DN" in _reply(info, PRACTITIONER)

    # 2. A server whose certificate chains to no anchor of ours.
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    received: list[bytes] = []
    server, port = await _sink(ctx, received)
    try:
        await a.set_relay(B_DOMAIN, port, b.operator_dn)
        await a.workers.run_once(now=_now() + HOUR)
        info = a.queue(qid)
        assert _states(info) == {PRACTITIONER: "deferred"}
        assert "not trusted" in _reply(info, PRACTITIONER)
        assert received == []
    finally:
        server.close()
        await server.wait_closed()
    assert b.mailbox(PRACTITIONER) == []


async def test_tampered_message_is_quarantined_at_b(pair: Pair) -> None:
    a, b = pair.a, pair.b
    from gateway.process.outbound import protect_job

    signer = a.workers.keys.signer_for(CLINICIAN)
    certs = tuple(a.workers.keys.recipient_certs(PRACTITIONER))
    protected = protect_job(prescription(), signer, certs, True, "Message securise")
    head, _, body = protected.partition(b"\r\n\r\n")
    lines = body.split(b"\r\n")
    mid = len(lines) // 2
    lines[mid] = lines[mid][:10] + (b"A" if lines[mid][10:11] != b"A" else b"B") + lines[mid][11:]
    tampered = head + b"\r\n\r\n" + b"\r\n".join(lines)

    from gateway.delivery.relay import Route

    route = Route(B_DOMAIN, "127.0.0.1", pair.proxy.port, b.operator_dn)
    attempts = await a.workers.ctx.relay.send(route, CLINICIAN, [PRACTITIONER], tampered)
    assert attempts[0].ok, attempts
    await b.workers.run_once()
    inbound = [m for m in b.store.list(include_done=True) if m["origin"] == "inbound"]
    info = b.queue(inbound[0]["id"])
    assert _states(info) == {PRACTITIONER: "quarantined"}
    assert info["security"]["ok"] is False and info["security"]["failure"]
    assert b.mailbox(PRACTITIONER) == []
    assert [r["kind"] for r in b.receipts()] == ["dsn"]  # DSN to the sender (receipts.dsn_on_quarantine)


class Crash(BaseException):
    """A worker dying between relaying and recording the outcome."""


async def test_crash_after_relay_is_reclaimed_and_delivered_once(pair: Pair) -> None:
    a, b = pair.a, pair.b
    from gateway.queue.worker import Workers

    dead = Workers(a.settings, a.sessions, a.store, crypto_executor="inline", worker_id="dead-worker")

    def dying_commit(*args: object, **kwargs: object) -> None:  # dies where the outcomes would be written
        raise Crash()

    dead._commit = dying_commit  # type: ignore[method-assign]
    qid = a.enqueue(prescription(mdn=False), CLINICIAN, [PRACTITIONER])
    t0 = _now()
    with pytest.raises(Crash):
        await dead.run_once(now=t0)
    await dead.ctx.relay.close()  # type: ignore[attr-defined]  # its pooled connection dies with it
    assert len(b.store.list()) == 1  # B has it; A never learnt so
    assert a.queue(qid)["claimed_by"] == "dead-worker"
    assert await a.workers.run_once(now=t0 + dt.timedelta(seconds=5)) == 0  # lease still held
    lease = a.settings.queue.lease_seconds
    await pair.flow(now=t0 + dt.timedelta(seconds=lease + 5))
    assert _states(a.queue(qid)) == {PRACTITIONER: "delivered"}
    assert len(b.store.list(include_done=True)) == 1  # the resend was a duplicate
    assert len(b.mailbox(PRACTITIONER)) == 1
    assert RecipientState.DELIVERED.value in _states(b.queue(b.store.list(include_done=True)[0]["id"])).values()


async def _sink(ctx: ssl.SSLContext, received: list[bytes]) -> tuple[asyncio.Server, int]:
    class Handler:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            received.append(envelope.original_content)
            return "250 2.0.0 OK"

    loop = asyncio.get_running_loop()
    port = free_port()
    server = await loop.create_server(
        lambda: AioSMTP(Handler(), tls_context=ctx, require_starttls=True, hostname="sink.test"), "127.0.0.1", port
    )
    return server, port


async def test_relay_to_independent_mta_is_plain_smime_openssl_accepts(pair: Pair, tmp_path: Path) -> None:
    a = pair.a
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    received: list[bytes] = []
    server, port = await _sink(ctx, received)
    rcpt = "doc@sink.test"
    from cryptography.hazmat.primitives import serialization

    from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key

    cert, key = issue_certificate(load_dev_pki(a.home / "pki"), kind="user", email=rcpt)
    save_certificate_and_key(cert, key, tmp_path / "doc.pem", tmp_path / "doc.key")
    with transaction(a.sessions) as s:
        admin.trust_domain(s, "sink.test", relay=f"127.0.0.1:{port}")
        admin.add_mailbox(s, rcpt, type="ORG")
        register_certificate(s, cert.public_bytes(serialization.Encoding.PEM), address=rcpt, purpose="smime")
        register_certificate(s, ca.cert_pem.bytes(), address=None, purpose="anchor")
    keys = a.workers.keys
    keys.invalidate()
    a.workers.ctx.relay = Relay(a.settings, anchors_pem=keys.trust().anchors, trust=keys.trust_store())
    original = prescription(to=rcpt, mdn=False)
    try:
        qid = a.enqueue(original, CLINICIAN, [rcpt])
        await a.workers.run_once()
        assert _states(a.queue(qid)) == {rcpt: "delivered"}
    finally:
        server.close()
        await server.wait_closed()
    assert len(received) == 1
    (tmp_path / "wire.eml").write_bytes(received[0])
    (tmp_path / "ca.pem").write_bytes(a.ca_pem)

    def openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", "cms", *args], capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")

    openssl("-decrypt", "-in", str(tmp_path / "wire.eml"), "-recip", str(tmp_path / "doc.pem"),
            "-inkey", str(tmp_path / "doc.key"), "-out", str(tmp_path / "signed.eml"))  # fmt: skip
    openssl("-verify", "-in", str(tmp_path / "signed.eml"), "-CAfile", str(tmp_path / "ca.pem"),
            "-purpose", "smimesign", "-out", str(tmp_path / "inner.eml"))  # fmt: skip
    inner = (tmp_path / "inner.eml").read_bytes()
    wrapped = parse(inner)
    assert wrapped.get_content_type() == "message/rfc822"
    got = wrapped.get_payload()[0]  # type: ignore[index]
    assert got["Subject"] == SUBJECT
    pdf = next(p for p in got.iter_attachments() if p.get_content_type() == "application/pdf")
    assert pdf.get_content() == PDF
    assert A_DOMAIN in got["From"]


async def test_openpgp_recipient_gets_pgp_mime_end_to_end(pair: Pair) -> None:
    """A recipient that publishes an OpenPGP key and no certificate: PGP/MIME from A, opened and verified at B."""
    from sqlalchemy import delete

    from certs import service as certs
    from directory.models import Certificate

    a, b = pair.a, pair.b
    with transaction(b.sessions) as s:  # B makes its practitioner's key pair; A imports the public half
        pharmacist_fpr = certs.pgp_generate(s, b.settings, PRACTITIONER)
    with transaction(a.sessions) as s:
        clinician_fpr = certs.pgp_generate(s, a.settings, CLINICIAN)
        s.execute(delete(Certificate).where(Certificate.address == PRACTITIONER))  # no S/MIME certificate
    pharmacist_pub = _export(b, pharmacist_fpr)
    clinician_pub = _export(a, clinician_fpr)
    with transaction(a.sessions) as s:
        certs.pgp_import(s, a.settings, PRACTITIONER, pharmacist_pub)
    with transaction(b.sessions) as s:
        certs.pgp_import(s, b.settings, CLINICIAN, clinician_pub)

    qid = a.enqueue(prescription(mdn=False), CLINICIAN, [PRACTITIONER])
    await a.workers.run_once()  # type: ignore[attr-defined]
    stored = b.store.read(b.store.list(include_done=True)[0]["id"])
    assert b"multipart/encrypted" in stored and SUBJECT.encode() not in stored
    await pair.flow()
    info = a.queue(qid)
    assert _states(info) == {PRACTITIONER: "delivered"}, _reply(info, PRACTITIONER)
    assert info["recipient_states"][0]["protection"] == "openpgp"
    inbox = b.mailbox(PRACTITIONER)
    assert len(inbox) == 1
    got = parse(inbox[0])
    assert "pgp=pass" in str(got["Authentication-Results"])
    attachments = [p for p in got.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert len(attachments) == 1 and attachments[0].get_content() == PDF
    assert b.store.list(include_done=True)[0]["bytes"] == "removed"


def _export(op: Operator, fpr: str) -> bytes:
    from gateway.crypto.openpgp import OpenPgp

    ring = OpenPgp(op.settings.gnupg_dir)
    try:
        return ring.export_public(fpr).encode()
    finally:
        ring.close()
