"""MAIL FROM / RCPT TO paths: the fast split of plain ``<local@domain>`` gives aiosmtpd's answer."""

from __future__ import annotations

import asyncio
import string

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp.server import _PLAIN_PATH, NULL_PATH, GatewaySMTP

ALPHABET = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-.@<> \t\"()[]:;,\\é"


def _servers() -> tuple[GatewaySMTP, SMTP]:
    loop = asyncio.new_event_loop()
    ours = GatewaySMTP.__new__(GatewaySMTP)  # only _getaddr is exercised: no handler, no transport
    theirs = SMTP.__new__(SMTP)
    for server in (ours, theirs):
        server.local_part_limit = 64
        server.loop = loop
    return ours, theirs


OURS, THEIRS = _servers()


def theirs(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's answer; the stdlib parser raising on a malformed path counts as a syntax error."""
    try:
        return THEIRS._getaddr(arg)
    except Exception:
        return None, None


def test_plain_paths_take_the_fast_split() -> None:
    for arg, expected in [
        ("<dr.martin@a.mssante.test>", ("dr.martin@a.mssante.test", "")),
        ("<dr.martin@a.mssante.test> SIZE=20000 BODY=8BITMIME", ("dr.martin@a.mssante.test", "SIZE=20000 BODY=8BITMIME")),
        ("<A+b_c-d@Sub.Dom-1.test>", ("A+b_c-d@Sub.Dom-1.test", "")),
    ]:
        assert _PLAIN_PATH.match(arg.lstrip()) is not None
        assert OURS._getaddr(arg) == expected == theirs(arg)
    assert OURS._getaddr("<> SIZE=10") == (NULL_PATH, " SIZE=10")
    assert OURS._getaddr("<" + "x" * 65 + "@a.test>") == (None, None)  # local part over 64: refused as before


def test_other_paths_still_go_through_the_parser() -> None:
    assert OURS._getaddr("<0@[>") == (None, None)  # the stdlib parser raises AttributeError on it
    for arg in ['<"dr martin"@a.test>', "<a@b.c> (comment) SIZE=1", "<a..b@c.d>", "<a@[127.0.0.1]>", "<a@b.c>x"]:
        assert _PLAIN_PATH.match(arg) is None
        assert OURS._getaddr(arg) == theirs(arg)


@settings(max_examples=1000, deadline=None)
@given(st.text(ALPHABET, max_size=30), st.sampled_from(["", " SIZE=1", "  BODY=8BITMIME", "x", " (c) X=1", " "]))
def test_same_answer_as_aiosmtpd(inner: str, params: str) -> None:
    arg = f"<{inner}>{params}"
    if arg.startswith("<>"):
        return
    assert OURS._getaddr(arg) == theirs(arg)
