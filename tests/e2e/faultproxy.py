"""A TCP proxy between two operators that drops connections at seeded random points of the SMTP exchange.

It sits between operator A's relay and operator B's inbound listener and never terminates TLS:
after STARTTLS it only sees encrypted records, so fault points are counted in *chunks* (one
``read()`` on one side: a command, a reply, a TLS flight or a piece of the message) and bytes.
Each connection gets its own plan, drawn from ``random.Random(f"{seed}:{n}")`` for the n-th
connection: with probability ``drop_probability`` one fault below, otherwise none.

Fault points (``Fault.kind``) and what they mean on the SMTP conversation (client chunk 1 is
EHLO, 2 is STARTTLS, 3-4 the TLS handshake, then the encrypted EHLO, MAIL, RCPT..., DATA,
the message ending with the final ``.``, QUIT; server chunk 1 is the banner, 2 the EHLO reply,
3 the ``220`` to STARTTLS, 4-5 the handshake, then the replies):

- ``client-before``: the k-th client chunk is not forwarded, the connection is cut: B never
  sees that command (before EHLO, STARTTLS, MAIL, RCPT, DATA, the message...).
- ``client-after``: the k-th client chunk is forwarded, then the connection is cut before
  anything else passes: B has the command, A never gets its reply.
- ``server-before``: the k-th server chunk (a reply or a TLS flight) is not forwarded, the
  connection is cut: A never sees that reply.
- ``client-bytes``: the client stream is cut after n bytes (in the middle of a command, a TLS
  record or the message body).
- ``final-reply-lost``: the server chunk that follows the client's big message chunk (the
  reply to the final ``.``) is held back and the connection cut: B has accepted the message
  and A never sees the ``250`` — the case a receiver's dedupe exists for.
- ``final-reply-after``: that reply is forwarded, then the connection is cut (A saw the 250,
  the QUIT or the next transaction on a pooled connection is lost).

The "big chunk" is recognised by size: client bytes since the last server chunk at least
``big_chunk`` (the harness's messages are larger, TLS handshake flights smaller).
``drops`` counts the faults that actually fired, by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass

KINDS = ("client-before", "client-after", "server-before", "client-bytes", "final-reply-lost",
         "final-reply-after")  # fmt: skip


@dataclass(frozen=True)
class Fault:
    """One connection's fault: its kind and where (chunk number, byte count or n-th message)."""

    kind: str
    at: int


def plan(rng: random.Random, drop_probability: float) -> Fault | None:
    """The fault of one connection, or None (most connections pass untouched)."""
    if rng.random() >= drop_probability:
        return None
    kind = rng.choice(KINDS)
    if kind in ("client-before", "client-after", "server-before"):
        return Fault(kind, rng.randint(1, 10))  # a one-message connection has about ten each way
    if kind == "client-bytes":
        return Fault(kind, rng.randint(1, 16_000))
    return Fault(kind, rng.choice((1, 1, 1, 2)))  # mostly the first message of the connection


class _Conn:
    """Counters of one proxied connection, shared by its two pumps."""

    def __init__(self, fault: Fault | None) -> None:
        self.fault = fault
        self.client_chunks = 0
        self.server_chunks = 0
        self.client_bytes = 0
        self.since_server = 0  # client bytes since the last server chunk
        self.messages = 0  # big client flushes answered so far
        self.cut = False


class FaultProxy:
    """Listens on ``port`` (loopback) and relays to ``target_port``, dropping per ``plan``."""

    def __init__(self, target_port: int, port: int, *, seed: int, drop_probability: float,
                 big_chunk: int = 6000) -> None:  # fmt: skip
        self.target_port = target_port
        self.port = port
        self.seed = seed
        self.drop_probability = drop_probability
        self.big_chunk = big_chunk
        self.connections = 0
        self.drops: Counter[str] = Counter()
        self.planned: Counter[str] = (
            Counter()
        )  # faults drawn (a drawn fault fires only if the exchange gets there)
        #: (fault drawn or "-", client chunks, server chunks, messages) of the connections that ended
        #: without a fault firing: shows whether the fault points are drawn where exchanges go.
        self.shapes: Counter[tuple[str, int, int, int]] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._open):  # cut what is still open; the handlers then end by themselves
            w.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        n = self.connections
        self.connections += 1
        conn = _Conn(plan(random.Random(f"{self.seed}:{n}"), self.drop_probability))
        if conn.fault is not None:
            self.planned[conn.fault.kind] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # B is down (killed): A sees a refused connection
            writer.transport.abort()
            self._tasks.discard(task)
            return
        ends = (writer, up_writer)
        self._open.update(ends)
        pumps = [asyncio.create_task(self._pump(conn, reader, up_writer, True, ends)),
                 asyncio.create_task(self._pump(conn, up_reader, writer, False, ends))]  # fmt: skip
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            if not conn.cut:
                kind = f"{conn.fault.kind}@{conn.fault.at}" if conn.fault else "-"
                self.shapes[(kind, conn.client_chunks, conn.server_chunks, conn.messages)] += 1
            for p in pumps:
                p.cancel()
            for w in ends:
                w.transport.abort()
                self._open.discard(w)
            self._tasks.discard(task)

    def _drop(self, conn: _Conn, ends: tuple[asyncio.StreamWriter, ...]) -> None:
        """Cut both sides at once, as a network failure would (RST, nothing flushed)."""
        if not conn.cut and conn.fault is not None:
            self.drops[conn.fault.kind] += 1
        conn.cut = True
        for w in ends:
            w.transport.abort()

    async def _pump(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    from_client: bool, ends: tuple[asyncio.StreamWriter, ...]) -> None:  # fmt: skip
        f = conn.fault
        try:
            while not conn.cut and (chunk := await reader.read(65536)):
                if conn.cut:
                    return
                after = False
                if from_client:
                    conn.client_chunks += 1
                    if f and f.kind == "client-before" and conn.client_chunks == f.at:
                        self._drop(conn, ends)
                        return
                    if f and f.kind == "client-bytes" and conn.client_bytes + len(chunk) >= f.at:
                        writer.write(chunk[: max(0, f.at - conn.client_bytes)])
                        with contextlib.suppress(ConnectionError):
                            await writer.drain()
                        self._drop(conn, ends)
                        return
                    conn.client_bytes += len(chunk)
                    conn.since_server += len(chunk)
                    after = bool(f and f.kind == "client-after" and conn.client_chunks == f.at)
                else:
                    conn.server_chunks += 1
                    if f and f.kind == "server-before" and conn.server_chunks == f.at:
                        self._drop(conn, ends)
                        return
                    if conn.since_server >= self.big_chunk:  # the reply to the final "."
                        conn.messages += 1
                        if f and f.kind == "final-reply-lost" and conn.messages == f.at:
                            self._drop(conn, ends)
                            return
                        after = bool(f and f.kind == "final-reply-after" and conn.messages == f.at)
                    conn.since_server = 0
                writer.write(chunk)
                await writer.drain()
                if after:
                    self._drop(conn, ends)
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            if not conn.cut:
                # One side closed: close the other, as a plain relay would.
                with contextlib.suppress(Exception):
                    writer.close()
