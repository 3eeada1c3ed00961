"""The rule that lets a verified peer's clear report through, and the quarantine notice's content.

Pure functions on exact bytes: each case changes one fact of an otherwise deliverable report
and must flip the answer (null sender, verified peer, clear content, report type, machine part,
local recipients).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from email import message_from_bytes, policy

import pytest

from gateway.crypto.result import SecurityResult
from gateway.process.common import Job
from gateway.process.reports import quarantine_notice, transport_report

NOW = dt.datetime(2026, 11, 29, 22, 0, tzinfo=dt.UTC)
CLEAR = SecurityResult().with_failure("not-encrypted", "message is not S/MIME enveloped-data")
JOB = Job(id="q1", origin="inbound", kind="message", sender="", created_at=NOW, expires_at=NOW, warned_at=None,
          peer_operator="b.test", message_id=None, related_id=None, recipients=())  # fmt: skip
DSN = (b"Received: from mx.b.test by mx.a.test; Sun, 29 Nov 2026 22:00:00 +0000\r\n"
       b"From: MAILER-DAEMON@b.test\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
       b'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
       b"--b1\r\nContent-Type: text/plain\r\n\r\nbounced\r\n"
       b"--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; b.test\r\n\r\n"
       b"Final-Recipient: rfc822; x@b.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
       b"--b1--\r\n")  # fmt: skip
MDN = (DSN.replace(b"report-type=delivery-status", b"report-type=disposition-notification")
       .replace(b"message/delivery-status", b"message/disposition-notification"))  # fmt: skip


def local(address: str) -> bool:
    return address.endswith("@a.test")


def test_clear_dsn_and_mdn_from_verified_peer_to_our_mailbox_pass() -> None:
    assert transport_report(JOB, DSN, CLEAR, ["dr@a.test"], local)
    assert transport_report(JOB, MDN, CLEAR, ["dr@a.test"], local)


@pytest.mark.parametrize("job, data, result, rcpts", [
    (replace(JOB, sender="dr@b.test"), DSN, CLEAR, ["dr@a.test"]),  # a person, not an MTA
    (replace(JOB, peer_operator=None), DSN, CLEAR, ["dr@a.test"]),  # no verified peer certificate
    (replace(JOB, peer_operator=""), DSN, CLEAR, ["dr@a.test"]),
    (replace(JOB, origin="submission"), DSN, CLEAR, ["dr@a.test"]),  # not the inbound listener
    (JOB, DSN, replace(CLEAR, signed=True, failure="bad-signature"), ["dr@a.test"]),  # broken signature
    (JOB, DSN, replace(CLEAR, encrypted=True, failure="decrypt-failed"), ["dr@a.test"]),
    (JOB, DSN, CLEAR, ["dr@a.test", "x@elsewhere.test"]),  # not all ours
    (JOB, DSN, CLEAR, []),
    (JOB, DSN.replace(b"multipart/report", b"multipart/mixed"), CLEAR, ["dr@a.test"]),  # not a report
    (JOB, DSN.replace(b"report-type=delivery-status", b"report-type=x-spam"), CLEAR, ["dr@a.test"]),
    (JOB, DSN.replace(b"message/delivery-status", b"text/plain"), CLEAR, ["dr@a.test"]),  # no machine part
], ids=["person", "no-peer", "empty-peer", "submission", "bad-signature", "undecryptable", "foreign-rcpt",
        "no-rcpt", "mixed", "other-report", "no-status-part"])  # fmt: skip
def test_each_missing_fact_sends_it_to_quarantine(job: Job, data: bytes, result: SecurityResult,
                                                  rcpts: list[str]) -> None:  # fmt: skip
    assert not transport_report(job, data, result, rcpts, local)


def test_notice_names_envelope_and_reason_only_and_resists_header_injection() -> None:
    job = replace(JOB, sender="dr@b.test\r\nBcc: evil@x.test")
    raw = quarantine_notice(hostname="mx.a.test", postmaster="postmaster@a.test", to="dr@a.test", job=job,
                            failure="not-encrypted", now=NOW)  # fmt: skip
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nBcc:" not in head and b"\r\nBcc:" not in body
    assert b"X-Mssgw-Quarantined: q1" in head and b"Auto-Submitted: auto-generated" in head
    text = message_from_bytes(raw, policy=policy.default).get_content()  # type: ignore[attr-defined]
    assert "because it was not encrypted" in text and "Queue id: q1" in text and "b.test" in text
    assert "\nBcc:" not in text
