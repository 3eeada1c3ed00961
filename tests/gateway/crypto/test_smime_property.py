"""Property: any MIME message (text, attachments, nesting, 8bit, CRLF or LF) survives protect/open byte-exactly."""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.crypto._mime import to_crlf
from gateway.crypto.smime import open_message, protect

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"), max_size=300)


@st.composite
def _part(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["text", "attachment", "multipart"] if depth < 3 else ["text", "attachment"]))
    if kind == "text":
        return "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + draw(_text)
    if kind == "attachment":
        blob = base64.encodebytes(draw(st.binary(max_size=2000))).decode()
        return ('Content-Type: application/pdf; name="cr.pdf"\nContent-Transfer-Encoding: base64\n'
                'Content-Disposition: attachment; filename="cr.pdf"\n\n' + blob)  # fmt: skip
    boundary = f"b{depth}_{draw(st.integers(0, 10**6))}"
    parts = draw(st.lists(_part(depth + 1), min_size=1, max_size=3))
    body = "".join(f"--{boundary}\n{p}\n" for p in parts)
    return f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n{body}--{boundary}--\n'


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    subject = draw(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40))
    text = (
        f"From: Dr Alice <dr.alice@a.test>\nTo: sec@b.test\nSubject: {subject}\nMIME-Version: 1.0\n"
        + draw(_part())
    )
    data = text.encode("utf-8")
    return to_crlf(data) if draw(st.booleans()) else data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=_message())
def test_round_trip(world: Any, msg: bytes) -> None:
    out = protect(
        msg, signer_cert=world.alice.cert, signer_key=world.alice.key, recipient_certs=[world.bob.cert]
    )
    inner, res = open_message(
        out, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust
    )
    assert res.ok, res
    assert inner == to_crlf(msg)
    if b"\n" not in msg.replace(b"\r\n", b""):
        assert inner == msg  # CRLF input comes back byte-identical
