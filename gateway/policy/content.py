"""Is this message's content acceptable? The DATA rules, as a readable table over facts.

``inspect_content`` reads the bytes received once (no re-serialisation: crypto later
works on the same bytes) and gathers facts; ``decide_content`` runs the rules over
them. Standards: RFC 5321 2.3.8 (CRLF only: a bare CR or LF is refused, which also
closes SMTP smuggling tricks downstream), RFC 5322 2.1.1 (lines of at most 998
octets), 2.2 (header field syntax), 3.6 (one From, at most one of Date, Subject,
Message-ID...), RFC 2046 5.1 (multipart boundaries). Refusals are 550 5.6.0 with a
reason naming the rule, never quoting the content.

The shape limits of the workers (``gateway.policy.limits``: header block size and field
count, multipart parts, MIME nesting) are checked here first, by linear scans, so that
what passes DATA never fails later for its shape and no oversized structure reaches a
parser: a header block over ``EDGE_MAX_HEADER_BYTES`` is 552 5.3.4, the rest 550 5.6.0.

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

from gateway.core import replies as R
from gateway.policy.chain import Rule, evaluate
from gateway.policy.decision import Decision
from gateway.policy.limits import EDGE_MAX_HEADER_BYTES, EDGE_MAX_HEADER_FIELDS, MAX_MIME_DEPTH, MAX_PARTS

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
    header_bytes: int = 0  # the header block's size, blank line excluded
    header_fields: int = 0
    mime_depth: int = 0  # nesting of multipart and message/* entities (0: not a container)
    mime_parts: int = 0  # the most body parts of one multipart
    #: Other author and sender fields (RFC 5322 3.6.2, 3.6.6) as (field name, address), lower case.
    other_senders: tuple[tuple[str, str], ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


def _split_headers(data: bytes) -> tuple[bytes, int]:
    if data.startswith(b"\r\n"):
        return b"", 2
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, len(data)
    return data[: end + 2], end + 4


def _unfold(header_block: bytes) -> tuple[list[tuple[str, bytes]], str | None]:
    """Fields as (lower-case name, raw value), or the first syntax problem (linear: no repeated concatenation)."""
    fields: list[tuple[str, list[bytes]]] = []
    for number, line in enumerate(header_block.split(b"\r\n")[:-1], start=1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return [], "the first header line is a continuation line"
            fields[-1][1].append(line.strip())
            continue
        match = _HEADER_LINE.match(line)
        if match is None:
            return [(n, b" ".join(v)) for n, v in fields], f"header line {number} is not 'Name: value' (RFC 5322 2.2)"
        name = match.group(0)[:-1].strip().decode("ascii").lower()
        fields.append((name, [line[match.end():].strip()]))
    return [(n, b" ".join(v)) for n, v in fields], None


def count_fields(header_block: bytes) -> int:
    """Header fields in a block (lines that are not continuations), by counting in C."""
    lines = header_block.count(b"\r\n")
    return lines - header_block.count(b"\r\n ") - header_block.count(b"\r\n\t") - (
        1 if header_block[:1] in (b" ", b"\t") else 0)


#: A Content-Type of a container (multipart/*, message/*) with its folded continuation, or a
#: line that may be a multipart delimiter (RFC 2046 5.1.1).
_MIME_EVENT = re.compile(
    rb"^(?:content-type[ \t]*:[ \t]*(?:\r\n[ \t]+)*(?P<kind>multipart|message)/(?P<rest>[^\r\n]*(?:\r\n[ \t][^\r\n]*)*)"
    rb"|--(?P<delim>[^\r\n]{1,70}?)(?P<close>--)?[ \t]*\r?$)",
    re.I | re.M,
)
_BOUNDARY = re.compile(rb"""boundary[ \t]*=[ \t]*(?:"([^"\r\n]{1,70})"|([^\s;"]{1,70}))""", re.I)


def mime_shape(data: bytes) -> tuple[int, int]:
    """(nesting depth, most parts in one multipart) by one linear scan, without parsing.

    Every Content-Type of a multipart or message/* entity opens a level (a line in a text body
    that looks like one counts too: the answer is an upper bound); a delimiter line closes the
    levels opened inside its multipart, a close delimiter that multipart too. The scan stops
    once a limit is passed, so the work is linear in the bytes.
    """
    stack: list[bytes | None] = []  # boundaries of the open containers (None: message/*)
    parts: dict[bytes, int] = {}
    depth = most = 0
    for event in _MIME_EVENT.finditer(data):
        if event.group("kind") is not None:
            boundary = None
            if event.group("kind").lower() == b"multipart":
                found = _BOUNDARY.search(event.group("rest"))
                boundary = (found.group(1) or found.group(2)) if found else None
            stack.append(boundary)
            depth = max(depth, len(stack))
            if depth > MAX_MIME_DEPTH:  # refused anyway: the stack (and each lookup in it) stays small
                break
            continue
        delim = event.group("delim")
        if delim not in stack:
            continue
        at = len(stack) - 1 - stack[::-1].index(delim)
        del stack[at + (0 if event.group("close") else 1):]
        if not event.group("close"):
            parts[delim] = parts.get(delim, 0) + 1
            most = max(most, parts[delim])
            if most > MAX_PARTS:
                break
    return depth, most


def _mime_problem(data: bytes) -> str | None:
    message = BytesParser(policy=compat32).parsebytes(data)
    for part in message.walk():
        for defect in part.defects:
            if isinstance(defect, _BAD_MIME):
                return f"malformed MIME structure ({type(defect).__name__.removesuffix('Defect')})"
    return None


#: Fields that name who sent or resent a message besides From: (RFC 5322 3.6.2, 3.6.6); a
#: submitting identity may name only itself or a mailbox delegated to it there.
OTHER_SENDER_FIELDS = ("sender", "resent-from", "resent-sender")

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


#: ... and its header block has at most this many lines (unfolding is a Python loop per line).
INLINE_HEADER_LINES = 1000


def cheap_to_inspect(data: bytes, *, opaque_crypto: bool = False) -> bool:
    """``inspect_content`` will not walk a MIME tree, the message is small (see ``INLINE_SIZE``), its header short."""
    if len(data) > INLINE_SIZE or _split_headers(data)[0].count(b"\r\n") > INLINE_HEADER_LINES:
        return False
    content_type = _top_content_type(data)
    return not content_type.startswith(b"multipart/") or (opaque_crypto and content_type.startswith(OPAQUE_TYPES))


def inspect_content(data: bytes, *, max_line_length: int = 998, opaque_crypto: bool = False) -> ContentFacts:
    """Facts about ``data``; with ``opaque_crypto`` (inbound) an encrypted body's MIME tree is not walked.

    The header block's size and field count are measured first: past the limits nothing else
    is read (the refusal needs no more facts).
    """
    crlf = data.count(b"\r\n")
    bare = data.count(b"\n") != crlf or data.count(b"\r") != crlf
    longest = max(map(len, data.split(b"\r\n"))) if data else 0
    block, body_at = _split_headers(data)
    header_bytes, header_fields = len(block), count_fields(block)
    if header_bytes > EDGE_MAX_HEADER_BYTES or header_fields > EDGE_MAX_HEADER_FIELDS:
        return ContentFacts(size=len(data), has_nul=b"\x00" in data, bare_newline=bare, longest_line=longest,
                            max_line_length=max_line_length, headers_end=body_at, header_bytes=header_bytes,
                            header_fields=header_fields)  # fmt: skip
    fields, header_error = _unfold(block)
    counts: dict[str, int] = {}
    for name, _ in fields:
        counts[name] = counts.get(name, 0) + 1
    values = dict(fields)
    from_raw = b" ".join(v for n, v in fields if n == "from").decode("utf-8", "replace")
    addresses = tuple(a.lower() for _, a in getaddresses([from_raw]) if a) if from_raw else ()
    others = tuple(
        (name, address.lower())
        for name, value in fields if name in OTHER_SENDER_FIELDS
        for _, address in getaddresses([value.decode("utf-8", "replace")]) if address
    )  # fmt: skip
    mime_error = None
    content_type = values.get("content-type", b"").lower()
    opaque = opaque_crypto and content_type.startswith(OPAQUE_TYPES)
    depth = parts = 0
    if content_type.startswith((b"multipart/", b"message/")):
        depth, parts = mime_shape(data)
    if header_error is None and content_type.startswith(b"multipart/") and not opaque and depth <= MAX_MIME_DEPTH \
            and parts <= MAX_PARTS:
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
        header_bytes=header_bytes,
        header_fields=header_fields,
        mime_depth=depth,
        mime_parts=parts,
        other_senders=others,
    )


def _refuse(rule: str, reason: str) -> Decision:
    return Decision.refuse(R.S550_5_6_0_BAD_CONTENT, rule, reason)


def _header_size(f: ContentFacts) -> Decision | None:
    if f.header_bytes <= EDGE_MAX_HEADER_BYTES:
        return None
    return Decision.refuse(R.S552_5_3_4_TOO_BIG, "header-too-large",
                           f"header block of {f.header_bytes} octets; at most {EDGE_MAX_HEADER_BYTES} are accepted")


def _header_count(f: ContentFacts) -> Decision | None:
    if f.header_fields <= EDGE_MAX_HEADER_FIELDS:
        return None
    return _refuse("too-many-header-fields",
                   f"{f.header_fields} header fields; at most {EDGE_MAX_HEADER_FIELDS} are accepted")


def _mime_limits(f: ContentFacts) -> Decision | None:
    if f.mime_depth > MAX_MIME_DEPTH:
        return _refuse("mime-too-deep", f"MIME entities nested more than {MAX_MIME_DEPTH} levels deep")
    if f.mime_parts > MAX_PARTS:
        return _refuse("mime-too-many-parts", f"a multipart with {f.mime_parts} parts; at most {MAX_PARTS}")
    return None


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
    Rule("header-too-large", "a header block the workers can read", _header_size),
    Rule("too-many-header-fields", "a header field count the workers can read", _header_count),
    Rule("nul-byte", "no NUL bytes", _nul),
    Rule("bare-newline", "CRLF line endings only (no smuggling)", _bare),
    Rule("line-too-long", "lines of at most 998 octets", _long),
    Rule("header-syntax", "every header line is 'Name: value' or a continuation", _headers),
    Rule("duplicate-header", "singleton header fields appear once", _duplicates),
    Rule("from-header", "exactly one From: address", _from),
    Rule("mime-limits", "MIME nesting and part counts the parsers can take", _mime_limits),
    Rule("mime-structure", "multipart boundaries present and closed", _mime),
)


def decide_content(facts: ContentFacts) -> Decision:
    return evaluate(CONTENT_CHAIN, facts, _accept)
