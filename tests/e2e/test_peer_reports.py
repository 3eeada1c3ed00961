"""Nothing lost silently: peers' clear reports reach our senders, and a quarantine tells the recipient.

Two real operators on loopback (``conftest.pair``).  A peer's message is injected the way its
MTA sends it: B's (or A's) real relay over verified mutual TLS to the other's inbound listener,
with the exact bytes a Postfix would send (a DSN in clear from the null reverse-path, or a
plain message).  The workers run for real; the Maildirs, the queue, the CLI, the log and the
``/metrics`` endpoint are read as an operator would.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from click.testing import CliRunner
from e2e_support import (
    A_DOMAIN,
    B_DOMAIN,
    CLINICIAN,
    PRACTITIONER,
    SUBJECT,
    Pair,
    free_port,
    parse,
    prescription,
)

from cli.main import cli
from gateway.delivery.relay import Route

BACKENDS = ("sqlite", "postgresql")  # the delivery tests run on both stores

METRICS_PORT = free_port()


@pytest.fixture
def b_settings() -> dict[str, dict[str, object]]:
    return {"listen": {"metrics": f"127.0.0.1:{METRICS_PORT}"}}


def _postfix_dsn(original_id: str, *, to: str = CLINICIAN) -> bytes:
    """A bounce as Postfix writes it: multipart/report, delivery-status, returned headers, in clear."""
    b = "7A3B1C2D.1764450000/mx.b.mssante.test"
    return (
        f"From: MAILER-DAEMON@mx.{B_DOMAIN} (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Date: Sun, 29 Nov 2026 22:00:00 +0100\r\n"
        f"Message-Id: <20261129210000.7A3B1C2D@mx.{B_DOMAIN}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{b}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n\r\n"
        f"--{b}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"This is the mail system at host mx.{B_DOMAIN}.\r\n\r\n"
        f"<{PRACTITIONER}>: mailbox full\r\n\r\n"
        f"--{b}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.{B_DOMAIN}\r\nArrival-Date: Sun, 29 Nov 2026 21:59:58 +0100\r\n\r\n"
        f"Final-Recipient: rfc822; {PRACTITIONER}\r\nOriginal-Recipient: rfc822;{PRACTITIONER}\r\n"
        "Action: failed\r\nStatus: 5.2.2\r\nDiagnostic-Code: x-unix; mailbox full\r\n\r\n"
        f"--{b}\r\nContent-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Dr Martin <{CLINICIAN}>\r\nTo: {PRACTITIONER}\r\nMessage-ID: {original_id}\r\n\r\n"
        f"--{b}--\r\n"
    ).encode()


async def test_clear_dsn_from_verified_peer_reaches_our_sender_not_the_quarantine(pair: Pair) -> None:
    a, b = pair.a, pair.b
    original_id = f"<sent.by.a@{A_DOMAIN}>"
    a.enqueue(prescription(message_id=original_id, mdn=False), CLINICIAN, [PRACTITIONER])
    await pair.flow()
    assert len(b.mailbox(PRACTITIONER)) == 1  # A really sent it; B's MTA now bounces it in clear

    route = Route(A_DOMAIN, "127.0.0.1", a.inbound_port, a.operator_dn)
    attempts = await b.workers.ctx.relay.send(route, "", [CLINICIAN], _postfix_dsn(original_id))
    assert attempts[0].ok, attempts
    await a.workers.run_once()

    assert a.store.quarantined() == []
    inbound = [m for m in a.store.list(include_done=True) if m["origin"] == "inbound"]
    info = a.queue(inbound[0]["id"])
    states = {r["address"]: (r["state"], r["protection"]) for r in info["recipient_states"]}
    assert states == {CLINICIAN: ("delivered", "peer-tls")}
    delivered = a.mailbox(CLINICIAN)
    assert len(delivered) == 1
    msg = parse(delivered[0])
    assert msg.get_content_type() == "multipart/report"
    results = " ".join(str(msg["Authentication-Results"]).split())  # unfolded
    assert results.startswith(f"{a.settings.hostname};")
    assert "smime=none" in results and "content unsigned" in results
    assert f"x-peer-tls=pass policy.peer-operator={B_DOMAIN}" in results
    assert original_id.encode() in delivered[0]
    assert [m for m in a.store.list(include_done=True) if m["kind"] in ("dsn", "mdn", "notice")] == []


async def test_clear_report_from_a_person_is_still_quarantined(pair: Pair) -> None:
    """The null reverse-path is part of the rule: a 'report' from a mailbox is no MTA's bounce."""
    a, b = pair.a, pair.b
    route = Route(A_DOMAIN, "127.0.0.1", a.inbound_port, a.operator_dn)
    attempts = await b.workers.ctx.relay.send(route, PRACTITIONER, [CLINICIAN], _postfix_dsn("<x@a>"))
    assert attempts[0].ok, attempts
    await a.workers.run_once()
    assert len(a.store.quarantined()) == 1


async def _scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    return raw.decode().partition("\r\n\r\n")[2]


async def test_clear_message_from_peer_is_quarantined_and_its_recipient_told_without_content(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair.a, pair.b
    caplog.set_level(logging.INFO)
    route = Route(B_DOMAIN, "127.0.0.1", pair.proxy.port, b.operator_dn)
    attempts = await a.workers.ctx.relay.send(route, CLINICIAN, [PRACTITIONER], prescription(mdn=False))
    assert attempts[0].ok, attempts
    await pair.flow()

    held = b.store.quarantined()
    assert len(held) == 1
    queue_id = held[0]["id"]
    # the recipient is told: one notice, from our postmaster, naming the sender and the reason, no content
    notices = [m for m in b.store.list(include_done=True) if m["kind"] == "notice"]
    assert len(notices) == 1 and b.queue(notices[0]["id"])["related_id"] == queue_id
    box = b.mailbox(PRACTITIONER)
    assert len(box) == 1
    assert SUBJECT.encode() not in box[0] and b"PRESCRIPTION-SECRET" not in box[0]
    inner = parse(box[0])  # a notice from our postmaster: delivered as it is, never wrapped
    assert inner.get_content_type() == "text/plain"
    text = inner.get_content()
    assert f"<{CLINICIAN}>" in text and queue_id in text and "not encrypted" in text
    assert "ordonnance" not in text.lower() and "DUPONT" not in text
    # the admin sees it with its reason
    runner = CliRunner()
    out = runner.invoke(cli, ["--data-dir", str(b.home), "queue", "quarantine", "list", "--json"])
    assert out.exit_code == 0, out.output
    assert queue_id in out.output and "quarantined: not-encrypted" in out.output
    # one log line naming the reason, no content anywhere in the log
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quarantined queue_id=")]
    assert lines == [f"quarantined queue_id={queue_id} from=<{CLINICIAN}> peer={A_DOMAIN} recipients=1 "
                     "reason=not-encrypted"]  # fmt: skip
    assert not any(SUBJECT in r.getMessage() or "PRESCRIPTION" in r.getMessage() for r in caplog.records)
    # and the metrics endpoint counts it
    body = await _scrape(METRICS_PORT)
    assert "# TYPE mssgw_quarantined_messages gauge\nmssgw_quarantined_messages 1.0\n" in body


async def test_quarantine_notice_is_queued_once_when_the_job_is_redone(pair: Pair) -> None:
    """The notice is part of the run's verdict: a run whose verdict is lost (a worker dying before
    its commit) queues nothing, and a second verdict committed for the same claim (refused by
    the state table: the recipient is already quarantined) queues no second notice or DSN."""
    from gateway.process import pipeline

    a, b = pair.a, pair.b
    route = Route(B_DOMAIN, "127.0.0.1", pair.proxy.port, b.operator_dn)
    attempts = await a.workers.ctx.relay.send(route, CLINICIAN, [PRACTITIONER], prescription(mdn=False))
    assert attempts[0].ok, attempts
    claimed = await b.workers._claim(1)  # type: ignore[attr-defined]
    job, data = claimed[0]
    ctx = b.workers.ctx  # type: ignore[attr-defined]
    lost = await pipeline.run(ctx, job, data)  # never committed
    assert sorted(r.kind for r in lost.receipts) == ["dsn", "notice"]  # receipts.dsn_on_quarantine
    assert not [m for m in b.store.list(include_done=True) if m["origin"] == "receipt"]
    first, second = await pipeline.run(ctx, job, data), await pipeline.run(ctx, job, data)
    await b.workers._commit(job, first)  # type: ignore[attr-defined]
    await b.workers._commit(job, second)  # type: ignore[attr-defined]
    receipts = sorted(m["kind"] for m in b.store.list(include_done=True) if m["origin"] == "receipt")
    assert receipts == ["dsn", "notice"]
