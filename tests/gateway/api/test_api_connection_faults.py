"""A second outside tester's findings in the API, each replayed against the real TLS listener.

Connections without a client certificate (their own cap, the head deadline, one answer), large
bodies expanded one at a time, ``To:`` folded and without repeats, a body its ``Content-Encoding``
does not decode (400, closed, no traceback), a client hanging up mid-body (one INFO line), aiohttp's
own 400 in HTTP/1.1 with a detail that fits, an ``Idempotency-Key`` race that is not an outage, and
``Expect: 100-continue`` checked before the body is invited.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import inspect
import json
import logging
import ssl
import zlib
from collections.abc import AsyncIterator, Callable
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from api_world import (
    APP,
    BOB,
    DOMAIN,
    ApiCerts,
    ApiWorld,
    new_message,
    prepare_home,
    read_until_closed,
    started_api,
)
from smtp_world import CertFiles

import gateway.api.server as server_module
from directory import admin
from directory.db import make_engine, session_factory, transaction
from gateway.api.server import ApiServer
from gateway.config import load_settings

WAIT = 20.0  # the most any answer or close is waited for
LONG = 600.0  # a deadline that must not be the one that acts


@contextlib.asynccontextmanager
async def _world(home: Path, certs: ApiCerts, **api: object) -> AsyncIterator[ApiWorld]:
    settings: dict[str, object] = {"handshake_seconds": LONG, "head_seconds": LONG, "idle_seconds": LONG,
                                   "body_grace_seconds": LONG}
    settings.update(api)
    prepare_home(home, certs, {"api": settings})
    async with started_api(home, certs) as world:
        yield world


async def _connect(world: ApiWorld, cert: CertFiles | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.create_default_context(cafile=str(world.ca))
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return await asyncio.open_connection("127.0.0.1", world.port, ssl=ctx, server_hostname="localhost")


async def _eof(reader: asyncio.StreamReader) -> bytes:
    return await read_until_closed(reader, WAIT)


async def _response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status line, fields, body)."""
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(fields.get("content-length", "0")))
    return lines[0], fields, body


async def _until(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


def _no_errors(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage()
        assert record.levelno < logging.ERROR, text
        assert "Traceback" not in text and 'File "' not in text, text


# --- 1. no certificate: its own cap, the head deadline, one answer -----------------------------


async def test_connections_without_a_certificate_do_not_take_the_slots(sqlite_home: Path,
                                                                       api_certs: ApiCerts) -> None:
    async with _world(sqlite_home, api_certs, max_anonymous_connections=2, max_connections=3,
                      max_connections_per_ip=3) as world:  # fmt: skip
        held = [await _connect(world, None) for _ in range(2)]
        extra_reader, extra_writer = await _connect(world, None)
        assert await _eof(extra_reader) == b""  # over the cap of its own: closed at once, no answer
        extra_writer.close()
        # The certificate slots are all free: three valid clients are served at once.
        served = [await _connect(world, world.certs.app) for _ in range(3)]
        for _, writer in served:
            writer.write(b"GET /v1/openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for reader, _ in served:
            status, _, _ = await _response(reader)
            assert status == "HTTP/1.1 200 OK"
        # A held anonymous connection gets its one answer (403), then is closed.
        reader, writer = held[0]
        writer.write(b"GET /v1/messages/abc HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, fields, body = await _response(reader)
        assert status.startswith("HTTP/1.1 403") and fields["connection"] == "close"
        assert json.loads(body)["rule"] == "client-certificate"
        assert await _eof(reader) == b""
        for _, w in [*held, *served]:
            w.close()
        refused = sum(world.gateway.metrics.value("mssgw_api_connections_refused_total", reason=f"no-certificate-{r}")
                      for r in ("per-ip", "total"))  # fmt: skip
        assert refused == 1


async def test_a_connection_without_a_certificate_waits_only_the_head_deadline(sqlite_home: Path,
                                                                               api_certs: ApiCerts) -> None:
    async with _world(sqlite_home, api_certs, head_seconds=0.3) as world:
        reader, writer = await _connect(world, None)
        assert await _eof(reader) == b""  # idle_seconds is 600: the head deadline closed it
        writer.close()


# --- 2. large bodies one at a time -------------------------------------------------------------


async def test_large_requests_are_expanded_one_at_a_time(api: ApiWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "LARGE_BODY", 100 * 1024)
    server = api.gateway.api
    assert isinstance(server, ApiServer)
    running, most = 0, 0
    real_submit = server.edge.submit

    async def counted(*args: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            return await real_submit(*args)
        finally:
            running -= 1

    monkeypatch.setattr(server.edge, "submit", counted)
    big = new_message(attachments=[{"filename": "scan.bin",
                                    "content": base64.b64encode(bytes(range(256)) * 512).decode()}])  # 128 KiB
    async with api.client() as http:
        answers = await asyncio.gather(*(http.post("/v1/messages", json=big) for _ in range(4)),
                                       http.post("/v1/messages", json=new_message()))
    assert [a.status_code for a in answers] == [202] * 5
    assert most == 2  # the large ones one at a time; the small one went alongside
    assert server.body_budget.held == 0


# --- 3. To: folded, each address once ----------------------------------------------------------


async def test_many_recipients_are_folded_and_named_once(sqlite_home: Path, api_certs: ApiCerts) -> None:
    names = [f"secretariat.cardiologie.pediatrique.{i:02}@{DOMAIN}" for i in range(25)]
    prepare_home(sqlite_home, api_certs, {"limits": {"max_recipients": 50}})
    engine = make_engine(load_settings(sqlite_home).database_url)
    try:
        with transaction(session_factory(engine)) as db:
            for i, name in enumerate(names):
                admin.add_mailbox(db, name, type="APP", display_name=f"t{i}")
    finally:
        engine.dispose()
    async with started_api(sqlite_home, api_certs) as api, api.client() as http:
        answer = await http.post("/v1/messages", json=new_message(to=[*names, names[0].upper()],
                                                                   cc=[BOB, BOB, names[1]]))
        assert answer.status_code == 202, answer.text
        raw = api.gateway.store.read(answer.json()["id"])
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    msg = message_from_bytes(raw, policy=policy.default)
    assert [a.addr_spec for a in msg["To"].addresses] == names
    assert [a.addr_spec for a in msg["Cc"].addresses] == [BOB]
    to_lines = head.split(b"\r\nTo:", 1)[1].split(b"\r\nCc:", 1)[0]
    assert all(len(line) <= 78 for line in (b"To:" + to_lines).split(b"\r\n"))


# --- 4. a body its Content-Encoding does not decode --------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_an_undecodable_body_is_a_400_and_the_connection_closes(api: ApiWorld,
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      coding: str) -> None:
    caplog.set_level(logging.INFO)
    body = json.dumps(new_message()).encode()
    reader, writer = await _connect(api, api.certs.app)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s"
                 b"GET /v1/openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n" % (coding.encode(), len(body), body))
    status, fields, answer = await _response(reader)
    problem = json.loads(answer)
    assert status.startswith("HTTP/1.1 400") and fields["content-type"].startswith("application/problem+json")
    assert problem["rule"] == "content-encoding" and problem["enhanced_status"] == "5.6.1"
    rest = await _eof(reader)
    assert rest == b"" or rest.startswith(b"HTTP/1.1 200")  # the pipelined request: answered or closed
    writer.close()
    assert api.gateway.store.list() == []
    _no_errors(caplog)
    # A body that does decode is taken: zlib-wrapped or raw deflate; gzip in one member or two.
    raw_deflate = zlib.compressobj(wbits=-15)
    half = len(body) // 2
    encoded = ([zlib.compress(body), raw_deflate.compress(body) + raw_deflate.flush()] if coding == "deflate" else
               [gzip.compress(body), gzip.compress(body[:half]) + gzip.compress(body[half:])])
    async with api.client() as http:
        for content in encoded:
            good = await http.post("/v1/messages", content=content,
                                   headers={"Content-Type": "application/json", "Content-Encoding": coding})
            assert good.status_code == 202, good.text


@pytest.mark.parametrize(("codings", "expect"), [([b"br"], False), ([b"compress"], False), ([b"gzip, gzip"], False),
                                                 ([b"gzip", b"gzip"], False), ([b"br"], True), ([b"x-foo"], True)])
async def test_a_coding_we_do_not_decode_is_a_415_before_the_body_is_read(api: ApiWorld, codings: list[bytes],
                                                                          expect: bool) -> None:
    """A coding aiohttp would not decode used to reach the JSON parser still encoded (read as plain)."""
    body = gzip.compress(json.dumps(new_message()).encode())
    reader, writer = await _connect(api, api.certs.app)
    fields = b"".join(b"Content-Encoding: %s\r\n" % coding for coding in codings)
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n%s\r\n" % (fields, len(body), b"Expect: 100-continue\r\n" if expect else b""))
    writer.write(head if expect else head + body)
    status, answer_fields, answer = await _response(reader)
    problem = json.loads(answer)
    assert status.startswith("HTTP/1.1 415"), status  # never the 100 Continue
    assert answer_fields["accept-encoding"] == "gzip, deflate"
    assert problem["rule"] == "content-encoding-unsupported" and problem["enhanced_status"] == "5.6.1"
    assert await _eof(reader) == b""
    writer.close()
    assert api.gateway.store.list() == []


@pytest.mark.parametrize("cut", ["no trailer", "cut inside", "bytes after"])
async def test_a_gzip_body_cut_short_or_followed_by_bytes_does_not_decode(api: ApiWorld, cut: str) -> None:
    """Found by an outside test: a gzip body without its CRC trailer was queued (202), one cut inside
    its data was read as malformed JSON."""
    whole = gzip.compress(json.dumps(new_message()).encode())
    body = {"no trailer": whole[:-8], "cut inside": whole[: len(whole) // 2], "bytes after": whole + b"{}"}[cut]
    reader, writer = await _connect(api, api.certs.app)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status, fields, answer = await _response(reader)
    assert status.startswith("HTTP/1.1 400") and json.loads(answer)["rule"] == "content-encoding", answer
    assert fields["connection"].lower() == "close"
    writer.close()
    assert api.gateway.store.list() == []


async def test_a_decompression_bomb_is_a_413_and_the_rest_is_never_expanded(api: ApiWorld) -> None:
    """Found by an outside test: after the 413, the server read and expanded the rest of a 1 GiB
    gzip body to throw it away, and a few such requests stalled every listener for seconds."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(squeeze.compress(b" " * (1 << 20)) for _ in range(64)) + squeeze.flush()
    reader, writer = await _connect(api, api.certs.app)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb))
    status, fields, answer = await _response(reader)
    assert status.startswith("HTTP/1.1 413") and json.loads(answer)["enhanced_status"] == "5.3.4"
    assert fields["connection"].lower() == "close"
    assert await _eof(reader) == b""
    writer.close()
    server = api.gateway.api
    assert isinstance(server, ApiServer)
    await _until(lambda: server.body_budget.held == 0, "the body budget is given back")


# --- 5. a client hanging up mid-body -----------------------------------------------------------


async def test_a_client_hanging_up_mid_body_is_one_info_line(api: ApiWorld, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _reader, writer = await _connect(api, api.certs.app)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{")
    await writer.drain()
    server = api.gateway.api
    assert isinstance(server, ApiServer)
    await _until(lambda: server.body_budget.held > 0, "the body is being read")
    writer.transport.abort()
    await _until(lambda: any("status=499" in r.getMessage() for r in caplog.records), "the hang-up is logged")
    _no_errors(caplog)
    gone = [r for r in caplog.records if "closed its connection" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO


# --- 6. aiohttp's own 400 ----------------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "words"), [
    (b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nX-A: \x7f\r\n\r\n", "header field"),
    (b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(140)) + b"\r\n",
     "More than 128 header fields"),
    (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\n{}\r\n0\r\n\r\n", "chunked"),
    (b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "Host header field"),
])
async def test_malformed_requests_get_an_http11_400_that_names_the_fault(api: ApiWorld, request_bytes: bytes,
                                                                         words: str) -> None:
    reader, writer = await _connect(api, api.certs.app)
    writer.write(request_bytes)
    await writer.drain()
    answer = await _eof(reader)
    writer.close()
    status, body = answer.partition(b"\r\n")[0], answer.partition(b"\r\n\r\n")[2]
    assert status.startswith(b"HTTP/1.1 400"), answer[:200]
    detail = json.loads(body)["detail"]
    assert words.lower() in detail.lower(), detail
    assert "Error" not in detail and "Bad" not in detail and "at most 128" not in detail.replace(words, "")


# --- 7. an Idempotency-Key race is not an outage ------------------------------------------------


async def test_concurrent_requests_with_one_key_are_no_outage(api: ApiWorld, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    headers = {"Idempotency-Key": "race-1"}
    async with api.client() as http:
        answers = await asyncio.gather(*(http.post("/v1/messages", json=new_message(), headers=headers)
                                         for _ in range(8)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {202, 409} and 202 in statuses
    assert len({a.json()["id"] for a in answers if a.status_code == 202}) == 1
    assert len(api.gateway.store.list()) == 1
    assert not [r for r in caplog.records if "directory-unavailable" in r.getMessage()]
    assert api.gateway.metrics.value("mssgw_outages_total", listener="api", kind="directory") == 0


# --- 8. Expect: 100-continue is checked first --------------------------------------------------


async def _expecting(world: ApiWorld, cert: CertFiles | None, length: int = 100) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter, bytes]:  # fmt: skip
    reader, writer = await _connect(world, cert)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length)
    async with asyncio.timeout(WAIT):
        first = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, first


async def test_expect_100_continue_is_answered_only_after_the_checks(api: ApiWorld) -> None:
    for cert in (None, api.certs.stranger):
        reader, writer, first = await _expecting(api, cert)
        assert first.startswith(b"HTTP/1.1 403"), first  # no 100 Continue: the body is never invited
        assert b"Connection: close" in first
        await _eof(reader)
        writer.close()
    reader, writer, first = await _expecting(api, api.certs.app, 10**9)
    assert first.startswith(b"HTTP/1.1 413"), first
    writer.close()
    body = json.dumps({"from": APP, "to": [BOB], "text": "x"}).encode()
    reader, writer, first = await _expecting(api, api.certs.app, len(body))
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    status, _, answer = await _response(reader)
    assert status.startswith("HTTP/1.1 202"), answer
    writer.close()


def test_the_aiohttp_internals_these_fixes_use_are_there() -> None:
    """``GuardedHandler`` sets the keep-alive deadline of a connection without a certificate, cancels
    the idle timer once a head begins, and answers aiohttp's unparsable requests in HTTP/1.1: by
    these names. An aiohttp that renames them fails here, not silently in production."""
    from aiohttp import web_protocol, web_request

    slots = {name for cls in web_protocol.RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
    assert {"_keepalive_timeout", "_keepalive_handle"} <= slots
    assert "self._version = message.version" in inspect.getsource(web_request.BaseRequest.__init__)
    assert web_protocol.ERROR.version == (1, 0)  # what handle_error's answer is lifted from


async def test_large_base64_is_decoded_slice_by_slice_as_strictly(sqlite_home: Path, api_certs: ApiCerts) -> None:
    """Over 1 MiB, base64 is checked and decoded in slices (no long hold of the loop): the same bytes,
    and padding or a space anywhere still refused with the field's pointer."""
    content = bytes(range(256)) * 12288  # 3 MiB
    text = base64.b64encode(content).decode()
    bad_padding = text[:1 << 20] + "=" + text[(1 << 20) + 1:]
    bad_space = text[:(3 << 20) - 7] + " " + text[(3 << 20) - 6:]
    prepare_home(sqlite_home, api_certs, {"limits": {"max_message_size": 8_000_000}})
    async with started_api(sqlite_home, api_certs) as world, world.client() as http:
        answers = [await http.post("/v1/messages", json=new_message(attachments=[
            {"filename": "scan.bin", "content": value}])) for value in (text, bad_padding, bad_space)]
        assert [a.status_code for a in answers] == [202, 400, 400]
        assert all(a.json()["errors"][0]["pointer"] == "/attachments/0/content" for a in answers[1:])
        msg = message_from_bytes(world.gateway.store.read(answers[0].json()["id"]), policy=policy.default)
        parts = [p for p in msg.walk() if p.get_filename() == "scan.bin"]
        assert parts[0].get_payload(decode=True) == content
