"""Input an outside tester found the API mishandled: lone surrogates, repeated JSON members and headers,
unbounded event streams, and client bytes reaching the log through aiohttp's own parser errors.

Each case goes through the real TLS listener; every refusal is an RFC 9457 problem without a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from api_world import APP, BOB, ApiWorld

import gateway.api.server as server_module
from gateway.api.server import ApiServer

HEAD = f'"from":"{APP}","to":["{BOB}"]'.encode()


def _problem(response: httpx.Response) -> dict:  # type: ignore[type-arg]
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body = response.json()
    assert body["status"] == response.status_code and "Traceback" not in response.text
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(("extra", "pointer"), [
    (rb'"text":"\ud800"', "/text"),
    (rb'"html":"ok \udfff"', "/html"),
    (rb'"text":"ok","subject":"\ud800"', "/subject"),
    (rb'"text":"ok","attachments":[{"filename":"\ud800.pdf","content":"aGVsbG8="}]', "/attachments/0/filename"),
    (rb'"text":"ok","documents":[{"pdf":"aGVsbG8=","loinc":"11488-4","patient":{"ins":"1","given":"\udc00"}}]',
     "/documents/0/patient/given"),
    (rb'"text":"ok","x\ud800/y":1', "/x\ufffd~1y"),
])
async def test_lone_surrogate_is_a_400_naming_the_field(api: ApiWorld, extra: bytes, pointer: str) -> None:
    async with api.client() as http:
        got = await http.post("/v1/messages", content=b"{" + HEAD + b"," + extra + b"}",
                              headers={"Content-Type": "application/json"})
    problem = _problem(got)
    assert got.status_code == 400 and "retry-after" not in got.headers
    assert (problem["smtp_code"], problem["enhanced_status"]) == (501, "5.5.4")
    assert pointer in [e["pointer"] for e in problem["errors"]]
    assert api.gateway.store.list() == []


async def test_duplicate_json_member_is_refused(api: ApiWorld) -> None:
    body = b'{"from":"%s","from":"sec@a.mssante.test","to":["%s"],"text":"x"}' % (APP.encode(), BOB.encode())
    nested = b'{' + HEAD + b',"text":"x","attachments":[{"filename":"a","filename":"b","content":""}]}'
    async with api.client() as http:
        got = [await http.post("/v1/messages", content=b, headers={"Content-Type": "application/json"})
               for b in (body, nested)]
    for answer in got:
        problem = _problem(answer)
        assert answer.status_code == 400 and problem["rule"] == "json-duplicate-member"
    assert "from" in got[0].json()["detail"] and "filename" in got[1].json()["detail"]
    assert api.gateway.store.list() == []


async def test_two_idempotency_keys_are_refused(api: ApiWorld) -> None:
    body = b"{" + HEAD + b',"text":"x"}'
    async with api.client() as http:
        got = await http.post("/v1/messages", content=body, headers=[
            ("Content-Type", "application/json"), ("Idempotency-Key", "k-1"), ("Idempotency-Key", "k-2")])
        one = await http.post("/v1/messages", content=body, headers=[
            ("Content-Type", "application/json"), ("Idempotency-Key", "k-1")])
    problem = _problem(got)
    assert got.status_code == 400 and problem["rule"] == "idempotency-key-malformed" and "once" in problem["detail"]
    assert one.status_code == 202 and len(api.gateway.store.list()) == 1


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for the server to see a client's close: it notices at its next poll."""
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


_READERS: list[AsyncIterator[str]] = []  # kept alive: a collected line reader closes its stream


async def _open_stream(http: httpx.AsyncClient, stack: contextlib.AsyncExitStack) -> httpx.Response:
    response = await stack.enter_async_context(http.stream("GET", "/v1/events"))
    if response.status_code == 200:
        lines = response.aiter_lines()
        _READERS.append(lines)
        assert (await anext(lines)).startswith(": mssgw events")
    return response


async def test_event_streams_are_capped_per_certificate_and_in_total(api: ApiWorld,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server = api.gateway.api
    assert isinstance(server, ApiServer)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(api.client())
        opened = [await _open_stream(http, stack) for _ in range(server_module.MAX_STREAMS_PER_IDENTITY)]
        assert [r.status_code for r in opened] == [200] * server_module.MAX_STREAMS_PER_IDENTITY
        over = await _open_stream(http, stack)
        await over.aread()
        problem = _problem(over)
        assert over.status_code == 429 and problem["rule"] == "event-streams" and int(over.headers["retry-after"]) > 0
        assert "per certificate" in problem["detail"]
        # Other requests of the same certificate still go.
        assert (await http.get("/v1/messages/nope")).status_code == 404
        await opened[0].aclose()
    await _until(lambda: not server._open_streams, "all streams given back")
    monkeypatch.setattr(server_module, "MAX_STREAMS", 2)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(api.client())
        two = [await _open_stream(http, stack) for _ in range(2)]
        third = await _open_stream(http, stack)
        await third.aread()
        assert [r.status_code for r in two] == [200, 200] and third.status_code == 429
        assert "at most 2 event streams" in _problem(third)["detail"]
    await _until(lambda: not server._open_streams, "all streams given back")
    _READERS.clear()


async def test_client_disconnect_ends_a_stream_quietly(api: ApiWorld, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    server = api.gateway.api
    monkeypatch.setattr(server_module, "HEARTBEAT", 0.0)  # a write at every poll, so one meets the closed socket
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        async with api.client() as http, http.stream("GET", "/v1/events") as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith(": mssgw events")
            assert await anext(lines) == ""
            assert (await anext(lines)).startswith(": keep-alive")
        await _until(lambda: not server._open_streams, "the stream given back")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records if r.name.startswith(("aiohttp", "mssgw")))


INS = "279035121518989"


@pytest.mark.parametrize("request_head", [
    f"GET /v1/messages/{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    f"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX-Patient: {INS}{'b' * 9000}\r\n\r\n".encode(),
    f"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX-Patient: {INS}\x7f\r\n\r\n".encode(),
], ids=["long-request-line", "long-header", "bad-byte"])
async def test_malformed_request_text_never_reaches_the_log(api: ApiWorld, caplog: pytest.LogCaptureFixture,
                                                            request_head: bytes) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port, ssl=api.context(api.certs.app),
                                                   server_hostname="localhost")
    writer.write(request_head)
    await writer.drain()
    answer = await reader.read()  # aiohttp answers 400 and closes
    writer.close()
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"400"
    seen = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert seen, "aiohttp's refusal is still logged (as one line)"
    for record in caplog.records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        assert INS not in text and "aaaaaaaaaa" not in text and "bbbbbbbbbb" not in text, record.name
        assert record.levelno < logging.ERROR, text


async def test_bodies_held_at_once_are_bounded(api: ApiWorld) -> None:
    """Over the shared body budget a submission is a 503 to retry (452 4.3.1), and the budget is given back."""
    server = api.gateway.api
    assert isinstance(server, ApiServer)
    big = {"from": APP, "to": [BOB], "text": "x", "attachments": [
        {"filename": "scan.bin", "content": base64.b64encode(bytes(range(256)) * 400).decode()}]}  # 100 kB
    occupied = server.body_budget.total - 64 * 1024  # as if other bodies were being read
    assert server.body_budget.take(occupied)
    try:
        async with api.client() as http:
            refused = await http.post("/v1/messages", json=big)
            small = await http.post("/v1/messages", json={"from": APP, "to": [BOB], "text": "petit"})
    finally:
        server.body_budget.give_back(occupied)
    problem = _problem(refused)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    assert (problem["smtp_code"], problem["enhanced_status"], problem["rule"]) == (452, "4.3.1", "memory-budget")
    assert small.status_code == 202  # small bodies still fit
    async with api.client() as http:
        accepted = await http.post("/v1/messages", json=big)
    assert accepted.status_code == 202 and server.body_budget.held == 0
    assert len(api.gateway.store.list()) == 2
