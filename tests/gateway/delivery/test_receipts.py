"""DSN (RFC 3464) and MDN (RFC 8098) structure, checked with the standard library's parser."""

from __future__ import annotations

import datetime as dt
from email import message_from_bytes, policy

from gateway.delivery.receipts import DsnRecipient, build_dsn, build_mdn, is_report, mdn_request

ORIGINAL = (
    b"From: Dr Martin <dr.martin@a.test>\r\nTo: ph@b.test\r\nSubject: Ordonnance DUPONT\r\n"
    b"Message-ID: <rx1@a.test>\r\nDisposition-Notification-To: dr.martin@a.test\r\n"
    b"Disposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nSECRET BODY amoxicilline\r\n"
)
NOW = dt.datetime(2026, 11, 3, 10, 0, tzinfo=dt.UTC)


def parse(data: bytes):  # type: ignore[no-untyped-def]
    return message_from_bytes(data, policy=policy.default)


def test_dsn_is_a_delivery_status_report_with_headers_only() -> None:
    data = build_dsn(
        reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="dr.martin@a.test",
        recipients=[DsnRecipient("ph@b.test", "failed", "5.1.1", "550 5.1.1 unknown mailbox", remote_mta="mx.b.test"),
                    DsnRecipient("x@b.test", "failed", "4.4.7", "expired")],
        original=ORIGINAL, arrival=NOW, envelope_id="q1", now=NOW,
    )  # fmt: skip
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<rx1@a.test>"
    human, status, headers = msg.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    per_message, first, second = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.a.test"
    assert per_message["Original-Envelope-Id"] == "q1"
    assert first["Final-Recipient"] == "rfc822; ph@b.test"
    assert first["Action"] == "failed" and first["Status"] == "5.1.1"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown mailbox"
    assert first["Remote-MTA"] == "dns; mx.b.test"
    assert second["Status"] == "4.4.7" and second["Diagnostic-Code"] is None  # no server replied
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: Ordonnance DUPONT" in headers.get_content()
    assert b"SECRET BODY" not in data  # never the body
    assert not msg.defects


def test_delay_dsn_subject_and_retry_until() -> None:
    data = build_dsn(reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="s@a.test",
                     recipients=[DsnRecipient("ph@b.test", "delayed", "4.4.1", "451 4.4.1 no answer",
                                              will_retry_until=NOW + dt.timedelta(days=5))],
                     original=ORIGINAL, arrival=NOW, now=NOW)  # fmt: skip
    msg = parse(data)
    assert msg["Subject"].startswith("Delayed Mail")
    rcpt = list(msg.iter_parts())[1].get_payload()[1]
    assert rcpt["Action"] == "delayed" and "Will-Retry-Until" in rcpt


def test_mdn_processed_and_dispatched() -> None:
    for disposition in ("processed", "dispatched"):
        data = build_mdn(reporting_ua="mx.b.test", from_addr="<postmaster@b.test>", to="dr.martin@a.test",
                         final_recipient="ph@b.test", original=ORIGINAL, disposition=disposition, now=NOW)  # fmt: skip
        msg = parse(data)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "disposition-notification"
        parts = list(msg.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "message/disposition-notification",
                                                         "text/rfc822-headers"]  # fmt: skip
        fields = parts[1].get_payload()[0]
        assert fields["Disposition"] == f"automatic-action/MDN-sent-automatically; {disposition}"
        assert fields["Final-Recipient"] == "rfc822; ph@b.test"
        assert fields["Original-Message-ID"] == "<rx1@a.test>"
        assert (fields["X-DIRECT-FINAL-DESTINATION-DELIVERY"] is not None) == (disposition == "dispatched")
        assert is_report(data)  # an MDN never triggers a receipt
        assert b"SECRET BODY" not in data


def test_mdn_request_and_loop_rules() -> None:
    req = mdn_request(ORIGINAL)
    assert req is not None and req.address == "dr.martin@a.test" and req.dispatched
    assert mdn_request(ORIGINAL.replace(b"Disposition-Notification-To", b"X-Nothing")) is None
    plain = ORIGINAL.replace(b"Disposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true\r\n", b"")
    assert mdn_request(plain) is not None and not mdn_request(plain).dispatched  # type: ignore[union-attr]
    assert not is_report(ORIGINAL, envelope_sender="dr.martin@a.test")
    assert is_report(ORIGINAL, envelope_sender="")  # null reverse-path
    assert is_report(b"Auto-Submitted: auto-replied\r\n\r\nx")


def test_header_injection_is_neutralised() -> None:
    data = build_dsn(reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="s@a.test\r\nBcc: evil@x.test",
                     recipients=[DsnRecipient("ph@b.test\r\nX: y", "failed", "5.0.0", "550 bad\r\nX-Injected: 1")],
                     original=ORIGINAL, arrival=NOW, now=NOW)  # fmt: skip
    msg = parse(data)
    assert msg["Bcc"] is None
    assert b"\r\nX-Injected" not in data and b"\r\nX: y" not in data
