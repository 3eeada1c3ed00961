"""DSN (RFC 3464) and MDN (RFC 8098) structure, checked with the standard library's parser."""

from __future__ import annotations

import datetime as dt
from email import message_from_bytes, message_from_string, policy

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


def test_header_fields_stay_seven_bit_unless_an_address_needs_utf8() -> None:
    """The ``email`` package writes the receipt: a non-ASCII subject becomes an encoded word
    (RFC 2047) for an ASCII recipient, while an internationalised address (accepted with
    SMTPUTF8) is written in UTF-8, never as an encoded word, which no address may be."""
    original = ORIGINAL.replace(b"Subject: Ordonnance DUPONT", "Subject: Compte rendu d'échographie".encode())
    ascii_mdn = build_mdn(reporting_ua="mx.b.test", from_addr="<postmaster@b.test>", to="dr.martin@a.test",
                          final_recipient="ph@b.test", original=original, now=NOW)  # fmt: skip
    head = ascii_mdn.split(b"\r\n\r\n", 1)[0]
    assert head.isascii() and b"=?utf-8?" in head
    assert parse(ascii_mdn)["Subject"] == "Processed: Compte rendu d'échographie"

    utf8_dsn = build_dsn(reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="jérôme@a.test",
                         recipients=[DsnRecipient("ph@b.test", "failed", "5.1.1", "550 5.1.1 unknown")],
                         original=original, arrival=NOW, now=NOW)  # fmt: skip
    assert "To: <jérôme@a.test>".encode() in utf8_dsn and b"=?utf-8?q?j" not in utf8_dsn
    head = utf8_dsn.split(b"\r\n\r\n", 1)[0].decode("utf-8")  # RFC 6532: header fields in UTF-8
    assert message_from_string(head + "\r\n\r\n", policy=policy.default)["To"].addresses[0].addr_spec == "jérôme@a.test"


def test_report_parts_are_delimited_by_a_boundary_found_in_no_part() -> None:
    """The generator picks the boundary: an original whose headers already carry the usual
    boundary text of the ``email`` package cannot cut the report in two."""
    hostile = ORIGINAL.replace(b"To: ph@b.test", b"To: ph@b.test\r\nX-Trap: --===============0000000000000000000==")
    msg = parse(build_dsn(reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="s@a.test",
                          recipients=[DsnRecipient("ph@b.test", "failed", "5.1.1", "550 5.1.1 unknown")],
                          original=hostile, arrival=NOW, now=NOW))  # fmt: skip
    assert msg.get_content_type() == "multipart/report"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_long_identifiers_stay_whole_and_controls_never_pass() -> None:
    """A 120-character Message-ID, a 100-character ENVID and a long peer reply are written as they
    are (never as RFC 2047 encoded words, which no msg-id or report field may be); an ESC or other
    control from a peer's reply is not copied; extension fields follow Arrival-Date (RFC 3464 §2.2)."""
    long_id = "<" + "k" * 100 + "@mail.example-operator.test>"
    original = ORIGINAL.replace(b"<rx1@a.test>", long_id.encode())
    envid = "E" * 100
    reply = "550 5.1.1 <ph@b.test>: " + "x" * 150 + " \x1b[31mred\x1b[0m"
    dsn = build_dsn(reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="s@a.test",
                    recipients=[DsnRecipient("ph@b.test", "failed", "5.1.1", reply, remote_mta="mx.b.test",
                                             original_recipient="rfc822;" + "o" * 80 + "@b.test")],
                    original=original, arrival=NOW, envelope_id=envid, queue_id="q1", now=NOW)  # fmt: skip
    mdn = build_mdn(reporting_ua="mx.b.test", from_addr="<postmaster@b.test>", to="dr.martin@a.test",
                    final_recipient="ph@b.test", original=original, now=NOW)  # fmt: skip
    for data in (dsn, mdn):
        assert b"=?utf-8?" not in data and b"\x1b" not in data
        assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert f"In-Reply-To: {long_id}\r\n".encode() in dsn and f"Original-Message-ID: {long_id}\r\n".encode() in mdn
    assert f"Original-Envelope-Id: {envid}\r\n".encode() in dsn
    assert b"Original-Recipient: rfc822; " + b"o" * 80 + b"@b.test\r\n" in dsn
    assert b"Diagnostic-Code: smtp; 550 5.1.1 <ph@b.test>: " + b"x" * 150 in dsn
    assert dsn.index(b"Arrival-Date:") < dsn.index(b"X-Mssgw-Queue-ID:")


def test_an_mdn_goes_only_to_the_sender_or_the_from() -> None:
    from gateway.delivery.receipts import mdn_goes_to_its_sender

    request = mdn_request(ORIGINAL)  # Disposition-Notification-To: dr.martin@a.test, the From
    assert request is not None
    assert mdn_goes_to_its_sender(request, ORIGINAL, envelope_sender="other@a.test")  # the From
    assert mdn_goes_to_its_sender(request, ORIGINAL, envelope_sender="DR.MARTIN@a.test")  # the Return-Path
    third = ORIGINAL.replace(b"Disposition-Notification-To: dr.martin@a.test", b"Disposition-Notification-To: x@z.test")
    request = mdn_request(third)
    assert request is not None and not mdn_goes_to_its_sender(request, third, envelope_sender="dr.martin@a.test")
