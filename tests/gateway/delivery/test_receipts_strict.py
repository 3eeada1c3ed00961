"""Receipts checked by a strict parser written from the grammars, not from our builder.

`StrictReport` knows RFC 5322 (header section: field names, CRLF line ends, folding, 998-octet
lines, date-time), RFC 2045/2046 (Content-Type parameters, multipart delimiters), RFC 6522
(multipart/report: report-type, 2 or 3 parts) and the ABNF of RFC 8098 §3.1
(message/disposition-notification) and RFC 3464 §2 (message/delivery-status).  It refuses
anything the grammar does not produce: a bare LF, a field line without its CRLF, an unknown
disposition type, a Status outside class 2/4/5, a field twice, a required field missing.
It shares no code with gateway.delivery.receipts nor gateway.crypto._mime.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.delivery.receipts import (
    MDN_FORM_DIRECT,
    MDN_FORM_RFC8098,
    DsnRecipient,
    build_dsn,
    build_mdn,
    mdn_from,
    receipt_author,
)

# --- RFC 5234 / 5322 building blocks ---------------------------------------------------------------

ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
ATOM = f"{ATEXT}+"
DOT_ATOM = f"{ATOM}(?:\\.{ATOM})*"
QTEXT = r"[\x21\x23-\x5b\x5d-\x7e]"
QUOTED_STRING = f'"(?:{QTEXT}|\\\\[\\x20-\\x7e]|[ \\t])*"'
LOCAL_PART = f"(?:{DOT_ATOM}|{QUOTED_STRING})"
DOMAIN = f"(?:{DOT_ATOM}|\\[[\\x21-\\x5a\\x5e-\\x7e]*\\])"
ADDR_SPEC = f"{LOCAL_PART}@{DOMAIN}"
MSG_ID = f"<{DOT_ATOM}@(?:{DOT_ATOM}|\\[[\\x21-\\x5a\\x5e-\\x7e]*\\])>"
DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
DATE_TIME = f"(?:{DAY}, )?\\d{{1,2}} {MONTH} \\d{{4}} \\d\\d:\\d\\d(?::\\d\\d)? [+-]\\d{{4}}"
TOKEN = r"[!#$%&'*+.0-9A-Z^_`a-z|~-]+"  # RFC 2045 token: no tspecials, no space, no CTL
TEXT = r"[\x01-\x09\x0b\x0c\x0e-\x7f]"  # RFC 5322 text (obsolete text without CR/LF)
FIELD_NAME = r"[\x21-\x39\x3b-\x7e]+"


class GrammarError(AssertionError):
    """The bytes are not what the grammar produces."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise GrammarError(what)


@dataclass
class Entity:
    fields: list[tuple[str, str]]  # (name as written, unfolded value)
    body: bytes

    def get(self, name: str) -> str | None:
        values = [v for n, v in self.fields if n.lower() == name.lower()]
        check(len(values) <= 1, f"{name} appears {len(values)} times")
        return values[0] if values else None


def header_section(data: bytes, *, allow_empty: bool = False) -> tuple[list[tuple[str, str]], int]:
    """RFC 5322 §2.2 fields up to the empty line; each line ends with CRLF and has at most 998 octets."""
    fields: list[tuple[str, str]] = []
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        check(eol >= 0, "header line without CRLF")
        line = data[pos:eol]
        check(b"\n" not in line and b"\r" not in line, "bare CR or LF in a header line")
        check(len(line) <= 998, "header line longer than 998 octets")
        pos = eol + 2
        if not line:
            check(bool(fields) or allow_empty, "empty header section")
            return fields, pos
        if line[:1] in (b" ", b"\t"):
            check(bool(fields), "continuation line before any field")
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.decode("ascii").strip())
            continue
        m = re.fullmatch(f"({FIELD_NAME})[ \\t]*:(.*)", line.decode("utf-8"))
        check(m is not None, f"not a header field: {line[:60]!r}")
        assert m is not None
        fields.append((m.group(1), m.group(2).strip()))


def content_type(value: str) -> tuple[str, dict[str, str]]:
    """RFC 2045 §5.1: type "/" subtype *(";" parameter), parameter = attribute "=" value."""
    m = re.match(f"\\s*({TOKEN})/({TOKEN})\\s*", value)
    check(m is not None, f"bad Content-Type {value!r}")
    assert m is not None
    params: dict[str, str] = {}
    rest = value[m.end():]
    while rest.strip():
        p = re.match(f"\\s*;\\s*({TOKEN})\\s*=\\s*({TOKEN}|{QUOTED_STRING})\\s*", rest)
        check(p is not None, f"bad Content-Type parameter in {value!r}")
        assert p is not None
        v = p.group(2)
        params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", v[1:-1]) if v.startswith('"') else v
        rest = rest[p.end():]
    return f"{m.group(1)}/{m.group(2)}".lower(), params


def parse_entity(data: bytes) -> Entity:
    fields, start = header_section(data)
    return Entity(fields, data[start:])


def multipart(body: bytes, boundary: str) -> list[bytes]:
    """RFC 2046 §5.1.1: preamble, CRLF "--" boundary CRLF part ..., CRLF "--" boundary "--"."""
    check(0 < len(boundary) <= 70 and re.fullmatch(r"[0-9A-Za-z'()+_,./:=? -]*[0-9A-Za-z'()+_,./:=?-]", boundary)
          is not None, f"bad boundary {boundary!r}")  # fmt: skip
    delim = b"\r\n--" + boundary.encode()
    text = b"\r\n" + body
    first = text.find(delim + b"\r\n")
    check(first >= 0, "no first delimiter")
    pieces = text[first + len(delim):].split(delim)
    check(pieces[-1].startswith(b"--") and pieces[-1][2:].strip(b"\r\n \t") == b"", "bad close delimiter")
    parts = []
    for piece in pieces[:-1]:
        check(piece.startswith(b"\r\n"), "delimiter line not ended by CRLF")
        parts.append(piece[2:])
    return parts


@dataclass
class Report:
    top: Entity
    human: Entity
    machine: Entity
    original: Entity | None
    blocks: list[dict[str, str]] = field(default_factory=list)


def parse_report(data: bytes, report_type: str) -> Report:
    """RFC 6522: multipart/report; report-type=...; 2 or 3 parts, the second one machine-readable."""
    check(b"\n" not in data.replace(b"\r\n", b""), "bare LF in the message")
    check(b"\r" not in data.replace(b"\r\n", b""), "bare CR in the message")
    top = parse_entity(data)
    for required in ("From", "Date", "Message-ID"):
        check(top.get(required) is not None, f"{required} missing")
    check(re.fullmatch(DATE_TIME, top.get("Date") or "") is not None, "Date is not an RFC 5322 date-time")
    check(re.fullmatch(MSG_ID, top.get("Message-ID") or "") is not None, "Message-ID is not a msg-id")
    check(top.get("MIME-Version") == "1.0", "MIME-Version")
    mtype, params = content_type(top.get("Content-Type") or "")
    check(mtype == "multipart/report", f"top type {mtype}")
    check(params.get("report-type") == report_type, f"report-type {params.get('report-type')}")
    parts = [parse_entity(p) for p in multipart(top.body, params.get("boundary", ""))]
    check(len(parts) in (2, 3), f"{len(parts)} parts")
    human_type, _ = content_type(parts[0].get("Content-Type") or "text/plain")
    check(human_type.startswith("text/"), "first part is not human-readable text")
    machine_type, _ = content_type(parts[1].get("Content-Type") or "")
    check(machine_type == f"message/{report_type}", f"second part is {machine_type}")
    check(parts[1].get("Content-Transfer-Encoding") in (None, "7bit", "8bit"), "machine part encoded")
    original = parts[2] if len(parts) == 3 else None
    if original is not None:
        ot, _ = content_type(original.get("Content-Type") or "")
        check(ot in ("text/rfc822-headers", "message/rfc822"), f"third part is {ot}")
    return Report(top, parts[0], parts[1], original)


def field_blocks(body: bytes) -> list[list[tuple[str, str]]]:
    """Groups of fields separated by one empty line; every field line ends with CRLF."""
    check(body.endswith(b"\r\n"), "last field line does not end with CRLF")
    blocks: list[list[tuple[str, str]]] = []
    pos = 0
    while pos < len(body):
        fields, used = header_section(body[pos:] + (b"" if body[pos:].endswith(b"\r\n\r\n") else b"\r\n"))
        blocks.append(fields)
        pos += used
        if pos >= len(body):
            break
    return blocks


def one_each(fields: list[tuple[str, str]], *, required: set[str], optional: set[str],
             repeatable: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:  # fmt: skip
    """Known fields at most once (unless repeatable), required ones present, others extension-field."""
    seen: dict[str, str] = {}
    known = required | optional | repeatable
    for name, value in fields:
        low = name.lower()
        if low in known:
            check(low not in seen or low in repeatable, f"{name} appears twice")
            seen[low] = value
        else:
            check(re.fullmatch(FIELD_NAME, name) is not None, f"bad extension field name {name}")
            check(re.fullmatch(f"(?:{TEXT})*", value) is not None, f"bad extension field value in {name}")
            seen.setdefault(low, value)
    for r in required:
        check(r in seen, f"required field {r} missing")
    return seen


# --- RFC 8098 §3.1: message/disposition-notification ------------------------------------------------

DISPOSITION = (r"(?:manual-action|automatic-action)\s*/\s*(?:MDN-sent-manually|MDN-sent-automatically)\s*;\s*"
               rf"(?:displayed|deleted|dispatched|processed)(?:\s*/\s*{TOKEN}(?:\s*,\s*{TOKEN})*)?")  # fmt: skip
ADDRESS_FIELD = f"({ATOM})\\s*;\\s*((?:{TEXT})*)"


def parse_mdn(data: bytes) -> tuple[Report, dict[str, str]]:
    report = parse_report(data, "disposition-notification")
    blocks = field_blocks(report.machine.body)
    check(len(blocks) == 1, "disposition-notification-content is one block of fields")
    f = one_each(blocks[0], required={"final-recipient", "disposition"},
                 optional={"reporting-ua", "mdn-gateway", "original-recipient", "original-message-id"},
                 repeatable={"error"})  # fmt: skip
    if "reporting-ua" in f:
        check(re.fullmatch(r"[^;\r\n]*(?:;(?:" + TEXT + ")*)?", f["reporting-ua"]) is not None, "Reporting-UA")
    for name in ("original-recipient", "final-recipient"):
        if name in f:
            m = re.fullmatch(ADDRESS_FIELD, f[name])
            check(m is not None, f"{name} is not address-type ; generic-address")
            assert m is not None
            if m.group(1).lower() == "rfc822":
                check(re.fullmatch(ADDR_SPEC, m.group(2).strip()) is not None, f"{name} address")
    if "original-message-id" in f:
        check(re.fullmatch(MSG_ID, f["original-message-id"]) is not None, "Original-Message-ID is not a msg-id")
    check(re.fullmatch(DISPOSITION, f["disposition"]) is not None, f"Disposition {f['disposition']!r}")
    return report, f


# --- RFC 3464 §2: message/delivery-status -----------------------------------------------------------

STATUS = r"[245]\.\d{1,3}\.\d{1,3}"
ACTIONS = {"failed", "delayed", "delivered", "relayed", "expanded"}


def parse_dsn(data: bytes) -> tuple[Report, dict[str, str], list[dict[str, str]]]:
    report = parse_report(data, "delivery-status")
    blocks = field_blocks(report.machine.body)
    check(len(blocks) >= 2, "per-message fields and at least one per-recipient block")
    per_message = one_each(blocks[0], required={"reporting-mta"},
                           optional={"original-envelope-id", "dsn-gateway", "received-from-mta", "arrival-date"})
    check(re.fullmatch(r"[A-Za-z0-9-]+\s*;\s*\S.*", per_message["reporting-mta"]) is not None, "Reporting-MTA")
    if "arrival-date" in per_message:
        check(re.fullmatch(DATE_TIME, per_message["arrival-date"]) is not None, "Arrival-Date")
    recipients = []
    for block in blocks[1:]:
        r = one_each(block, required={"final-recipient", "action", "status"},
                     optional={"original-recipient", "remote-mta", "diagnostic-code", "last-attempt-date",
                               "final-log-id", "will-retry-until"})  # fmt: skip
        m = re.fullmatch(ADDRESS_FIELD, r["final-recipient"])
        check(m is not None and re.fullmatch(ADDR_SPEC, m.group(2).strip()) is not None, "Final-Recipient")
        check(r["action"].lower() in ACTIONS, f"Action {r['action']}")
        check(re.fullmatch(STATUS, r["status"]) is not None, f"Status {r['status']}")
        if "diagnostic-code" in r:
            check(re.fullmatch(f"({ATOM})\\s*;(?:{TEXT})*", r["diagnostic-code"]) is not None, "Diagnostic-Code")
        for date in ("last-attempt-date", "will-retry-until"):
            if date in r:
                check(re.fullmatch(DATE_TIME, r[date]) is not None, date)
        recipients.append(r)
    return report, per_message, recipients


# --- the receipts --------------------------------------------------------------------------------

ORIGINAL = (
    b"From: Dr Martin <dr.martin@a.test>\r\nTo: ph@b.test\r\nSubject: Ordonnance DUPONT\r\n"
    b"Message-ID: <rx1@a.test>\r\nDisposition-Notification-To: dr.martin@a.test\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nSECRET BODY amoxicilline\r\n"
)
NOW = dt.datetime(2026, 11, 3, 10, 0, tzinfo=dt.UTC)


def mdn(**kw: object) -> bytes:
    args: dict[str, object] = {"reporting_ua": "mx.b.test", "from_addr": "<postmaster@b.test>",
                               "to": "dr.martin@a.test", "final_recipient": "ph@b.test", "original": ORIGINAL,
                               "now": NOW}  # fmt: skip
    args.update(kw)
    return build_mdn(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("disposition", ["processed", "dispatched", "displayed", "deleted"])
def test_mdn_dispositions_parse_strictly(disposition: str) -> None:
    report, f = parse_mdn(mdn(disposition=disposition))
    assert f["disposition"].endswith(f"; {disposition}")
    assert f["final-recipient"] == "rfc822; ph@b.test"
    assert f["original-message-id"] == "<rx1@a.test>"
    assert report.top.get("To") == "<dr.martin@a.test>"


def test_mdn_for_a_refused_message_is_processed_with_the_error_modifier() -> None:
    _report, f = parse_mdn(mdn(disposition="failed", error="security verification failed: from-mismatch"))
    assert f["disposition"] == "automatic-action/MDN-sent-automatically; processed/error"
    assert f["error"] == "security verification failed: from-mismatch"


def test_direct_failed_form_only_when_asked_and_the_strict_parser_refuses_it() -> None:
    data = mdn(disposition="failed", error="security verification failed", failed_form=MDN_FORM_DIRECT)
    with pytest.raises(GrammarError, match="Disposition"):
        parse_mdn(data)
    assert b"; failed\r\n" in data


def test_mdn_original_recipient_only_when_the_original_had_one() -> None:
    _r, f = parse_mdn(mdn())
    assert "original-recipient" not in f
    with_orcpt = ORIGINAL.replace(b"MIME-Version", b"Original-Recipient: rfc822;secretariat@b.test\r\nMIME-Version")
    _r, f = parse_mdn(mdn(original=with_orcpt))
    assert f["original-recipient"] == "rfc822; secretariat@b.test"


def test_mdn_leaves_out_a_message_id_that_is_no_msg_id() -> None:
    odd = ORIGINAL.replace(b"Message-ID: <rx1@a.test>", b"Message-ID: not an id")
    report, f = parse_mdn(mdn(original=odd))
    assert "original-message-id" not in f and report.top.get("In-Reply-To") is None


def test_dsn_parses_strictly_and_invents_nothing() -> None:
    data = build_dsn(
        reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="dr.martin@a.test",
        recipients=[DsnRecipient("ph@b.test", "failed", "5.1.1", "550 5.1.1 unknown mailbox", remote_mta="mx.b.test"),
                    DsnRecipient("x@b.test", "failed", "5.7.1", "no certificate for x@b.test"),
                    DsnRecipient("y@b.test", "delayed", "4.4.1", "451 4.4.1 no answer", remote_mta="mx.b.test",
                                 will_retry_until=NOW + dt.timedelta(days=5))],
        original=ORIGINAL, arrival=NOW, queue_id="q1", now=NOW,
    )  # fmt: skip
    report, per_message, (replied, ours, delayed) = parse_dsn(data)
    assert "original-envelope-id" not in per_message  # no ENVID was given
    assert per_message["reporting-mta"] == "dns; mx.a.test" and per_message["x-mssgw-queue-id"] == "q1"
    assert replied["diagnostic-code"] == "smtp; 550 5.1.1 unknown mailbox"
    assert replied["remote-mta"] == "dns; mx.b.test"
    assert "diagnostic-code" not in ours and "remote-mta" not in ours  # no server replied
    assert b"no certificate for x@b.test" in report.human.body  # our reason, for people
    assert delayed["action"] == "delayed" and delayed["status"] == "4.4.1" and "will-retry-until" in delayed
    assert report.original is not None and b"SECRET BODY" not in data


def test_dsn_original_envelope_id_when_envid_was_given() -> None:
    data = build_dsn(reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="s@a.test",
                     recipients=[DsnRecipient("ph@b.test", "failed", "5.0.0", "")], original=ORIGINAL,
                     arrival=NOW, envelope_id="ENV-42", now=NOW)  # fmt: skip
    _r, per_message, _ = parse_dsn(data)
    assert per_message["original-envelope-id"] == "ENV-42"


def test_the_strict_parser_refuses_what_the_grammar_does_not_produce() -> None:
    """The parser is a judge only if it can say no: each defect once, on a good report."""
    good = mdn()
    parse_mdn(good)
    m = re.search(rb"Disposition: [^\r]*\r\n", good)
    assert m is not None
    at, end = m.start(), m.end()
    defects = {
        "field line without CRLF": re.sub(rb"(Disposition: [^\r]*)\r\n(\r\n--)", rb"\1\2", good),
        "bare LF": good.replace(b"Final-Recipient: rfc822; ph@b.test\r\n", b"Final-Recipient: rfc822; ph@b.test\n"),
        "unknown disposition": good[:at] + b"Disposition: automatic-action/MDN-sent-automatically; failed\r\n"
        + good[end:],
        "field twice": good[:at] + good[at:end] * 2 + good[end:],
        "no Final-Recipient": good.replace(b"Final-Recipient: rfc822; ph@b.test\r\n", b""),
        "bad address": good.replace(b"Final-Recipient: rfc822; ph@b.test", b"Final-Recipient: rfc822; ph b"),
        "wrong report type": re.sub(rb'report-type="?disposition-notification"?', b"report-type=delivery-status", good),
    }
    for name, data in defects.items():
        assert data != good, name
        with pytest.raises(GrammarError):
            parse_mdn(data)
    dsn = build_dsn(reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="s@a.test",
                    recipients=[DsnRecipient("ph@b.test", "failed", "5.0.0", "")], original=ORIGINAL,
                    arrival=NOW, now=NOW)  # fmt: skip
    parse_dsn(dsn)
    for bad in (dsn.replace(b"Status: 5.0.0", b"Status: 6.0.0"), dsn.replace(b"Action: failed", b"Action: bounced"),
                dsn.replace(b"Reporting-MTA: dns; mx.a.test\r\n", b"")):
        with pytest.raises(GrammarError):
            parse_dsn(bad)


def test_the_from_of_a_receipt_names_the_address_that_signs_it() -> None:
    """RFC 8098 profile: From our postmaster; Direct profile: From the final recipient."""
    for profile, expected in ((MDN_FORM_RFC8098, "postmaster@b.test"), (MDN_FORM_DIRECT, "ph@b.test")):
        from_addr = mdn_from(profile, postmaster="postmaster@b.test", final_recipient="ph@b.test")
        data = mdn(from_addr=from_addr, disposition="processed")
        report, _f = parse_mdn(data)
        assert report.top.get("From") == f"<{expected}>"
        assert receipt_author(data) == expected
    dsn = build_dsn(reporting_mta="mx.a.test", postmaster="postmaster@a.test", to="s@a.test",
                    recipients=[DsnRecipient("ph@b.test", "failed", "5.0.0", "")], original=ORIGINAL,
                    arrival=NOW, now=NOW)  # fmt: skip
    assert receipt_author(dsn) == "postmaster@a.test"


def test_mdn_profile_setting_is_checked(tmp_path: Path) -> None:
    from gateway.config import ConfigError, validate

    assert validate({"receipts": {"mdn_profile": "direct"}}, tmp_path, environ={}).receipts.mdn_profile == "direct"
    with pytest.raises(ConfigError, match=r"receipts\.mdn_profile: must be rfc8098 or direct"):
        validate({"receipts": {"mdn_profile": "rfc3798"}}, tmp_path, environ={})
