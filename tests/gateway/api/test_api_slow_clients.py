"""Slow clients (slowloris) against the real TLS listener: every phase of a connection has a deadline,
open connections are capped per address and in all, and event streams are not cut.

Each deadline is set short in the world of its test and the others long, so the connection must
be closed by the deadline under test: were it missing, the next one would come only after the
bounded wait of ``_eof`` (20 s) and the test would fail. Run with ``-W error::ResourceWarning``
too: a socket the server drops without closing fails the test when it is collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from api_world import APP, BOB, ApiCerts, ApiWorld, prepare_home, read_until_closed, started_api
from smtp_world import CertFiles

import gateway.api.server as server_module
import gateway.api.transport as transport_module
from gateway.api.server import ApiServer
from gateway.delivery.maildir import MaildirDelivery

WAIT = 20.0  # the most any close is waited for; every deadline under test is well under it
LONG = 600.0  # a deadline that must not be the one that acts


@contextlib.asynccontextmanager
async def _world(home: Path, certs: ApiCerts, **api: object) -> AsyncIterator[ApiWorld]:
    settings: dict[str, object] = {"handshake_seconds": LONG, "head_seconds": LONG, "idle_seconds": LONG,
                                   "body_grace_seconds": LONG}
    settings.update(api)
    prepare_home(home, certs, {"api": settings})
    async with started_api(home, certs) as world:
        yield world
    gc.collect()  # a transport left open warns (ResourceWarning) when collected: here, inside the test


async def _connect(world: ApiWorld, cert: CertFiles | None, local: str | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(world.ca))
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return await asyncio.open_connection("127.0.0.1", world.port, ssl=ctx, server_hostname="localhost",
                                         local_addr=(local, 0) if local else None)  # fmt: skip


async def _eof(reader: asyncio.StreamReader) -> bytes:
    return await read_until_closed(reader, WAIT)


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(fields.get("content-length", "0")))
    return int(lines[0].split()[1]), fields, body


def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()


GET = b"GET /v1/openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n"


async def test_a_handshake_that_never_finishes_is_cut(sqlite_home: Path, api_certs: ApiCerts) -> None:
    async with _world(sqlite_home, api_certs, handshake_seconds=0.5) as world:
        for hello in (b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):  # nothing; half a ClientHello
            reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
            writer.write(hello)
            await writer.drain()
            assert await _eof(reader) == b""
            _close(writer)
        # A normal client still gets in.
        async with world.client() as http:
            assert (await http.get("/v1/openapi.json")).status_code == 200


@pytest.mark.parametrize("with_cert", [True, False], ids=["client-certificate", "no-certificate"])
async def test_half_a_request_head_is_cut(sqlite_home: Path, api_certs: ApiCerts, with_cert: bool) -> None:
    async with _world(sqlite_home, api_certs, head_seconds=0.5) as world:
        server = world.gateway.api
        assert isinstance(server, ApiServer)
        for partial in (b"GET /v1/openapi.json HT", b"GET /v1/openapi.json HTTP/1.1\r\nHost: localhost\r\nX-A: "):
            reader, writer = await _connect(world, api_certs.app if with_cert else None)
            writer.write(partial)
            await writer.drain()
            assert await _eof(reader) == b""
            _close(writer)
        # A complete request on a kept-alive connection, then half of the next one: cut as well.
        reader, writer = await _connect(world, api_certs.app if with_cert else None)
        writer.write(GET)
        status, fields, _ = await _response(reader)
        assert status == 200
        # Without a certificate there is no keep-alive: one answer, then the connection is closed.
        assert (fields.get("connection", "keep-alive").lower() == "close") is not with_cert
        writer.write(b"GET /v1/openapi.json HTTP/1.1\r\nHo")
        assert await _eof(reader) == b""
        _close(writer)
        assert world.gateway.metrics.value("mssgw_api_slow_clients_total", phase="head") == (3 if with_cert else 2)
    assert server.connections.open == 0


async def test_idle_connections_are_closed(sqlite_home: Path, api_certs: ApiCerts) -> None:
    async with _world(sqlite_home, api_certs, idle_seconds=0.5) as world:
        server = world.gateway.api
        assert isinstance(server, ApiServer)
        reader, writer = await _connect(world, api_certs.app)  # connects, never asks
        assert await _eof(reader) == b""
        _close(writer)
        reader, writer = await _connect(world, api_certs.app)  # asks once, then idles on keep-alive
        writer.write(GET)
        status, fields, _ = await _response(reader)
        assert status == 200 and fields.get("connection", "keep-alive").lower() != "close"
        assert await _eof(reader) == b""
        _close(writer)
        async with asyncio.timeout(WAIT):
            while server.connections.open:
                await asyncio.sleep(0.05)  # the server's side of the close is handled at its next turn


async def test_a_body_slower_than_the_floor_is_answered_408(sqlite_home: Path, api_certs: ApiCerts) -> None:
    async with _world(sqlite_home, api_certs, body_min_rate=2000, body_grace_seconds=0.3) as world:
        server = world.gateway.api
        assert isinstance(server, ApiServer)
        body = json.dumps({"from": APP, "to": [BOB], "text": "x" * 4000}).encode()
        reader, writer = await _connect(world, api_certs.app)
        writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        answer: asyncio.Task[tuple[int, dict[str, str], bytes]] = asyncio.create_task(_response(reader))
        sent = 0
        while not answer.done() and sent < len(body):  # 20 octets/s: a slow client, not a wait
            writer.write(body[sent:sent + 1])
            sent += 1
            await asyncio.wait({answer}, timeout=0.05)
        status, fields, payload = await answer
        problem = json.loads(payload)
        assert status == 408 and fields["content-type"].startswith("application/problem+json")
        assert problem["rule"] == "request-body-slow" and problem["enhanced_status"] == "4.4.2"
        assert fields["connection"].lower() == "close" and sent < len(body)
        await _eof(reader)
        _close(writer)
        assert server.body_budget.held == 0 and world.gateway.store.list() == []
        # The same body sent at once is taken.
        async with world.client() as http:
            got = await http.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
        assert got.status_code == 202


async def _ask(world: ApiWorld, local: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, bytes]:
    reader, writer = await _connect(world, world.certs.app, local)
    writer.write(GET)
    status, fields, body = await _response(reader)
    if status != 200:
        assert fields["connection"].lower() == "close" and int(fields["retry-after"]) > 0
    return reader, writer, status, body


async def test_open_connections_are_capped_per_address_and_in_all(sqlite_home: Path, api_certs: ApiCerts) -> None:
    async with _world(sqlite_home, api_certs, max_connections_per_ip=2, max_connections=3) as world:
        server = world.gateway.api
        assert isinstance(server, ApiServer)
        kept: list[asyncio.StreamWriter] = []
        for _ in range(2):
            _, writer, status, _ = await _ask(world, "127.0.0.1")
            assert status == 200
            kept.append(writer)
        reader, writer, status, body = await _ask(world, "127.0.0.1")  # a third from the same address
        problem = json.loads(body)
        assert status == 503 and problem["rule"] == "too-many-connections" and problem["enhanced_status"] == "4.7.0"
        await _eof(reader)
        _close(writer)
        _, other, status, _ = await _ask(world, "127.0.0.2")  # another address: within the total
        assert status == 200
        kept.append(other)
        reader, writer, status, _ = await _ask(world, "127.0.0.3")  # the fourth in all
        assert status == 503
        await _eof(reader)
        _close(writer)
        assert server.connections.open == 3
        metrics = world.gateway.metrics
        assert metrics.value("mssgw_api_connections_refused_total", reason="per-ip") == 1
        assert metrics.value("mssgw_api_connections_refused_total", reason="total") == 1
        _close(kept.pop(0))  # one leaves: its place is given back
        async with asyncio.timeout(WAIT):
            while server.connections.open > 2:
                await asyncio.sleep(0.05)
        _, writer, status, _ = await _ask(world, "127.0.0.1")
        assert status == 200
        kept.append(writer)
        for writer in kept:
            _close(writer)


async def test_event_streams_outlive_every_deadline(sqlite_home: Path, api_certs: ApiCerts,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "HEARTBEAT", 0.0)  # a comment at every poll (0.1 s)
    async with _world(sqlite_home, api_certs, idle_seconds=0.3, head_seconds=0.3, body_grace_seconds=0.0,
                      body_min_rate=1) as world:  # fmt: skip
        loop = asyncio.get_running_loop()
        async with world.client() as http, http.stream("GET", "/v1/events") as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith(": mssgw events")
            started, beats = loop.time(), 0
            while loop.time() - started < 10 * 0.3:  # well past the idle and head deadlines
                line: Any = await anext(lines)
                beats += line.startswith(": keep-alive")
            assert beats >= 5


async def test_far_over_the_cap_a_connection_is_closed_at_once(sqlite_home: Path, api_certs: ApiCerts,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "OVER_CAP_ANSWERS", 0)  # no 503 answers left to give
    async with _world(sqlite_home, api_certs, max_connections_per_ip=1) as world:
        server = world.gateway.api
        assert isinstance(server, ApiServer)
        _, kept, status, _ = await _ask(world, "127.0.0.1")
        assert status == 200
        for _ in range(3):
            try:
                reader, writer = await _connect(world, world.certs.app)
            except (ConnectionResetError, ssl.SSLError):
                continue  # closed before TLS 1.3 finished on the client's side: closed all the same
            writer.write(GET)
            assert await _eof(reader) == b""
            _close(writer)
        assert server.connections.open == 1 and server.connections.answering == 0
        _close(kept)


async def test_an_event_stream_nobody_reads_is_closed(sqlite_home: Path, api_certs: ApiCerts,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "HEARTBEAT", 0.0)  # a comment at every poll (0.1 s)...
    monkeypatch.setattr(server_module, "KEEPALIVE", b": " + b"k" * 256 * 1024 + b"\n\n")  # ...of 256 KiB
    monkeypatch.setattr(transport_module, "WRITE_SECONDS", 0.5)
    async with _world(sqlite_home, api_certs) as world:
        server = world.gateway.api
        assert isinstance(server, ApiServer)
        ctx = world.context(api_certs.app)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", world.port))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost")
        writer.write(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        writer.transport.pause_reading()  # and never reads again: the server's buffers fill up
        async with asyncio.timeout(WAIT):
            while not server._open_streams:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(WAIT * 2):
            while server._open_streams:
                await asyncio.sleep(0.05)  # given back once the write deadline cut the stream
        writer.transport.abort()
        del reader


async def test_an_answer_nobody_reads_is_cut(sqlite_home: Path, api_certs: ApiCerts,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "WRITE_SECONDS", 0.5)
    async with _world(sqlite_home, api_certs) as world:
        server = world.gateway.api
        assert isinstance(server, ApiServer)
        big = (b"From: doc@b.mssante.test\r\nTo: %s\r\nSubject: scan\r\n\r\n" % APP.encode()
               + (b"x" * 998 + b"\r\n") * 16_000)  # 16 MB: more than every buffer between us
        name = MaildirDelivery(world.settings.mail_dir).deliver(APP, big).split(":")[0]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", world.port))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=world.context(api_certs.app),
                                                       server_hostname="localhost")
        writer.write(f"GET /v1/mailboxes/{APP}/messages/{name}?raw=1 HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(WAIT):
            while not server.connections.open:
                await asyncio.sleep(0.05)
        writer.transport.pause_reading()  # reads nothing more
        async with asyncio.timeout(WAIT * 2):
            while server.connections.open:
                await asyncio.sleep(0.05)  # the connection is gone once the write deadline cut it
        writer.transport.abort()
        del reader
