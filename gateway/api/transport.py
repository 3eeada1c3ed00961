"""The API's connections: TLS listener, deadlines for slow clients and caps on open connections.

A client that is slow on purpose (slowloris) holds a socket, a TLS session and buffers for as long
as the server waits for it; nothing else bounds that. So every phase of a connection has a
deadline (``[api]`` settings):

- the TLS handshake: ``handshake_seconds`` (asyncio's ``ssl_handshake_timeout``; the loop aborts
  the socket);
- no request at all, after connecting or after the previous answer: ``idle_seconds`` (aiohttp's
  ``keepalive_timeout``, which also runs from the accept);
- a request head, from its first byte to its last: ``head_seconds`` (``GuardedHandler``'s own
  timer; the transport is closed by aiohttp's ``force_close``);
- a request body: ``body_min_rate`` octets/s on average after ``body_grace_seconds``
  (``read_body``, answered 408);
- an answer the client does not read: ``WRITE_SECONDS`` with the transport's buffer full
  (``pause_writing`` to ``resume_writing``), then the transport is aborted;

and connections are counted once their handshake is over: at most ``max_connections_per_ip``
from one address and ``max_connections`` in all. One over either is answered ``503`` (problem
details, ``Connection: close``) to its first request; past ``OVER_CAP_ANSWERS`` such answers
pending, it is closed at once. An event stream is a request in progress: no deadline cuts it.

A connection without a client certificate can only ever be answered 403 (or read the OpenAPI
document), so it does not take one of those slots: it is counted apart, at most
``max_anonymous_connections`` in all (and ``max_connections_per_ip`` from one address; over
it: closed at once, no answer), may wait ``head_seconds`` (not ``idle_seconds``) for its request,
and is closed after its first answer (``Connection: close``).

A client that hangs up while its request is read, or sends a body its ``Content-Encoding`` does
not decode, is no error of ours: one INFO line (``log_exception``), no traceback.

aiohttp's own error answers (a request line or header over ``MAX_LINE``, a bad byte) are RFC
9457 problems too, without the client's text (``GuardedHandler.handle_error``); no answer names
aiohttp or its version (``Server: mssgw``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestPayloadError

from gateway.api.problems import PROBLEM_TYPE, Problem
from gateway.core import replies as R

log = logging.getLogger("mssgw.api")

SERVER_NAME = "mssgw"
#: aiohttp's bounds of a request head (its defaults, named here): a line, a field, the number of fields.
MAX_LINE = 8190
MAX_FIELD = 8190
MAX_HEADERS = 128
#: How long aiohttp keeps reading (and discarding) a body it did not need after answering.
LINGER_SECONDS = 5.0
#: Connections over a cap answered 503 at once at most; beyond, they are closed without an answer.
OVER_CAP_ANSWERS = 32
OVER_CAP_RETRY_AFTER = 5
#: An answer (or an event stream) the client has not read for this long, the buffers full, is cut.
WRITE_SECONDS = 60.0
#: A closing connection whose client does not read what is left (or the TLS close_notify) is aborted then.
TLS_SHUTDOWN_SECONDS = 10.0

S421_4_7_0_CONNECTIONS = R.Reply(421, "4.7.0", "Too many connections, try again later")
S451_4_4_2_SLOW_BODY = R.Reply(451, "4.4.2", "The request body came too slowly")
S500_5_5_2_MALFORMED = R.Reply(500, "5.5.2", "The HTTP request could not be parsed")
S501_5_6_1_BAD_ENCODING = R.Reply(501, "5.6.1", "The request body does not decode as its Content-Encoding says")
S554_5_6_1_CODING = R.Reply(554, "5.6.1", "The request body's Content-Encoding is not supported")
#: Content codings of a request body we expand (``_Expander``, RFC 9110 8.4.1). br and zstd are not
#: among them: aiohttp's parser refuses them on the head, having no module to decode them.
BODY_CODINGS = ("gzip", "deflate")
#: How aiohttp's parser begins the error of a coding it has no module for (br, zstd), raised on the head.
_NO_DECODER = "Can not decode content-encoding"
#: What a client that went away (or sent an undecodable body) raises inside aiohttp: not our fault.
CLIENT_FAULTS = (ConnectionError, RequestPayloadError, PayloadEncodingError)


def bad_encoding_problem() -> Problem:
    """400 for a body its ``Content-Encoding`` (gzip or deflate) does not decode; the connection closes."""
    return Problem(400, S501_5_6_1_BAD_ENCODING, "content-encoding",
                   detail="The request body does not decode as its Content-Encoding says (gzip or deflate)")


class ClientGone(Exception):
    """The client closed its connection while its request was being read: nobody to answer."""


class ConnectionGuard:
    """Counts of open connections per peer address and in all; decides each new one."""

    def __init__(self, total: int, per_ip: int, count: Callable[[str], None] | None = None) -> None:
        self.total = max(1, total)
        self.per_ip = max(1, per_ip)
        self.by_ip: Counter[str] = Counter()
        self.open = 0
        self.answering = 0
        self._count = count or (lambda reason: None)

    def admit(self, ip: str) -> str:
        """``ok`` (counted), ``answer`` (over a cap: answer 503 then close) or ``close`` (at once)."""
        if self.open < self.total and self.by_ip[ip] < self.per_ip:
            self.by_ip[ip] += 1
            self.open += 1
            return "ok"
        self._count("per-ip" if self.by_ip[ip] >= self.per_ip else "total")
        if self.answering < OVER_CAP_ANSWERS:
            self.answering += 1
            return "answer"
        return "close"

    def release(self, ip: str, admitted: str) -> None:
        if admitted == "ok":
            self.open -= 1
            self.by_ip[ip] -= 1
            if self.by_ip[ip] <= 0:
                del self.by_ip[ip]
        elif admitted == "answer":
            self.answering -= 1


class Deadlines:
    """The ``[api]`` deadlines, each at least a few milliseconds (0 would mean 'at once')."""

    def __init__(self, settings: Any) -> None:
        self.handshake = max(0.01, float(settings.handshake_seconds))
        self.head = max(0.01, float(settings.head_seconds))
        self.idle = max(0.01, float(settings.idle_seconds))
        self.body_rate = max(1, int(settings.body_min_rate))
        self.body_grace = max(0.0, float(settings.body_grace_seconds))


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler with the head deadline, the caps and problem-shaped errors."""

    __slots__ = ("_admitted", "_anonymous", "_anonymous_guard", "_busy", "_closed_count", "_deadlines", "_guard",
                 "_head_timer", "_ip", "_write_timer")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, deadlines: Deadlines,
                 closed: Callable[[str], None], anonymous: ConnectionGuard | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._anonymous_guard = anonymous or guard
        self._anonymous = False
        self._deadlines = deadlines
        self._ip = ""
        self._admitted = ""
        self._head_timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._closed_count = closed
        self._write_timer: asyncio.TimerHandle | None = None

    @property
    def over_cap(self) -> bool:
        """Whether this connection is over a cap (its first request is answered 503, then it closes)."""
        return self._admitted == "answer"

    @property
    def anonymous(self) -> bool:
        """Whether the client sent no certificate (every answer on it closes the connection)."""
        return self._anonymous

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]) if peer else "-"
        ssl_object = transport.get_extra_info("ssl_object")
        self._anonymous = ssl_object is None or ssl_object.getpeercert(binary_form=True) is None
        if self._anonymous:
            # Only a 403 (or the OpenAPI document) to get: its own small cap, the head deadline to ask.
            self._admitted = self._anonymous_guard.admit(self._ip)
            if self._admitted == "answer":
                self._anonymous_guard.release(self._ip, self._admitted)
                self._admitted = "close"
            self._keepalive_timeout = min(self._keepalive_timeout, self._deadlines.head)
        else:
            self._admitted = self._guard.admit(self._ip)
        if self._admitted == "close":
            cast(asyncio.Transport, transport).abort()  # never handed to aiohttp: nothing of it to clean up but the socket
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        self._stop_write_timer()
        if self._admitted == "close":
            return
        (self._anonymous_guard if self._anonymous else self._guard).release(self._ip, self._admitted)
        self._admitted = "gone"
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._head_timer is None and not self._busy:
            self._head_timer = self._loop.call_later(self._deadlines.head, self._head_late)
            # A request has begun: its head deadline governs now (aiohttp re-arms the idle one after the answer).
            if self._keepalive_handle is not None:
                self._keepalive_handle.cancel()
                self._keepalive_handle = None
        super().data_received(data)

    def request_started(self) -> None:
        """The head is complete and a handler runs (called by the middleware): no head deadline
        until the answer is written (an event stream is one long request)."""
        self._busy = True
        self._stop_head_timer()
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(self._request_done)

    def _request_done(self, _task: asyncio.Task[Any]) -> None:
        self._busy = False

    def pause_writing(self) -> None:
        """The transport's buffer is full (the client reads nothing): it has ``WRITE_SECONDS`` to read."""
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(WRITE_SECONDS, self._write_late)

    def resume_writing(self) -> None:
        self._stop_write_timer()
        super().resume_writing()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_late(self) -> None:
        self._write_timer = None
        if self.transport is not None:
            log.info("listener=api closed a connection: the client read nothing for %.0f s", WRITE_SECONDS)
            self._closed_count("write")
            self.transport.abort()  # close() would wait to flush what the client does not read

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._busy and self.transport is not None:
            log.info("listener=api closed a connection: request head not complete within %.1f s",
                     self._deadlines.head)  # fmt: skip
            self._closed_count("head")
            self.force_close()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's report of an exception: a client's hang-up or undecodable body is one INFO line.

        Such a fault is the client's (flood-able, and says nothing about the gateway): no ERROR,
        no traceback. Anything else goes to aiohttp's logger (and the server's filter)."""
        exc = kw.get("exc_info")
        if isinstance(exc, CLIENT_FAULTS):
            log.info("listener=api connection ended by the client (%s)", _fault_name(exc))
            return
        super().log_exception(*args, **kw)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:  # fmt: skip
        """aiohttp's answer to a request it could not parse or serve, as problem details.

        The logging stays aiohttp's (rewritten without client text by the server's filter); the
        answer names the kind of fault, never the client's bytes. aiohttp builds the request of a
        head it could not parse as HTTP/1.0; the answer is HTTP/1.1 (the version we speak)."""
        super().handle_error(request, status, exc, None)  # logs; its text/plain answer is dropped
        request._version = HttpVersion11
        if status >= 500:
            problem = Problem(503, R.S451_4_3_0_LOCAL_ERROR, "internal-error")
        elif isinstance(exc, ContentEncodingError) and str(exc.message).startswith(_NO_DECODER):
            problem = unsupported_coding_problem()  # br or zstd: aiohttp has no module to decode them
        else:
            detail = _malformed_detail(exc)
            problem = Problem(status, S500_5_5_2_MALFORMED, "http-malformed", detail=detail)
        response = problem_response(problem)
        response.force_close()
        return response


def _fault_name(exc: BaseException) -> str:
    if isinstance(exc, ConnectionError):
        return "hang-up"
    if isinstance(exc, RequestPayloadError | ContentEncodingError):
        return "body not decodable or cut short"
    return "malformed request"


_REASONS = (
    ("host", "The Host header field is missing or given twice"),  # before "header": it is one too
    ("too many headers", f"More than {MAX_HEADERS} header fields"),
    ("transfer-encoding", "The Transfer-Encoding header field is not allowed as sent (chunked, last and once)"),
    ("chunk", "The chunked request body is malformed (chunk size line or chunk end)"),
    ("content-length", "The Content-Length header field is malformed or contradicts the framing"),
    ("header", "A header field name or value holds a byte HTTP does not allow"),
    ("method", "The request method is not a valid HTTP token"),
    ("url", "The request target is malformed"),
    ("version", "The HTTP version is not HTTP/1.1 or HTTP/1.0"),
)


#: aiohttp's parse errors, most specific first, and what each says in words.
_DETAILS: tuple[tuple[type[BaseException], str], ...] = (
    (LineTooLong, f"A request line or header field is longer than {MAX_LINE} octets"),
    (ContentEncodingError, "The request body does not decode as its Content-Encoding says"),
    (TransferEncodingError, "The chunked request body is malformed (chunk size line or chunk end)"),
    (ContentLengthError, "The request body is shorter than its Content-Length"),
    (BadHttpMethod, "The request method is not a valid HTTP token"),
    (BadStatusLine, "The request line is malformed (method, target and HTTP/1.1)"),
    (InvalidURLError, "The request target is malformed"),
    (InvalidHeader, "A header field name or value holds a byte HTTP does not allow"),
)


def _malformed_detail(exc: BaseException | None) -> str:
    """What was wrong with a request aiohttp could not parse, in words (no class names, no client text)."""
    if isinstance(exc, HttpProcessingError) and "host" in str(exc.message).split("\n", 1)[0].lower():
        return _REASONS[0][1]
    for kind, detail in _DETAILS:
        if isinstance(exc, kind):
            return detail
    if isinstance(exc, HttpProcessingError):
        # aiohttp's (llhttp's) own reason, first line only (the rest quotes the client): matched, never shown.
        reason = str(exc.message if isinstance(exc.message, str) else exc).split("\n", 1)[0].lower()
        for words, detail in _REASONS:
            if words in reason:
                return detail
    return "The HTTP request is malformed (framing, a header field or a byte HTTP does not allow)"


def problem_response(problem: Problem) -> web.Response:
    """``problem`` as an ``application/problem+json`` response (with ``Retry-After`` when it has one)."""
    headers: dict[str, str] = {**problem.headers, hdrs.SERVER: SERVER_NAME}
    if problem.retry_after is not None:
        headers["Retry-After"] = str(problem.retry_after)
    return web.Response(status=problem.status, body=problem.encode(), content_type=PROBLEM_TYPE, charset="utf-8",
                        headers=headers)  # fmt: skip


def over_cap_problem() -> Problem:
    return Problem(503, S421_4_7_0_CONNECTIONS, "too-many-connections", retry_after=OVER_CAP_RETRY_AFTER,
                   detail="Too many open connections from this address or in all: close idle ones, retry later")


def slow_body_problem(deadlines: Deadlines) -> Problem:
    return Problem(408, S451_4_4_2_SLOW_BODY, "request-body-slow", title="Request timeout",
                   retry_after=OVER_CAP_RETRY_AFTER,
                   detail=f"The request body came slower than {deadlines.body_rate} octets/s "
                          f"(after {deadlines.body_grace:g} s): send it at once")  # fmt: skip


def unsupported_coding(request: web.Request) -> Problem | None:
    """415 for a body in a content coding we do not expand (RFC 9110 15.5.16), else None.

    One coding named alone, gzip or deflate, is expanded (``identity`` is none); anything else
    (``compress``, ``gzip, gzip``, the field twice) would reach the JSON parser still encoded.
    ``br`` and ``zstd`` are refused by aiohttp's parser on the head: ``handle_error`` answers them
    the same.
    """
    fields = request.headers.getall(hdrs.CONTENT_ENCODING, [])
    if not fields or (len(fields) == 1 and fields[0].lower() in (*BODY_CODINGS, "identity")):
        return None
    return unsupported_coding_problem()


def unsupported_coding_problem() -> Problem:
    return Problem(415, S554_5_6_1_CODING, "content-encoding-unsupported", title="Unsupported content coding",
                   headers={hdrs.ACCEPT_ENCODING: ", ".join(BODY_CODINGS)},
                   detail=f"Send the request body as is, or with one Content-Encoding: {' or '.join(BODY_CODINGS)}")


class _Expander:
    """A gzip or deflate body expanded by us, never past the limit (aiohttp's own decoder is off).

    Why: aiohttp expands whatever compressed bytes have arrived, all of them, on the event loop:
    a 1 MB gzip of 1 GiB of spaces cost seconds of every listener's time even though the answer
    was a 413 at the first 200 kB.  Here each step yields at most what the limit still allows
    (``zlib``'s ``max_length``), and the stream must end where the coding says it ends: a body cut
    short (no gzip trailer) or followed by other bytes does not decode; gzip members may follow
    each other (RFC 1952 2.2).
    """

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._zlib: zlib._Decompress | None = None if coding == "deflate" else zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._head = b""  # deflate: zlib-wrapped (RFC 1950) or raw (RFC 1951), known from two octets

    def feed(self, data: bytes, room: int) -> bytes | None:
        """What ``data`` expands to, or None when that is more than ``room`` octets."""
        if self._zlib is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        out = b""
        try:
            while True:
                out += self._zlib.decompress(data, room + 1 - len(out))
                if self._zlib.unconsumed_tail or len(out) > room:
                    return None
                if not (self.coding == "gzip" and self._zlib.eof and self._zlib.unused_data):
                    return out
                # RFC 1952 2.2: a gzip file is one or more members, one after the other.
                data, self._zlib = self._zlib.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
        except zlib.error:
            raise bad_encoding_problem() from None

    def finish(self) -> None:
        """The body is over: the compressed stream must be complete, with nothing after it."""
        if self._zlib is None or not self._zlib.eof or self._zlib.unused_data:
            raise bad_encoding_problem()


async def read_body(request: web.Request, limit: int, deadlines: Deadlines,
                    too_big: Callable[[], Problem]) -> bytearray:  # fmt: skip
    """The whole request body (expanded, if gzip or deflate), read as long as it keeps ``body_min_rate``.

    By ``grace + n / rate`` seconds after the first read, more than ``n`` octets must have come,
    whether the length was declared or the body is chunked; a body over ``limit``, sent or
    expanded, is ``too_big`` (and the rest is neither read nor expanded: the connection closes);
    a content coding we do not decode is refused before any of it is read (``unsupported_coding``).
    """
    if (unsupported := unsupported_coding(request)) is not None:
        raise unsupported
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower()
    expander = _Expander(coding) if coding in BODY_CODINGS else None
    loop = asyncio.get_running_loop()
    start = loop.time()
    body = bytearray()
    received = 0
    while True:
        try:
            async with asyncio.timeout_at(start + deadlines.body_grace + received / deadlines.body_rate):
                chunk = await request.content.readany()
        except TimeoutError:
            raise slow_body_problem(deadlines) from None
        except (ContentEncodingError, RequestPayloadError) as exc:
            if request.transport is None or request.transport.is_closing():
                raise ClientGone from None
            cause = exc if isinstance(exc, ContentEncodingError) else exc.__cause__
            if isinstance(cause, ContentEncodingError):
                raise bad_encoding_problem() from exc
            raise Problem(400, S500_5_5_2_MALFORMED, "http-malformed", detail=_malformed_detail(cause)) from exc
        except ConnectionError:
            raise ClientGone from None
        if not chunk:
            if expander is not None:
                expander.finish()
            return body
        received += len(chunk)
        expanded = chunk if expander is None else expander.feed(chunk, limit - len(body))
        if expanded is not None:
            body += expanded
        if expanded is None or len(body) > limit or received > limit:
            refused = too_big()
            refused.close = True  # the rest is not read: not even expanded, for a gzip bomb
            raise refused


class Listener:
    """The TLS listening socket of the API, creating a ``GuardedHandler`` per connection."""

    def __init__(self, runner: web.AppRunner, handler_args: dict[str, Any], guard: ConnectionGuard,
                 deadlines: Deadlines, closed: Callable[[str], None],
                 anonymous: ConnectionGuard | None = None) -> None:  # fmt: skip
        self.runner = runner
        self.handler_args = handler_args
        self.guard = guard
        self.anonymous = anonymous
        self.deadlines = deadlines
        self.closed = closed
        self.server: asyncio.AbstractServer | None = None

    def _make(self) -> GuardedHandler:
        manager = self.runner.server
        assert manager is not None
        return GuardedHandler(manager, loop=asyncio.get_running_loop(), guard=self.guard, deadlines=self.deadlines,
                              closed=self.closed, anonymous=self.anonymous, **self.handler_args)  # fmt: skip

    async def start(self, host: str, port: int, tls: ssl.SSLContext) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._make, host, port, ssl=tls, reuse_address=True,
                                               ssl_handshake_timeout=self.deadlines.handshake,
                                               ssl_shutdown_timeout=TLS_SHUTDOWN_SECONDS)  # fmt: skip
        bound = self.server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        """Stop accepting; open connections are ended by the runner's cleanup."""
        if self.server is not None:
            self.server.close()
            self.server = None


def handler_args(deadlines: Deadlines) -> dict[str, Any]:
    """What every connection handler is built with (the runner's server gets the same)."""
    return {"keepalive_timeout": deadlines.idle, "max_line_size": MAX_LINE, "max_field_size": MAX_FIELD,
            "max_headers": MAX_HEADERS, "lingering_time": LINGER_SECONDS, "access_log": None,
            "auto_decompress": False}  # read_body expands gzip and deflate itself, bounded (``_Expander``)


__all__ = ["ClientGone", "ConnectionGuard", "Deadlines", "GuardedHandler", "Listener", "handler_args", "problem_response",
           "read_body"]
