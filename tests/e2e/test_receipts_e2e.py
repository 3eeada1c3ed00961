"""Receipts between two operators, read by the strict RFC 8098/3464 parser and verified by the peer.

- An MDN leaves B from the null reverse-path (RFC 8098 §3), signed with the certificate for its
  From, so A verifies it (smime=pass: signature valid and From matching the signer) and
  delivers the report as B wrote it, which the strict parser accepts.
- A message B quarantines gets ``processed/error`` (RFC 8098), or ``failed`` From the final
  recipient under the Direct profile (``receipts.mdn_profile = "direct"``).
- A DSN for one of A's own senders is delivered as the report it is, not inside a signature
  wrapper, without an Original-Envelope-Id (no ENVID was given) and without a Diagnostic-Code
  no server sent.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from e2e_support import (
    A_DOMAIN,
    B_DOMAIN,
    CLINICIAN,
    COLLEAGUE,
    GHOST,
    PRACTITIONER,
    Pair,
    parse,
    prescription,
)

from gateway.delivery.relay import Route


def _strict() -> ModuleType:
    """The strict grammar parser of tests/gateway/delivery (one parser for the whole suite)."""
    path = Path(__file__).parents[1] / "gateway" / "delivery" / "test_receipts_strict.py"
    spec = importlib.util.spec_from_file_location("receipts_strict_parser", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


strict = _strict()


def _reports(raw_messages: list[bytes], report_type: str) -> list[bytes]:
    """The ``multipart/report`` messages of ``report_type``; the parameter may be quoted (RFC 2045 §5.1)."""
    wanted = re.compile(rf'report-type="?{re.escape(report_type)}"?'.encode(), re.IGNORECASE)
    return [m for m in raw_messages if wanted.search(m[:4096])]


def _results(raw: bytes) -> str:
    return " ".join(str(parse(raw)["Authentication-Results"]).split())


def _without_results(raw: bytes) -> bytes:
    """The delivered report minus what A's delivery put on top (Return-Path, Received, Authentication-Results)."""
    added = (b"return-path:", b"received:", b"authentication-results:")
    pos = 0
    while raw[pos:pos + 32].lower().startswith(added):
        end = raw.index(b"\r\n", pos)
        while raw[end + 2 : end + 3] in (b" ", b"\t"):
            end = raw.index(b"\r\n", end + 2)
        pos = end + 2
    assert pos > 0 and b"Authentication-Results" not in raw[pos:].partition(b"\r\n\r\n")[0]
    return raw[pos:]


async def test_processed_mdn_from_the_null_path_signed_for_its_from(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.enqueue(prescription(), CLINICIAN, [PRACTITIONER])
    await pair.flow()
    (row,) = b.receipts("mdn")
    assert row["sender"] == "<>"  # RFC 8098 §3: the MDN's MAIL FROM is null
    (raw,) = _reports(a.mailbox(CLINICIAN), "disposition-notification")
    assert "smime=pass" in _results(raw)  # valid signature by a certificate matching the From
    report, fields = strict.parse_mdn(_without_results(raw))
    assert report.top.get("From") == f"<postmaster@{B_DOMAIN}>"
    assert fields["disposition"] == "automatic-action/MDN-sent-automatically; processed"
    assert "original-recipient" not in fields  # the original had none


def _mismatched(pair: Pair) -> bytes:
    """Signed by the clinician's certificate but From another mailbox: B quarantines it (from-mismatch)."""
    from gateway.process.outbound import protect_job

    a = pair.a
    msg = prescription(sender=COLLEAGUE).replace(f"Disposition-Notification-To: {COLLEAGUE}".encode(),
                                                 f"Disposition-Notification-To: {CLINICIAN}".encode())  # fmt: skip
    assert f"Disposition-Notification-To: {CLINICIAN}".encode() in msg
    signer = a.workers.keys.signer_for(CLINICIAN)  # type: ignore[attr-defined]
    certs = tuple(a.workers.keys.recipient_certs(PRACTITIONER))  # type: ignore[attr-defined]
    return protect_job(msg, signer, certs, True, "Message securise")


async def _send_quarantined(pair: Pair) -> bytes:
    a, b = pair.a, pair.b
    route = Route(B_DOMAIN, "127.0.0.1", pair.proxy.port, b.operator_dn)
    attempts = await a.workers.ctx.relay.send(route, CLINICIAN, [PRACTITIONER], _mismatched(pair))  # type: ignore[attr-defined]
    assert attempts[0].ok, attempts
    await pair.flow()
    assert b.mailbox(PRACTITIONER) and all(b"quarantine" in m for m in b.mailbox(PRACTITIONER))  # notice only
    (raw,) = _reports(a.mailbox(CLINICIAN), "disposition-notification")
    return raw


async def test_quarantined_message_gets_processed_error(pair: Pair) -> None:
    raw = await _send_quarantined(pair)
    assert "smime=pass" in _results(raw)
    report, fields = strict.parse_mdn(_without_results(raw))
    assert fields["disposition"] == "automatic-action/MDN-sent-automatically; processed/error"
    assert "from-mismatch" in fields["error"]
    assert report.top.get("To") == f"<{CLINICIAN}>"


class TestDirectProfile:
    @pytest.fixture
    def b_settings(self) -> dict[str, dict[str, object]]:
        return {"receipts": {"mdn_profile": "direct"}}

    async def test_failed_mdn_from_the_final_recipient(self, pair: Pair) -> None:
        raw = await _send_quarantined(pair)
        results = _results(raw)
        assert "smime=pass" in results, results  # signed for the recipient's address, From that address
        msg: Any = parse(_without_results(raw))
        assert msg["From"].addresses[0].addr_spec == PRACTITIONER
        fields = next(p for p in msg.walk() if p.get_content_type() == "message/disposition-notification")
        assert fields.get_payload()[0]["Disposition"] == "automatic-action/MDN-sent-automatically; failed"
        with pytest.raises(strict.GrammarError, match="Disposition"):  # not an RFC 8098 disposition type
            strict.parse_mdn(_without_results(raw))


async def test_dsn_to_a_local_sender_is_a_report_not_a_signature_wrapper(pair: Pair) -> None:
    a = pair.a
    qid = a.enqueue(prescription(to=GHOST, mdn=False), CLINICIAN, [GHOST])  # B refuses it: 550 5.1.1
    await pair.flow()
    (raw,) = _reports(a.mailbox(CLINICIAN), "delivery-status")
    top: EmailMessage = parse(raw)
    assert top.get_content_type() == "multipart/report"  # what a mail client shows as a bounce
    report, per_message, (rcpt,) = strict.parse_dsn(raw)
    assert "original-envelope-id" not in per_message and per_message["x-mssgw-queue-id"] == qid
    assert rcpt["action"] == "failed" and rcpt["status"].startswith("5.")
    assert rcpt["diagnostic-code"].startswith("smtp; 550")  # B's server replied
    assert report.top.get("From") == f"Mail Delivery System <postmaster@{A_DOMAIN}>"


async def test_the_dsn_request_is_passed_on_and_the_peer_reports_delivery(pair: Pair) -> None:
    """RFC 3461 §6.2: B advertises DSN, so A passes ENVID, RET, NOTIFY and ORCPT on (xtext) and
    sends no "relayed" notice; B delivers and answers NOTIFY=SUCCESS with a "delivered" DSN that
    carries the sender's envelope id and original recipient back to it."""
    a = pair.a
    envid = "rx 42+ordonnance"  # a space and a plus: both must travel xtext-encoded
    a.store.enqueue(prescription(mdn=False), sender=CLINICIAN, recipients=[PRACTITIONER], origin="submission",
                    auth_identity=CLINICIAN, dsn_envid=envid, dsn_ret="HDRS",
                    dsn_notify={PRACTITIONER: "SUCCESS,FAILURE"},
                    dsn_orcpt={PRACTITIONER: f"rfc822;{PRACTITIONER}"})  # fmt: skip
    await pair.flow()
    (raw,) = _reports(a.mailbox(CLINICIAN), "delivery-status")  # B's, and no "relayed" one from A
    report, per_message, (fields,) = strict.parse_dsn(raw)
    assert report.top.get("From") == f"Mail Delivery System <postmaster@{B_DOMAIN}>"
    assert per_message["original-envelope-id"] == envid  # only B's copy of the request can say this
    assert fields["action"] == "delivered" and fields["original-recipient"] == f"rfc822; {PRACTITIONER}"



async def test_no_automatic_mdn_to_an_address_that_is_not_the_sender(pair: Pair) -> None:
    """RFC 8098 §2.1: a Disposition-Notification-To naming neither the envelope sender nor the
    (signed) From gets no automatic MDN: a sender cannot make B mail a third party."""
    a, b = pair.a, pair.b
    data = prescription(mdn=False).replace(b"Subject:", f"Disposition-Notification-To: {COLLEAGUE}\r\nSubject:".encode(), 1)
    a.enqueue(data, CLINICIAN, [PRACTITIONER])
    await pair.flow()
    assert b.receipts("mdn") == []
    assert _reports(a.mailbox(COLLEAGUE), "disposition-notification") == []
    assert parse(b.mailbox(PRACTITIONER)[0])["Subject"]  # delivered all the same


async def test_mail_between_two_of_our_mailboxes_gets_its_processed_mdn_too(pair: Pair) -> None:
    """Disposition-Notification-To asks the same of a colleague on this operator as of a peer's
    practitioner: one ``processed`` MDN from the postmaster, a report the strict parser reads."""
    a = pair.a
    a.enqueue(prescription(to=COLLEAGUE), CLINICIAN, [COLLEAGUE])
    await pair.flow()
    assert len(a.mailbox(COLLEAGUE)) == 1
    (raw,) = _reports(a.mailbox(CLINICIAN), "disposition-notification")
    report, fields = strict.parse_mdn(raw)
    assert report.top.get("From") == f"<postmaster@{A_DOMAIN}>"
    assert fields["final-recipient"] == f"rfc822; {COLLEAGUE}"
    assert fields["disposition"] == "automatic-action/MDN-sent-automatically; processed"
    assert b"Amoxicilline" not in raw and b"PRESCRIPTION-SECRET" not in raw
