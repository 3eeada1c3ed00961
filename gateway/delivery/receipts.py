"""Delivery receipts: DSNs (RFC 3464) for failed, delayed or asked-for successful delivery, MDNs (RFC 8098).

The job: build the bytes of a receipt, and tell whether a message asks for one or must never
get one.  Receipts are plain messages; the pipeline enqueues them (origin ``receipt``, kind
``dsn``/``mdn``, ``related_id`` the original) so they travel the same road, signed and
encrypted like any other message.

- DSN: ``multipart/report; report-type=delivery-status`` (RFC 6522) with a short human part,
  a ``message/delivery-status`` part (RFC 3464 §2: per-message fields, then per recipient
  ``Final-Recipient``/``Action``/``Status``/``Remote-MTA``/``Diagnostic-Code``) and the original
  *headers only* as ``text/rfc822-headers``: a DSN never carries the body (RET=FULL is answered
  as RET=HDRS, RFC 3461 §4.3 leaves it to us: health content stays off the return path).  ``Original-Envelope-Id``
  only when the sender gave an ENVID (RFC 3461 §4.4), ``Original-Recipient`` only when it gave an
  ORCPT (§4.2); ``Diagnostic-Code`` only for a reply a
  remote server actually sent (RFC 3464 §2.3.6): our own reasons are in the human part.
- MDN: ``multipart/report; report-type=disposition-notification`` (RFC 8098 §3) with
  ``Disposition: automatic-action/MDN-sent-automatically; processed`` (or ``dispatched`` with the
  Direct Project's ``X-DIRECT-FINAL-DESTINATION-DELIVERY`` extension field).  A message we could
  not accept is ``processed/error`` with an ``Error`` field (RFC 8098 §3.2.6.3), or, for peers
  that expect the Direct Project's form (``MDN_FORM_DIRECT``), the disposition type ``failed``
  of the Direct delivery-notification guide.  ``Original-Recipient`` only when the original
  carried one (RFC 8098 §3.2.3: it comes from the ORCPT the MTA recorded), and
  ``Original-Message-ID`` only when the original's Message-ID is a msg-id.
- Loops (RFC 3834 §2, RFC 8098 §2.1, RFC 3464 §2): a report, an ``Auto-Submitted`` message or one
  from the null reverse-path never triggers a receipt.

The bytes are written by the standard ``email`` package (``EmailMessage``, ``policy.SMTP``): it
chooses the boundary, folds and encodes header fields (RFC 2047 words for a non-ASCII subject,
UTF-8 when an address needs it) and places each delimiter's CRLF (RFC 2046 §5.1.1).  No
byte-exact writing is needed here: a receipt is signed after it is built, like any message.

Errors: none of its own; bad input headers are read leniently (a receipt must not fail because
the original was odd).  Values written into headers are stripped of CR/LF.
"""

from __future__ import annotations

import datetime as _dt
import email.policy
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime, make_msgid

from gateway.crypto import _mime

__all__ = [
    "MDN_FORM_DIRECT",
    "MDN_FORM_RFC8098",
    "DsnRecipient",
    "build_dsn",
    "build_mdn",
    "build_notice",
    "is_report",
    "mdn_from",
    "mdn_goes_to_its_sender",
    "mdn_request",
    "original_headers",
    "receipt_author",
]

MAX_ORIGINAL_HEADERS = 64 * 1024
DIRECT_FINAL_DELIVERY = "X-DIRECT-FINAL-DESTINATION-DELIVERY"
# Every C0 control and DEL (RFC 5322 §3.2.5 text excludes them; an ESC from a peer's reply would
# reach the reader's terminal), CR and LF included (header injection).
_CTL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5322 §3.6.4 msg-id, in its common dot-atom form (the obsolete forms are not copied).
_MSG_ID = re.compile(r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\[\]-]+>")
# RFC 8098 §3.2.3 original-recipient-field value: address-type ";" generic-address.
_ORCPT = re.compile(r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)[ \t]*;[ \t]*(\S[^\r\n]*)")
_SMTP_REPLY = re.compile(r"^[245]\d\d[ -]")

MDN_FORM_RFC8098 = "rfc8098"  # failure: "processed/error" + Error field (RFC 8098 §3.2.6)
MDN_FORM_DIRECT = "direct"  # failure: "failed", as the Direct Project's delivery-notification guide


def _clean(value: str) -> str:
    return _CTL.sub(" ", value).strip()


@dataclass(frozen=True)
class DsnRecipient:
    """One recipient's line in a DSN (RFC 3464 §2.3)."""

    address: str
    action: str  # failed, delayed, delivered, relayed, expanded
    status: str  # enhanced status code, e.g. 5.7.1 (RFC 3463)
    diagnostic: str = ""  # the remote reply or our reason, e.g. "550 5.1.1 unknown"
    remote_mta: str | None = None
    last_attempt: _dt.datetime | None = None
    will_retry_until: _dt.datetime | None = None
    #: The ORCPT the sender gave (RFC 3461 §4.2), decoded: ``rfc822;address``; None when it gave none.
    original_recipient: str | None = None


def original_headers(message: bytes) -> bytes:
    """The header block of ``message`` (CRLF, bounded), for ``text/rfc822-headers``."""
    try:
        block, _ = _mime.split_entity(message[: MAX_ORIGINAL_HEADERS + 4096])
    except ValueError:
        return b""
    block = _mime.to_crlf(block[:MAX_ORIGINAL_HEADERS])
    return block if block.endswith(b"\r\n") else block + b"\r\n"


def _fields(message: bytes) -> list[tuple[str, str, bytes]]:
    try:
        return _mime.parse_headers(original_headers(message))
    except ValueError:
        return []


def is_report(message: bytes, *, envelope_sender: str | None = None) -> bool:
    """True for messages that must never get a receipt: reports, auto-submitted, null sender."""
    if envelope_sender == "":
        return True
    fields = _fields(message)
    mtype, _ = _mime.content_type(_mime.header_value(fields, "content-type"))
    if mtype == "multipart/report":
        return True
    auto = (_mime.header_value(fields, "auto-submitted") or "no").strip().lower()
    return auto != "no"


@dataclass(frozen=True)
class MdnRequest:
    address: str  # where to send the MDN (Disposition-Notification-To)
    dispatched: bool  # the Direct "final destination delivery" option was asked
    message_id: str | None
    subject: str


MAX_ADDRESS = 254  # RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its angle brackets


def mdn_request(message: bytes) -> MdnRequest | None:
    """What the message asks for (RFC 8098 §2.1, Direct guide §3), or None when no MDN is asked."""
    fields = _fields(message)
    dnt = _mime.header_value(fields, "disposition-notification-to")
    addr = _mime.first_address(dnt) if dnt else None
    if not addr or len(addr) > MAX_ADDRESS:  # a longer one is no SMTP path (and no queue column holds it)
        return None
    options = (_mime.header_value(fields, "disposition-notification-options") or "").upper()
    dispatched = DIRECT_FINAL_DELIVERY in options and "TRUE" in options.split(DIRECT_FINAL_DELIVERY, 1)[1][:40]
    return MdnRequest(
        address=addr,
        dispatched=dispatched,
        message_id=_mime.header_value(fields, "message-id"),
        subject=_mime.header_value(fields, "subject") or "",
    )


def mdn_goes_to_its_sender(request: MdnRequest, message: bytes, *, envelope_sender: str) -> bool:
    """Whether an automatic MDN may go where ``request`` asks (RFC 8098 §2.1).

    Only to the envelope sender (the Return-Path) or the message's own From (verified by its
    signature before any MDN is sent): a Disposition-Notification-To naming anybody else would
    let a sender make us mail a third party (or a mailbox that does not exist) on its behalf,
    and RFC 8098 asks a person, never an automaton, to confirm such a notification."""
    author = _mime.first_address(_mime.header_value(_fields(message), "from"))
    allowed = {a.lower() for a in (envelope_sender, author) if a}
    return request.address.lower() in allowed


def mdn_from(profile: str, *, postmaster: str, final_recipient: str) -> str:
    """The From of an MDN we send: our postmaster (RFC 8098 leaves it to us), or, under the Direct
    profile, the final recipient, on whose behalf the gateway answers (Direct delivery-notification guide)."""
    return f"<{final_recipient if profile == MDN_FORM_DIRECT else postmaster}>"


def receipt_author(receipt: bytes) -> str | None:
    """The From address of a receipt we built, lower-cased: the address whose certificate signs it.

    Receipts travel with the null reverse-path, so the envelope names no signer; signing with
    the certificate for the From (the address's own, else the operator's domain-bound one,
    whose dNSName is the From's domain: Direct Applicability Statement 1.2 §4) keeps the
    signature and the From in agreement for the peer that checks them."""
    return _mime.first_address(_mime.header_value(_fields(receipt), "from"))


#: RFC 5322 with CRLF line ends, 78-column folding, 8-bit bodies where a part needs them; header
#: values that are not ASCII become RFC 2047 encoded words, so every header line stays 7-bit.
#: Lines are folded only past RFC 5322's 998 octets: a msg-id, an ENVID, an ORCPT or a diagnostic has
#: no folding white space, and the package would otherwise turn it into encoded words (RFC 2047), which
#: no msg-id (RFC 5322 §3.6.4) or report field (RFC 3464 §2, RFC 8098 §3.2) may be.
POLICY = email.policy.SMTP.clone(max_line_length=998)
#: For a receipt to or from an internationalised address (RFC 6531/6532, accepted with SMTPUTF8):
#: an address cannot be an encoded word, so its header fields are written in UTF-8.
POLICY_UTF8 = email.policy.SMTPUTF8.clone(max_line_length=998)
REPORT_PREAMBLE = "This is a MIME-encapsulated report."


def _automatic(*, from_addr: str, to: str, subject: str, domain: str, now: _dt.datetime,
               auto_submitted: str = "auto-replied", extra: Sequence[tuple[str, str]] = ()) -> EmailMessage:  # fmt: skip
    """The header section of a message the gateway writes itself (RFC 3834 ``Auto-Submitted``)."""
    policy = POLICY if f"{from_addr}{to}".isascii() else POLICY_UTF8
    msg = EmailMessage(policy=policy)
    msg["From"] = _clean(from_addr)
    msg["To"] = f"<{_clean(to)}>"
    msg["Subject"] = _clean(subject)
    msg["Date"] = now
    msg["Message-ID"] = make_msgid(domain=domain)
    msg["Auto-Submitted"] = auto_submitted
    for name, value in extra:
        msg[name] = _clean(value)
    return msg


def _written(msg: EmailMessage) -> bytes:
    out = io.BytesIO()
    BytesGenerator(out, policy=msg.policy).flatten(msg)
    return out.getvalue()


def build_notice(*, from_addr: str, to: str, subject: str, text: str, domain: str, now: _dt.datetime,
                 extra: Sequence[tuple[str, str]] = ()) -> bytes:  # fmt: skip
    """A plain ``text/plain`` notice from the gateway (``Auto-Submitted: auto-generated``), e.g.
    the quarantine notice: written by the ``email`` package like the reports."""
    msg = _automatic(from_addr=from_addr, to=to, subject=subject, domain=domain, now=now,
                     auto_submitted="auto-generated", extra=extra)  # fmt: skip
    msg.set_content(text, subtype="plain", charset="utf-8")
    return _written(msg)


def _report(*, from_addr: str, to: str, subject: str, report_type: str, domain: str,
            in_reply_to: str | None, now: _dt.datetime, parts: Sequence[MIMEPart]) -> bytes:  # fmt: skip
    """A ``multipart/report`` (RFC 6522) around ``parts``, written by the ``email`` package.

    The generator picks a boundary found in none of the parts, folds long header lines and
    puts each delimiter's CRLF where RFC 2046 §5.1.1 wants it."""
    threading = [("In-Reply-To", in_reply_to), ("References", in_reply_to)] if in_reply_to else []
    msg = _automatic(from_addr=from_addr, to=to, subject=subject, domain=domain, now=now, extra=threading)
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/report"
    msg.set_param("report-type", report_type)
    msg.preamble = REPORT_PREAMBLE
    msg.set_payload(list(parts))
    return _written(msg)


def _text_part(text: str, description: str = "") -> MIMEPart:
    """A human-readable ``text/plain; charset=utf-8`` part (the library chooses its transfer encoding)."""
    part = MIMEPart(policy=POLICY)
    part.set_content(text, subtype="plain", charset="utf-8")
    if description:
        part["Content-Description"] = description
    return part


def _headers_part(headers: bytes, description: str = "") -> MIMEPart:
    """The original's header section as ``text/rfc822-headers`` (RFC 6522 §4), its bytes untouched:
    7bit when ASCII, else 8bit (a header written in raw UTF-8, RFC 6532)."""
    part = MIMEPart(policy=POLICY)
    part.set_content(headers, maintype="text", subtype="rfc822-headers",
                     cte="7bit" if headers.isascii() else "8bit")  # fmt: skip
    if description:
        part["Content-Description"] = description
    return part


def _fields_block(fields: Sequence[tuple[str, str]]) -> Message:
    """One block of report fields (RFC 3464 §2): a header section of its own, which the
    generator writes for ``message/delivery-status`` with a blank line between blocks."""
    block = Message(policy=POLICY)
    for name, value in fields:
        block[name] = value
    return block


def _delivery_status_part(blocks: Sequence[Sequence[tuple[str, str]]]) -> MIMEPart:
    """``message/delivery-status`` (RFC 3464 §2): the per-message block, then one per recipient."""
    part = MIMEPart(policy=POLICY)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.set_payload([_fields_block(b) for b in blocks])
    return part


def _disposition_part(fields: Sequence[tuple[str, str]]) -> MIMEPart:
    """``message/disposition-notification`` (RFC 8098 §3.1): one block of fields, each folded and
    encoded by the policy (the ``email`` package has no writer of its own for this type)."""
    part = MIMEPart(policy=POLICY)
    part["Content-Type"] = "message/disposition-notification"
    part.set_payload("".join(POLICY.fold(name, value) for name, value in fields))
    return part


def build_dsn(
    *,
    reporting_mta: str,
    postmaster: str,
    to: str,
    recipients: Sequence[DsnRecipient],
    original: bytes,
    arrival: _dt.datetime,
    envelope_id: str | None = None,
    queue_id: str | None = None,
    now: _dt.datetime | None = None,
) -> bytes:
    """A delivery status notification to ``to`` about ``recipients`` of ``original`` (headers only).

    ``envelope_id``: the ENVID the sender gave (RFC 3461 §4.4), never one of ours.  ``queue_id``:
    our own queue id, in an extension field (``X-Mssgw-Queue-ID``, as Postfix writes its own)."""
    now = now or _dt.datetime.now(_dt.UTC)
    headers = original_headers(original)
    delayed = all(r.action == "delayed" for r in recipients)
    success = all(r.action in ("delivered", "relayed", "expanded") for r in recipients)
    if success:  # asked with NOTIFY=SUCCESS (RFC 3461 §4.1)
        subject, summary = "Successful Mail Delivery Report", "Your message was delivered as you asked to be told."
    elif delayed:
        subject, summary = "Delayed Mail (still being retried)", "Your message is delayed; delivery is still being attempted."
    else:
        subject, summary = "Undelivered Mail Returned to Sender", "Your message could not be delivered to one or more recipients."
    human = [f"This is the mail system at {reporting_mta}.", "", summary, ""]
    for r in recipients:
        human.append(f"<{_clean(r.address)}>: {r.action}, {_clean(r.diagnostic) or r.status}")
    per_message = [("Reporting-MTA", f"dns; {_clean(reporting_mta)}")]
    if envelope_id:
        per_message.insert(0, ("Original-Envelope-Id", _clean(envelope_id)))
    per_message.append(("Arrival-Date", format_datetime(arrival)))
    if queue_id:  # extension fields come last (RFC 3464 §2.2)
        per_message.append(("X-Mssgw-Queue-ID", _clean(queue_id)))
    blocks = [per_message]
    for r in recipients:
        f = [("Original-Recipient", _original_recipient(r.original_recipient))] if r.original_recipient else []
        f += [
            ("Final-Recipient", f"rfc822; {_clean(r.address)}"),
            ("Action", r.action),
            ("Status", r.status),
        ]
        if r.remote_mta:
            f.append(("Remote-MTA", f"dns; {_clean(r.remote_mta)}"))
            if _SMTP_REPLY.match(r.diagnostic):  # the reply the remote server sent
                f.append(("Diagnostic-Code", f"smtp; {_clean(r.diagnostic)[:900]}"))
        f.append(("Last-Attempt-Date", format_datetime(r.last_attempt or now)))
        if r.will_retry_until:
            f.append(("Will-Retry-Until", format_datetime(r.will_retry_until)))
        blocks.append(f)
    domain = postmaster.rpartition("@")[2] or reporting_mta
    return _report(
        from_addr=f"Mail Delivery System <{postmaster}>", to=to, subject=subject,
        report_type="delivery-status", domain=domain,
        in_reply_to=_mime.header_value(_fields(original), "message-id"), now=now,
        parts=[
            _text_part("\n".join(human) + "\n", "Notification"),
            _delivery_status_part(blocks),
            _headers_part(headers, "Message headers" if success or delayed else "Undelivered message headers"),
        ],
    )  # fmt: skip


def _original_recipient(orcpt: str) -> str:
    """RFC 3464 §2.3.1: ``address-type ";" generic-address``, from the decoded ORCPT."""
    addr_type, _, address = _clean(orcpt).partition(";")
    return f"{addr_type}; {address.strip()}"


def build_mdn(
    *,
    reporting_ua: str,
    from_addr: str,
    to: str,
    final_recipient: str,
    original: bytes,
    disposition: str = "processed",
    error: str | None = None,
    failed_form: str = MDN_FORM_RFC8098,
    now: _dt.datetime | None = None,
) -> bytes:
    """A message disposition notification (RFC 8098 §3) about ``original`` for ``final_recipient``.

    ``disposition``: processed, dispatched (Direct final delivery), displayed, deleted, or
    failed: the message was received but could not be accepted, written ``processed/error``
    (RFC 8098) or ``failed`` (``failed_form=MDN_FORM_DIRECT``), with ``error`` in an ``Error``
    field."""
    if disposition not in {"processed", "dispatched", "failed", "displayed", "deleted"}:
        raise ValueError(f"unknown disposition {disposition}")
    if failed_form not in (MDN_FORM_RFC8098, MDN_FORM_DIRECT):
        raise ValueError(f"unknown MDN form {failed_form}")
    now = now or _dt.datetime.now(_dt.UTC)
    fields = _fields(original)
    message_id = _mime.header_value(fields, "message-id")
    if message_id is not None and not _MSG_ID.fullmatch(message_id.strip()):
        message_id = None  # not a msg-id: neither copied into the report nor referenced
    subject = _mime.header_value(fields, "subject") or ""
    report = [("Reporting-UA", f"{_clean(reporting_ua)}; mssgw")]
    orcpt = _ORCPT.fullmatch(_clean(_mime.header_value(fields, "original-recipient") or ""))
    if orcpt:
        report.append(("Original-Recipient", f"{orcpt.group(1)}; {orcpt.group(2).strip()}"))
    report.append(("Final-Recipient", f"rfc822; {_clean(final_recipient)}"))
    if message_id:
        report.append(("Original-Message-ID", message_id.strip()))
    written = disposition
    if disposition == "failed" and failed_form == MDN_FORM_RFC8098:
        written = "processed/error"
        error = error or "the message could not be processed"
    report.append(("Disposition", f"automatic-action/MDN-sent-automatically; {written}"))
    if disposition == "dispatched":
        report.append((DIRECT_FINAL_DELIVERY, ""))
    if error:
        report.append(("Error", _clean(error)[:900]))
    verb = {"processed": "has been received and processed", "dispatched": "has been delivered to the mailbox",
            "failed": "could not be processed"}.get(disposition, f"was {disposition}")  # fmt: skip
    human = (
        f"The message sent to {final_recipient} ({_clean(subject) or 'no subject'}) {verb}.\n"
        "This is an automatic notification; it does not mean the message was read.\n"
    )
    return _report(
        from_addr=from_addr, to=to, subject=f"{disposition.capitalize()}: {_clean(subject)}"[:200],
        report_type="disposition-notification",
        domain=from_addr.rpartition("@")[2].strip(">") or reporting_ua, in_reply_to=message_id, now=now,
        parts=[
            _text_part(human),
            _disposition_part(report),
            _headers_part(original_headers(original)),
        ],
    )  # fmt: skip
