"""What an outside tester found in the API after slow clients: the software named in ``Server:``,
lenient base64, aiohttp's own 400 in text/plain, refused recipients named in the delivered copy,
and a message/rfc822 attachment sent in base64.

Every case goes through the real TLS listener (httpx, curl, raw ``ssl`` sockets); the messages
the API queues are read back from the queue and parsed with the standard library's ``email``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from api_world import BOB, SEC, ApiWorld, new_message

NIR = "279035121518989"
PDF = b"%PDF-1.4\n% compte rendu\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"


def _document() -> dict[str, Any]:
    return {"pdf": base64.b64encode(PDF).decode(), "filename": "ordonnance.pdf", "loinc": "57833-6",
            "patient": {"ins": NIR, "ins_oid": "test", "family": "DUPONT", "given": "JEAN", "birth_date": "19790305",
                        "gender": "M"}}


def _queued(api: ApiWorld, queue_id: str) -> EmailMessage:
    msg = message_from_bytes(api.gateway.store.read(queue_id), policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def test_no_answer_names_the_server_software(api: ApiWorld) -> None:
    async with api.client() as http:
        answers = [await http.get("/v1/openapi.json"), await http.get("/v1/nothing"),
                   await http.post("/v1/messages", content=b"{", headers={"Content-Type": "application/json"})]
    status, fields, _ = await api.curl("GET", "/v1/messages/nope")
    servers = [a.headers.get("server", "") for a in answers] + [fields.get("server", "")]
    assert [a.status_code for a in answers] + [status] == [200, 404, 400, 404]
    assert servers == ["mssgw"] * 4
    malformed = await _raw(api, b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX-A: \x7f\r\n\r\n")
    assert b"\r\nServer: mssgw\r\n" in malformed and b"aiohttp" not in malformed.lower()
    assert b"python" not in malformed.lower()


async def _raw(api: ApiWorld, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port, ssl=api.context(api.certs.app),
                                                   server_hostname="localhost")
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(20):
        answer = await reader.read()  # a malformed request is answered, then the connection closed
    writer.close()
    return answer


@pytest.mark.parametrize(("request_head", "detail"), [
    (f"GET /v1/messages/{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "longer than 8190 octets"),
    (f"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX-Patient: {NIR}{'b' * 9000}\r\n\r\n".encode(),
     "longer than 8190 octets"),
    (f"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX-Patient: {NIR}\x7f\r\n\r\n".encode(), "A header field"),
    (b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", "request method"),
], ids=["long-request-line", "long-header", "bad-byte", "bad-method"])
async def test_aiohttp_own_400_is_problem_details(api: ApiWorld, request_head: bytes, detail: str) -> None:
    answer = await _raw(api, request_head)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert lines[0].startswith("HTTP/1.1 400 ")  # the version we speak, not aiohttp's HTTP/1.0 fallback
    assert fields["content-type"].startswith("application/problem+json")
    problem = json.loads(body)  # complete: _raw read until the server closed
    assert problem["status"] == 400 and problem["rule"] == "http-malformed"
    assert (problem["smtp_code"], problem["enhanced_status"]) == (500, "5.5.2")
    assert detail in problem["detail"] and "Bad" not in problem["detail"] and "at most" not in problem["detail"]
    assert NIR.encode() not in body and b"aaaa" not in body and b"bbbb" not in body


@pytest.mark.parametrize(("field", "text"), [
    ("attachment", "aGVs\nbG8="),  # an embedded newline
    ("attachment", "aGVsbG8=\r\n"),
    ("attachment", "aGVs bG8="),
    ("attachment", "aGVs*bG8="),
    ("attachment", "aGVsbG8"),  # no padding
    ("attachment", "aGVs\u00e9bG8="),
    ("pdf", base64.encodebytes(PDF).decode()),  # MIME-style 76-character lines
    ("cda", "PD94\tbWw="),
])
async def test_base64_is_decoded_strictly(api: ApiWorld, field: str, text: str) -> None:
    if field == "attachment":
        body = new_message(attachments=[{"filename": "a.bin", "content": text}])
        pointer = "/attachments/0/content"
    else:
        body = new_message(documents=[{**_document(), field: text}])
        pointer = f"/documents/0/{field}"
    async with api.client() as http:
        got = await http.post("/v1/messages", json=body)
    assert got.status_code == 400 and got.headers["content-type"].startswith("application/problem+json")
    assert [e["pointer"] for e in got.json()["errors"]] == [pointer]
    assert "RFC 4648" in got.json()["detail"]
    assert api.gateway.store.list() == []


async def test_delivered_copy_names_only_accepted_recipients(api: ApiWorld) -> None:
    unknown = "nobody-here@a.mssante.test"
    async with api.client() as http:
        mixed = await http.post("/v1/messages", json=new_message(to=[BOB, "someone@gmail.com"],
                                                                 cc=[unknown, SEC, "other@yahoo.fr"]))
        cc_only = await http.post("/v1/messages", json=new_message(to=["someone@gmail.com"], cc=[SEC]))
        documented = await http.post("/v1/messages", json=new_message(to=["someone@gmail.com", BOB],
                                                                      documents=[_document()]))
    assert [r.status_code for r in (mixed, cc_only, documented)] == [202, 202, 202]
    refused = {r["address"] for r in mixed.json()["recipients"] if not r["accepted"]}
    assert refused == {"someone@gmail.com", unknown, "other@yahoo.fr"}
    msg = _queued(api, mixed.json()["id"])
    assert msg["To"] == BOB and msg["Cc"] == SEC
    raw = api.gateway.store.read(mixed.json()["id"]).decode()
    assert "gmail" not in raw and "yahoo" not in raw and unknown not in raw
    msg = _queued(api, cc_only.json()["id"])
    assert msg["To"] == "undisclosed-recipients:;" and msg["Cc"] == SEC
    assert [r["address"] for r in api.gateway.store.get(cc_only.json()["id"])["recipient_states"]] == [SEC]
    msg = _queued(api, documented.json()["id"])
    assert msg["To"] == BOB and msg["X-MSS-CODECDA"] == "57833-6"


INNER = ("From: Labo <labo@b.mssante.test>\r\nTo: dr@a.mssante.test\r\nSubject: =?utf-8?q?R=C3=A9sultats?=\r\n"
         "Message-ID: <inner-1@b.mssante.test>\r\nMIME-Version: 1.0\r\n"
         "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         "Glyc\u00e9mie : 0,95 g/L\r\n").encode()


@pytest.mark.parametrize("with_document", [False, True], ids=["plain", "with-document"])
async def test_message_attachment_travels_as_message_rfc822(api: ApiWorld, with_document: bool) -> None:
    ascii_inner = INNER.replace("\u00e9".encode(), b"e").replace(b"8bit", b"7bit")
    attachments = [{"filename": "resultats.eml", "content_type": "message/rfc822",
                    "content": base64.b64encode(INNER.replace(b"\r\n", b"\n")).decode()},  # LF ends: made CRLF
                   {"filename": "ascii.eml", "content_type": "message/rfc822",
                    "content": base64.b64encode(ascii_inner).decode()},
                   {"filename": "note.txt", "content_type": "text/plain", "content": base64.b64encode(b"n").decode()}]
    extra: dict[str, Any] = {"documents": [_document()]} if with_document else {}
    async with api.client() as http:
        sent = await http.post("/v1/messages", json=new_message(attachments=attachments, **extra))
    assert sent.status_code == 202, sent.text
    raw = api.gateway.store.read(sent.json()["id"])
    msg = _queued(api, sent.json()["id"])
    parts = {p.get_filename(): p for p in msg.iter_attachments()}
    for name, inner, cte in (("resultats.eml", INNER, "8bit"), ("ascii.eml", ascii_inner, "7bit")):
        part = parts[name]
        assert part.get_content_type() == "message/rfc822" and part["Content-Transfer-Encoding"] == cte
        assert inner in raw  # byte for byte, unencoded
        embedded = part.get_content()
        assert embedded["Message-ID"] == "<inner-1@b.mssante.test>" and embedded["Subject"] == "R\u00e9sultats"
    assert parts["note.txt"]["Content-Transfer-Encoding"] == "base64" and parts["note.txt"].get_content() == "n"
    if with_document:
        assert {"ordonnance.pdf", "IHE_XDM.ZIP"} <= set(parts)


@pytest.mark.parametrize("content", [b"just some text\r\n", b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n",
                                     b"Subject: x\r\n\r\nnul \x00 inside\r\n"], ids=["no-header", "long-line", "nul"])
async def test_a_message_attachment_that_cannot_travel_unencoded_is_refused(api: ApiWorld, content: bytes) -> None:
    async with api.client() as http:
        got = await http.post("/v1/messages", json=new_message(attachments=[
            {"filename": "m.eml", "content_type": "message/rfc822", "content": base64.b64encode(content).decode()}]))
    assert got.status_code == 400 and got.json()["errors"][0]["pointer"] == "/attachments/0/content"
    assert "message/rfc822" in got.json()["errors"][0]["detail"]
    assert api.gateway.store.list() == []
