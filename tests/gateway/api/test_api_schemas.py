"""The MIME the API writes, read back by Python's email parser (an independent reader of RFC 5322/2045/2231)."""

from __future__ import annotations

import base64
from email import message_from_bytes, policy

import pytest

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
            "subject": "Compte rendu – patiente été", "text": text, "receipt": True}
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
    assert msg["Subject"] == "Compte rendu – patiente été"  # type: ignore[index]
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
