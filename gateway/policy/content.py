"""Is this message's content acceptable? The DATA rules, as a readable table over facts.

``inspect_content`` reads the bytes received once (no re-serialisation: crypto later
works on the same bytes) and gathers facts; ``decide_content`` runs the rules over
them. Standards: RFC 5321 2.3.8 (CRLF only: a bare CR or LF is refused, which also
closes SMTP smuggling tricks downstream), RFC 5322 2.1.1 (lines of at most 998
octets), 2.2 (header field syntax), 3.6 (one From, at most one of Date, Subject,
Message-ID...), RFC 2046 5.1 (multipart boundaries). Refusals are 550 5.6.0 with a
reason naming the rule, never quoting the content.

Parsing a large multipart body is CPU work: callers run ``inspect_content`` off the
event loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email import errors as email_errors
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses

from gateway.policy.chain import Rule, evaluate
from gateway.policy.decision import Decision
from gateway.smtp import replies as R

_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
#: RFC 5322 3.6: fields that may appear at most once.
SINGLETONS = ("from", "sender", "reply-to", "to", "cc", "bcc", "date", "subject", "message-id",
              "in-reply-to", "references")  # fmt: skip
_BAD_MIME = (
    email_errors.NoBoundaryInMultipartDefect,
    email_errors.StartBoundaryNotFoundDefect,
    email_errors.CloseBoundaryNotFoundDefect,
    email_errors.MultipartInvariantViolationDefect,
    email_errors.InvalidMultipartContentTransferEncodingDefect,
)


@dataclass(frozen=True)
class ContentFacts:
    size: int
    has_nul: bool = False
    bare_newline: bool = False
    longest_line: int = 0
    max_line_length: int = 998
    header_error: str | None = None  # the first malformed header line, described (no content)
    duplicates: tuple[str, ...] = ()
    from_addresses: tuple[str, ...] = ()
    mime_error: str | None = None
    message_id: str | None = None
    has_date: bool = False
    headers_end: int = 0  # offset of the body (after the blank line), or len(data)
    extra: dict[str, str] = field(default_factory=dict)


def _split_headers(data: bytes) -> tuple[bytes, int]:
    if data.startswith(b"\r\n"):
        return b"", 2
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, len(data)
    return data[: end + 2], end + 4


def _unfold(header_block: bytes) -> tuple[list[tuple[str, bytes]], str | None]:
    """Fields as (lower-case name, raw value), or the first syntax problem."""
    fields: list[tuple[str, bytes]] = []
    for number, line in enumerate(header_block.split(b"\r\n")[:-1], start=1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return fields, "the first header line is a continuation line"
            name, value = fields[-1]
            fields[-1] = (name, value + b" " + line.strip())
            continue
        match = _HEADER_LINE.match(line)
        if match is None:
            return fields, f"header line {number} is not 'Name: value' (RFC 5322 2.2)"
        name = match.group(0)[:-1].strip().decode("ascii").lower()
        fields.append((name, line[match.end():].strip()))
    return fields, None


def _mime_problem(data: bytes) -> str | None:
    message = BytesParser(policy=compat32).parsebytes(data)
    for part in message.walk():
        for defect in part.defects:
            if isinstance(defect, _BAD_MIME):
                return f"malformed MIME structure ({type(defect).__name__.removesuffix('Defect')})"
    return None


#: Top-level types whose body is an opaque crypto blob (S/MIME RFC 8551, PGP/MIME RFC 3156):
#: for a message between operators only their top-level header fields are checked.
OPAQUE_TYPES = (b"application/pkcs7-mime", b"application/x-pkcs7-mime", b"multipart/encrypted")

#: Messages up to this size whose MIME tree needs no walk are cheap to inspect (a few
#: hundred microseconds): callers may do it on the event loop instead of in a thread.
INLINE_SIZE = 256 * 1024


def _top_content_type(data: bytes) -> bytes:
    """The top-level Content-Type value (lower case, unfolded), b"" when absent; headers only."""
    block, _ = _split_headers(data)
    at = block.lower().find(b"content-type")
    if at < 0:
        return b""
    fields, _ = _unfold(block)
    return dict(fields).get("content-type", b"").lower()


def cheap_to_inspect(data: bytes, *, opaque_crypto: bool = False) -> bool:
    """``inspect_content`` will not walk a MIME tree and the message is small (see ``INLINE_SIZE``)."""
    if len(data) > INLINE_SIZE:
        return False
    content_type = _top_content_type(data)
    return not content_type.startswith(b"multipart/") or (opaque_crypto and content_type.startswith(OPAQUE_TYPES))


def inspect_content(data: bytes, *, max_line_length: int = 998, opaque_crypto: bool = False) -> ContentFacts:
    """Facts about ``data``; with ``opaque_crypto`` (inbound) an encrypted body's MIME tree is not walked."""
    crlf = data.count(b"\r\n")
    bare = data.count(b"\n") != crlf or data.count(b"\r") != crlf
    longest = max(map(len, data.split(b"\r\n"))) if data else 0
    block, body_at = _split_headers(data)
    fields, header_error = _unfold(block)
    counts: dict[str, int] = {}
    for name, _ in fields:
        counts[name] = counts.get(name, 0) + 1
    values = dict(fields)
    from_raw = b" ".join(v for n, v in fields if n == "from").decode("utf-8", "replace")
    addresses = tuple(a.lower() for _, a in getaddresses([from_raw]) if a) if from_raw else ()
    mime_error = None
    content_type = values.get("content-type", b"").lower()
    opaque = opaque_crypto and content_type.startswith(OPAQUE_TYPES)
    if header_error is None and content_type.startswith(b"multipart/") and not opaque:
        mime_error = _mime_problem(data)
    message_id = values.get("message-id", b"").decode("utf-8", "replace").strip() or None
    return ContentFacts(
        size=len(data),
        has_nul=b"\x00" in data,
        bare_newline=bare,
        longest_line=longest,
        max_line_length=max_line_length,
        header_error=header_error,
        duplicates=tuple(n for n in SINGLETONS if counts.get(n, 0) > 1),
        from_addresses=addresses,
        mime_error=mime_error,
        message_id=message_id[:998] if message_id else None,
        has_date="date" in counts,
        headers_end=body_at,
    )


def _refuse(rule: str, reason: str) -> Decision:
    return Decision.refuse(R.S550_5_6_0_BAD_CONTENT, rule, reason)


def _nul(f: ContentFacts) -> Decision | None:
    return _refuse("nul-byte", "message contains NUL bytes") if f.has_nul else None


def _bare(f: ContentFacts) -> Decision | None:
    if not f.bare_newline:
        return None
    return _refuse("bare-newline", "message contains a bare CR or LF: lines must end with CRLF (RFC 5321 2.3.8)")


def _long(f: ContentFacts) -> Decision | None:
    if f.longest_line <= f.max_line_length:
        return None
    return Decision.refuse(
        R.S550_5_6_0_LINE_TOO_LONG, "line-too-long",
        f"message has a line of {f.longest_line} octets; at most {f.max_line_length} are allowed (RFC 5322 2.1.1)",
    )  # fmt: skip


def _headers(f: ContentFacts) -> Decision | None:
    return _refuse("header-syntax", f.header_error) if f.header_error else None


def _duplicates(f: ContentFacts) -> Decision | None:
    if not f.duplicates:
        return None
    return _refuse("duplicate-header", f"header field(s) {', '.join(f.duplicates)} appear more than once (RFC 5322 3.6)")


def _from(f: ContentFacts) -> Decision | None:
    if len(f.from_addresses) == 1 and "@" in f.from_addresses[0]:
        return None
    return _refuse("from-header", "the From: header must hold exactly one mail address")


def _mime(f: ContentFacts) -> Decision | None:
    return _refuse("mime-structure", f.mime_error) if f.mime_error else None


def _accept(f: ContentFacts) -> Decision:
    return Decision.accept(R.S250_2_6_0_QUEUED, "content-ok", "well-formed message")


CONTENT_CHAIN: tuple[Rule[ContentFacts], ...] = (
    Rule("nul-byte", "no NUL bytes", _nul),
    Rule("bare-newline", "CRLF line endings only (no smuggling)", _bare),
    Rule("line-too-long", "lines of at most 998 octets", _long),
    Rule("header-syntax", "every header line is 'Name: value' or a continuation", _headers),
    Rule("duplicate-header", "singleton header fields appear once", _duplicates),
    Rule("from-header", "exactly one From: address", _from),
    Rule("mime-structure", "multipart boundaries present and closed", _mime),
)


def decide_content(facts: ContentFacts) -> Decision:
    return evaluate(CONTENT_CHAIN, facts, _accept)
