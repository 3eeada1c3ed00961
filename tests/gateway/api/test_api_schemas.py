"""The MIME the API writes, read back by Python's email parser (an independent reader of RFC 5322/2045/2231)."""

from __future__ import annotations

import base64
from email import message_from_bytes, policy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.api.problems import Problem
from gateway.api.schemas import build_message, load_json, parse_submission
from gateway.policy.content import decide_content, inspect_content


def _lf(text: str) -> str:
    """The text with the wire's CRLF as LF (the parser keeps CRLF in 7bit bodies), no final newline."""
    return text.replace("\r\n", "\n").rstrip("\n")


def _read(body: dict) -> tuple[bytes, object]:  # type: ignore[type-arg]
    data = build_message(parse_submission(body))
    return data, message_from_bytes(data, policy=policy.default)


@pytest.mark.parametrize("text", ["Bonjour.\n", "Résultat : 5 µg/L — à revoir\n", "x" * 2000 + "\n", "", "a\r\nb\rc"])
@pytest.mark.parametrize("html", [None, "<p>Été</p>"])
@pytest.mark.parametrize("attach", [False, True])
def test_plain_messages_read_back_exactly(text: str, html: str | None, attach: bool) -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 3
    body = {"from": "app@a.mssante.test", "to": ["bob@a.mssante.test"], "cc": ["sec@a.mssante.test"],
            "subject": "Compte rendu \u2013 patiente été", "text": text, "receipt": True}
    if html is not None:
        body["html"] = html
    if attach:
        body["attachments"] = [{"filename": "compte rendu éè.pdf", "content_type": "application/pdf",
                                "content": base64.b64encode(pdf).decode()}]
    data, msg = _read(body)
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    facts = inspect_content(data)
    assert decide_content(facts).accepted
    assert msg["Subject"] == "Compte rendu \u2013 patiente été"  # type: ignore[index]
    assert msg["Cc"] == "sec@a.mssante.test" and msg["Disposition-Notification-To"] == "app@a.mssante.test"  # type: ignore[index]
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    got_text = msg.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
    assert _lf(got_text.get_content()) == expected.rstrip("\n")
    if html is not None:
        assert _lf(msg.get_body(preferencelist=("html",)).get_content()) == html  # type: ignore[attr-defined]
    attachments = list(msg.iter_attachments()) if msg.is_multipart() else []  # type: ignore[attr-defined]
    if attach:
        assert [(a.get_filename(), a.get_content()) for a in attachments] == [("compte rendu éè.pdf", pdf)]
    else:
        assert attachments == []


def test_header_injection_is_a_field_error() -> None:
    with pytest.raises(Problem) as caught:
        parse_submission(load_json(b'{"from": "app@a.mssante.test", "to": ["b@a.mssante.test"], '
                                   b'"subject": "x\\r\\nBcc: e@x.fr", "text": "t"}'))
    assert caught.value.status == 400 and caught.value.extra["errors"][0]["pointer"] == "/subject"


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=12)
_fields = st.sampled_from(["from", "to", "cc", "subject", "text", "html", "attachments", "documents", "receipt",
                           "filename", "content", "content_type", "x"])
_bodies = st.dictionaries(_fields, _values | st.just("app@a.mssante.test") | st.just(["bob@a.mssante.test"]),
                          max_size=9)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bodies)
def test_any_json_object_is_a_message_or_a_field_error(raw: dict) -> None:  # type: ignore[type-arg]
    """Fuzz: whatever the JSON, a 400 problem naming fields, or a message the content rules accept."""
    try:
        sub = parse_submission(raw)
    except Problem as problem:
        assert problem.status == 400 and problem.extra["errors"]
        return
    data = build_message(sub)
    assert decide_content(inspect_content(data)).accepted


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_json_or_a_problem(body: bytes) -> None:
    try:
        value = load_json(body)
    except Problem as problem:
        assert problem.status == 400 and problem.rule == "json-malformed"
    else:
        assert isinstance(value, dict)
