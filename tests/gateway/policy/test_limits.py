"""The bounds of ``gateway.policy.limits``: what passes DATA must never fail later for its shape.

The edge (``gateway.policy.content``) and the workers' MIME helpers (``gateway.crypto._mime``)
share the constants; these tests take a message at the edge's limit, add what the edge adds
itself (trace and default header fields, within the reserve), and check that the workers'
parsers still take it, and that one step past the workers' own limit is refused by them.
"""

from __future__ import annotations

import pytest

from gateway.crypto._mime import MimeError, parse_headers, split_entity, split_multipart
from gateway.policy import limits as L
from gateway.policy.content import decide_content, inspect_content

HEAD = b"From: dr.martin@a.mssante.test\r\nTo: ph@b.mssante.test\r\nSubject: s\r\n"
#: What the edge prepends (Received, Message-ID, Date): well inside the reserve.
ADDED = (b"Received: from client.a.mssante.test ([127.0.0.1]) by mx.a.mssante.test with ESMTPS id 0123456789abcdef;"
         b"\r\n\tMon, 30 Nov 2026 00:00:00 +0000\r\nMessage-ID: <0123456789abcdef@a.mssante.test>\r\n"
         b"Date: Mon, 30 Nov 2026 00:00:00 +0000\r\n")  # fmt: skip


def test_the_edge_keeps_a_margin_below_the_workers() -> None:
    assert L.EDGE_MAX_HEADER_BYTES + L.EDGE_HEADER_RESERVE_BYTES == L.MAX_HEADER_BYTES
    assert L.EDGE_MAX_HEADER_FIELDS + L.EDGE_HEADER_RESERVE_FIELDS == L.MAX_HEADER_FIELDS
    assert L.EDGE_MAX_MESSAGE_BYTES < L.MAX_MESSAGE_BYTES
    assert len(ADDED) < L.EDGE_HEADER_RESERVE_BYTES and ADDED.count(b"\r\n") - 1 < L.EDGE_HEADER_RESERVE_FIELDS
    # RFC 5321 4.5.3.1.4: a command line is at least 512 octets; AUTH carries 3 x 255 octets of base64.
    assert L.COMMAND_LINE_BYTES >= 512 and 4 * (3 * 255 + 2) // 3 + len("AUTH PLAIN \r\n") <= L.AUTH_LINE_BYTES


def _with_fields(n: int) -> bytes:
    return HEAD + b"X-N: 1\r\n" * (n - HEAD.count(b"\r\n")) + b"\r\nbody\r\n"


def test_most_header_fields_the_edge_accepts_still_parse_after_the_trace() -> None:
    data = _with_fields(L.EDGE_MAX_HEADER_FIELDS)
    assert decide_content(inspect_content(data)).accepted
    header, body = split_entity(ADDED + data)
    assert len(parse_headers(header)) == L.EDGE_MAX_HEADER_FIELDS + 3 and body == b"body\r\n"
    refused = _with_fields(L.EDGE_MAX_HEADER_FIELDS + 1)
    assert decide_content(inspect_content(refused)).rule == "too-many-header-fields"
    with pytest.raises(MimeError, match="too many header fields"):
        parse_headers(split_entity(_with_fields(L.MAX_HEADER_FIELDS + 2))[0])


def _with_header_bytes(size: int) -> bytes:
    line = b"X-Filler: " + b"y" * 900 + b"\r\n"
    block = HEAD + line * ((size - len(HEAD)) // len(line))
    block += b"X-Pad: " + b"z" * (size - len(block) - len(b"X-Pad: \r\n")) + b"\r\n"
    assert len(block) == size
    return block + b"\r\nbody\r\n"


def test_largest_header_block_the_edge_accepts_still_parses_after_the_trace() -> None:
    data = _with_header_bytes(L.EDGE_MAX_HEADER_BYTES)
    facts = inspect_content(data)
    assert facts.header_bytes == L.EDGE_MAX_HEADER_BYTES and decide_content(facts).accepted
    header, body = split_entity(ADDED + data)
    assert body == b"body\r\n" and len(header) == len(ADDED) + L.EDGE_MAX_HEADER_BYTES - 2
    refused = inspect_content(_with_header_bytes(L.EDGE_MAX_HEADER_BYTES + 1))
    assert decide_content(refused).reply.short == "552 5.3.4"
    with pytest.raises(MimeError, match="header block too large"):
        split_entity(b"X-Filler: " + b"y" * L.MAX_HEADER_BYTES + b"\r\nno blank line")


def test_most_parts_the_edge_accepts_are_split_by_the_workers() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\n%d\r\n" % i for i in range(L.MAX_PARTS))
    data = HEAD + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    assert decide_content(inspect_content(data)).accepted
    assert len(split_multipart(split_entity(data)[1], "b")) == L.MAX_PARTS
    more = parts + b"--b\r\n\r\nextra\r\n--b--\r\n"
    with pytest.raises(MimeError, match="too many body parts"):
        split_multipart(more, "b")
