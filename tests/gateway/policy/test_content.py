"""The DATA rules (``gateway.policy.content``): facts read from the bytes received, one named rule per refusal.

Each case is a whole message as a client would send it; the test checks the rule that decides,
the reply (550 5.6.0, or 552 5.3.4 for an oversized header block) and that the reason never
quotes the content. Python's own parser is the oracle for the MIME cases: what we refuse as
malformed, it reports a defect for; what we accept, it reads without one.
"""

from __future__ import annotations

from email import message_from_bytes
from email.policy import compat32

import pytest

from gateway.policy.content import CONTENT_CHAIN, ContentFacts, decide_content, inspect_content, mime_shape
from gateway.policy.limits import EDGE_MAX_HEADER_BYTES, EDGE_MAX_HEADER_FIELDS, MAX_MIME_DEPTH, MAX_PARTS

SECRET = "DUPONT-Jean-1946"  # stands for health content: never in a reason

HEAD = f"From: dr.martin@a.mssante.test\r\nTo: ph@b.mssante.test\r\nSubject: {SECRET}\r\n"


def message(head: str = HEAD, body: str = "Bonjour.\r\n", extra: str = "") -> bytes:
    return (head + extra + "\r\n" + body).encode()


def multipart(parts: int, boundary: str = "b1", close: bool = True) -> bytes:
    body = "".join(f"--{boundary}\r\nContent-Type: text/plain\r\n\r\npart {i} {SECRET}\r\n" for i in range(parts))
    if close:
        body += f"--{boundary}--\r\n"
    return message(extra=f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n', body=body)


def nested(depth: int) -> bytes:
    """``depth`` multipart levels, each with one part holding the next."""
    inner = f"Content-Type: text/plain\r\n\r\n{SECRET}\r\n"
    for level in range(depth, 0, -1):
        b = f"n{level}"
        inner = f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n--{b}\r\n{inner}--{b}--\r\n'
    return (HEAD + "MIME-Version: 1.0\r\n" + inner).encode()


def decide(data: bytes, **kw: object) -> tuple[str, str, str]:
    decision = decide_content(inspect_content(data, **kw))  # type: ignore[arg-type]
    assert SECRET not in decision.reason and SECRET not in str(decision.reply)
    return decision.rule, decision.reply.short, decision.reason


CASES = [
    ("well formed", message(), "content-ok", "250 2.6.0"),
    ("NUL byte", message(body="a\x00b\r\n"), "nul-byte", "550 5.6.0"),
    ("bare LF", message(body="one\ntwo\r\n"), "bare-newline", "550 5.6.0"),
    ("bare CR", message(body="one\rtwo\r\n"), "bare-newline", "550 5.6.0"),
    ("line of 999", message(body="x" * 999 + "\r\n"), "line-too-long", "550 5.6.0"),
    ("header without colon", message(extra="Not a header line\r\n"), "header-syntax", "550 5.6.0"),
    ("two Subjects", message(extra=f"Subject: {SECRET}\r\n"), "duplicate-header", "550 5.6.0"),
    ("two From fields", message(extra="From: other@a.mssante.test\r\n"), "duplicate-header", "550 5.6.0"),
    ("no From", message(head="To: ph@b.mssante.test\r\n"), "from-header", "550 5.6.0"),
    ("two From addresses", message(head="From: a@a.mssante.test, b@a.mssante.test\r\n"), "from-header",
     "550 5.6.0"),
    ("unclosed multipart", multipart(2, close=False), "mime-structure", "550 5.6.0"),
    ("multipart", multipart(3), "content-ok", "250 2.6.0"),
]


@pytest.mark.parametrize("name, data, rule, short", CASES, ids=[c[0] for c in CASES])
def test_content_decisions(name: str, data: bytes, rule: str, short: str) -> None:
    assert decide(data)[:2] == (rule, short)


def test_line_length_limit_is_the_callers() -> None:
    data = message(body="x" * 998 + "\r\n")
    assert decide(data)[0] == "content-ok"
    rule, _, reason = decide(data, max_line_length=500)
    assert rule == "line-too-long" and "998 octets; at most 500" in reason


def test_mime_verdicts_agree_with_pythons_parser() -> None:
    good, broken = multipart(3), multipart(3, close=False)
    assert not message_from_bytes(good, policy=compat32).defects
    assert all(not p.defects for p in message_from_bytes(good, policy=compat32).walk())
    assert any(p.defects for p in message_from_bytes(broken, policy=compat32).walk())
    assert decide(good)[0] == "content-ok" and decide(broken)[0] == "mime-structure"


def test_mime_nesting_and_part_limits() -> None:
    assert mime_shape(nested(MAX_MIME_DEPTH)) == (MAX_MIME_DEPTH, 1)
    assert decide(nested(MAX_MIME_DEPTH))[0] == "content-ok"
    rule, short, reason = decide(nested(MAX_MIME_DEPTH + 1))
    assert (rule, short) == ("mime-too-deep", "550 5.6.0") and f"more than {MAX_MIME_DEPTH} levels" in reason
    assert mime_shape(multipart(MAX_PARTS))[1] == MAX_PARTS
    assert decide(multipart(MAX_PARTS))[0] == "content-ok"
    rule, _, reason = decide(multipart(MAX_PARTS + 1))
    assert rule == "mime-too-many-parts" and f"{MAX_PARTS + 1} parts" in reason


def test_a_thousand_levels_are_refused_without_recursion() -> None:
    """Python's parser recurses per level; the linear scan stops at the limit and the parser never runs."""
    facts = inspect_content(nested(1000))
    assert facts.mime_depth == MAX_MIME_DEPTH + 1 and facts.mime_error is None
    assert decide_content(facts).rule == "mime-too-deep"


def test_header_block_limits() -> None:
    filler = "X-Filler: " + "y" * 900 + "\r\n"
    big = message(extra=filler * (EDGE_MAX_HEADER_BYTES // len(filler) + 1))
    rule, short, reason = decide(big)
    assert (rule, short) == ("header-too-large", "552 5.3.4") and str(EDGE_MAX_HEADER_BYTES) in reason
    fields = HEAD.count("\r\n")
    at_limit = message(extra="X-N: 1\r\n" * (EDGE_MAX_HEADER_FIELDS - fields))
    assert inspect_content(at_limit).header_fields == EDGE_MAX_HEADER_FIELDS
    assert decide(at_limit)[0] == "content-ok"
    rule, short, _ = decide(message(extra="X-N: 1\r\n" * (EDGE_MAX_HEADER_FIELDS - fields + 1)))
    assert (rule, short) == ("too-many-header-fields", "550 5.6.0")


def test_folded_fields_count_once_and_keep_their_addresses() -> None:
    data = message(head="From:\r\n Dr Martin\r\n <dr.martin@a.mssante.test>\r\nSender: Sec\r\n\t<sec@a.mssante.test>\r\n")
    facts = inspect_content(data)
    assert facts.header_fields == 2
    assert facts.from_addresses == ("dr.martin@a.mssante.test",)
    assert facts.other_senders == (("sender", "sec@a.mssante.test"),)
    assert decide(data)[0] == "content-ok"


def test_an_encrypted_body_is_not_walked_for_peers() -> None:
    """Inbound S/MIME is opaque until decrypted: its top-level fields are checked, its body is not parsed."""
    blob = message(extra='MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; boundary="e"\r\n',
                   body="--e\r\nunclosed")  # fmt: skip
    assert decide(blob)[0] == "mime-structure"
    assert decide(blob, opaque_crypto=True)[0] == "content-ok"


def test_the_chain_is_a_table_read_in_order() -> None:
    names = [r.name for r in CONTENT_CHAIN]
    assert names.index("header-too-large") == 0  # nothing else is read past an oversized header block
    assert len(set(names)) == len(names) and all(r.description for r in CONTENT_CHAIN)
    # Several problems at once: the first row decides.
    both = ContentFacts(size=10, has_nul=True, bare_newline=True, from_addresses=("a@b.c",))
    assert decide_content(both).rule == "nul-byte"
