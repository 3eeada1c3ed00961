"""The HTTPS listener of the API (``listen.api``): aiohttp on the gateway's own event loop, mutual TLS.

Why aiohttp: a maintained asyncio HTTP/1.1 server that runs on the loop ``mssgw serve``
already drives (uvloop included), takes the listeners' ``ssl.SSLContext`` as it is (so the
live trust reload and the client-certificate verification are the SMTP listeners' own), exposes
the TLS object of each request, bounds request bodies (``client_max_size``) and streams
responses (Server-Sent Events) without a second server process or thread.

Every request but ``/v1/openapi.json`` first takes a token from the bucket of its client
certificate (of its address when it has none: ``api.rate_per_minute``, ``api.burst``; over it:
429 with ``Retry-After``), then logs in by that certificate (``ApiEdge.login``). Bodies over the message size limit (base64
included) are refused before they are read (413, 552 5.3.4). A request that asks ``Expect:
100-continue`` is checked the same way (connection cap, rate, certificate, size) before the
``100 Continue`` invites its body; a refusal is the answer instead. Every refusal, including
aiohttp's own 404/405/413 and an unexpected error (503, 451 4.3.0, never a traceback), is an
RFC 9457 problem (``gateway.api.problems``). Access logs carry method, route, status and the
mailbox, never a body or a query string.

Endpoints: see ``gateway.api.openapi``. Events (``GET /v1/events``, text/event-stream, RFC
8895-era HTML Living Standard format): ``message.state`` when a recipient of one of the
mailbox's messages changes state (from the queue, so any node's workers count),
``mailbox.message`` for new mail in its INBOX, ``message.receipt`` when that mail is an MDN or
DSN about one of its messages; a comment every ``HEARTBEAT`` seconds keeps proxies from closing
an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import math
import ssl
import time
import traceback
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from sqlalchemy import func, select

from gateway.api.edge import ApiEdge, Caller, select_recent
from gateway.api.mailbox import Mailbox, describe, read_report
from gateway.api.openapi import document
from gateway.api.problems import (
    S450_4_7_1_RATE,
    S500_5_5_1_METHOD,
    S500_5_5_1_NOT_FOUND,
    S501_5_5_2_BAD_JSON,
    S501_5_5_4_BAD_FIELD,
    S550_5_1_1_NO_SUCH,
    S550_5_7_1_NOT_YOURS,
    Problem,
)
from gateway.api.schemas import ADDRESS, load_json
from gateway.api.transport import (
    SERVER_NAME,
    ClientGone,
    ConnectionGuard,
    Deadlines,
    GuardedHandler,
    Listener,
    handler_args,
    over_cap_problem,
    problem_response,
    read_body,
    unsupported_coding,
)
from gateway.auth import certificate_fingerprint
from gateway.core import replies as R
from gateway.core.budget import OctetBudget
from gateway.core.tls import peer_certificate, tls_summary
from gateway.delivery.maildir import DeliveryError, mailbox_events
from gateway.policy.limits import MAX_BUFFERED_DATA_BYTES
from gateway.process.verdict import as_utc

log = logging.getLogger("mssgw.api")

HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle event stream
KEEPALIVE = b": keep-alive\n\n"
#: New mail is looked for from this long before the newest file already told (a delivery's
#: rename can land after a later file's), so a late rename is still told.
MAILBOX_SLACK = timedelta(seconds=5)
#: JSON carries attachments in base64 (4/3) plus field names: the request may exceed the message
#: size limit by this factor and margin before the composed message is measured against it.
BASE64_FACTOR = 4 / 3
BODY_MARGIN = 64 * 1024
MAX_BUCKETS = 10_000
#: Open ``/v1/events`` streams per certificate identity and in all: each polls the queue and the
#: maildir, so unbounded streams (280 from one certificate in a test) starve every other client.
MAX_STREAMS_PER_IDENTITY = 4
MAX_STREAMS = 200
STREAMS_RETRY_AFTER = 30
#: A body over this is parsed off the event loop (a 30 MiB JSON took seconds of the loop).
PARSE_IN_THREAD = 64 * 1024
BUDGET_RETRY_AFTER = 5
#: A request body over this is "large": its JSON is parsed, its base64 decoded, its message built
#: and inspected by one request at a time (``LARGE_AT_ONCE``). Each step copies the message a few
#: times (JSON text, decoded bytes, MIME, the parsed copy of the content checks): three 30 MiB
#: attachments at once took the process from 160 MB to 1.3-1.7 GB and held the loop seconds.
LARGE_BODY = 1024 * 1024
LARGE_AT_ONCE = 1
#: How long a large request waits for its turn before it is answered 503 (retry shortly).
LARGE_WAIT_SECONDS = 120.0


class BodyBudget(OctetBudget):
    """Octets of request bodies this listener holds at once (read, parsed, built into a message).

    Each ``POST /v1/messages`` takes its declared ``Content-Length`` (the whole size limit when
    chunked) before reading and gives it back when answered; a request that would go over waits
    for nobody: it gets 503 with ``Retry-After``, as SMTP ``DATA`` gets 452 4.3.1 over its own budget.
    Without it, ten parallel 65 MB bodies took the process from 155 MB to 2.9 GB.
    """

#: A write to a client that went away: the stream ends, nothing to report.
_GONE = (ConnectionResetError, ConnectionError)
PUBLIC = frozenset({"/v1/openapi.json"})
#: Refusals after which the connection is closed (``Connection: close``): it is over a cap, or too slow.
CLOSE_AFTER = frozenset({"too-many-connections", "request-body-slow", "content-encoding", "http-malformed",
                         "client-certificate", "content-encoding-unsupported"})
#: The logged-in caller of the request being handled (set by the middleware, in the handler's task).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("mssgw_api_caller")
#: The caller as the ``Expect: 100-continue`` check logged it in (so the middleware does not again).
CALLER_KEY: web.RequestKey[Caller] = web.RequestKey("mssgw_caller", Caller)


def _caller() -> Caller:
    return CALLER.get()


class RateLimiter:
    """A token bucket per client certificate: ``burst`` at once, then ``per_minute`` (LRU-bounded)."""

    def __init__(self, per_minute: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1.0, burst)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0 when the request may go; else the seconds until a token is there."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else 60.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return wait


class _NoClientText(logging.Filter):
    """Rewrites aiohttp's own records so no client-supplied text reaches the log.

    aiohttp logs a request it cannot parse (a line or header over 8190 bytes, a bad byte) as
    ``Error handling request`` with the exception, whose message quotes the client's bytes (a
    header may hold an INS). Such a record becomes one WARNING line naming the exception type;
    any other exception keeps its traceback frames (code only) but not its message.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.access":
            record.msg, record.args = "listener=api access (request text withheld)", ()
            return True
        if exc is None:
            if record.args:  # the format is aiohttp's, the arguments may be the client's
                record.msg, record.args = f"listener=api aiohttp: {record.msg.split('%')[0].strip()}", ()
            return True
        kind = type(exc).__name__
        if isinstance(exc, HttpProcessingError):
            record.msg = "listener=api refused a malformed HTTP request: %s (status %s, request text withheld)"
            record.args = (kind, getattr(exc, "code", 400))
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        else:
            frames = "".join(traceback.format_tb(exc.__traceback__))
            record.msg = "listener=api aiohttp error %s (message withheld)\n%s"
            record.args = (kind, frames)
        record.exc_info, record.exc_text = None, None
        return True


_FILTER = _NoClientText()


def quiet_aiohttp_loggers() -> None:
    """Install ``_NoClientText`` on aiohttp's server and access loggers (once)."""
    for name in ("aiohttp.server", "aiohttp.access"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _problem_response(problem: Problem) -> web.Response:
    response = problem_response(problem)
    if problem.close or problem.rule in CLOSE_AFTER or (problem.status == 403 and problem.rule.startswith("certificate-")):
        response.force_close()  # a slow body or a connection over a cap: this connection is over
    return response


async def _server_name(request: web.Request, response: web.StreamResponse) -> None:
    """``Server: mssgw`` on every answer, never aiohttp's name and version (RFC 9110 10.2.4)."""
    response.headers[hdrs.SERVER] = SERVER_NAME


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(data, ensure_ascii=False).encode("utf-8"),
                        content_type="application/json", charset="utf-8", headers=headers)  # fmt: skip


class ApiServer:
    """The aiohttp application and its site; ``start`` binds, ``close`` drains and stops."""

    def __init__(self, edge: ApiEdge, tls: ssl.SSLContext) -> None:
        self.edge = edge
        self.settings = edge.settings
        self.tls = tls
        self.mail_root = self.settings.mail_dir
        self.limit = int(self.edge.max_size * BASE64_FACTOR) + BODY_MARGIN
        self.rate = RateLimiter(self.settings.api.rate_per_minute,
                                self.settings.api.burst)  # fmt: skip
        self.poll = max(0.05, self.settings.api.events_poll_seconds)
        self.openapi = json.dumps(document(self.edge.max_size)).encode("utf-8")
        self.app = web.Application(client_max_size=self.limit, middlewares=[self._guard])
        self.app.on_response_prepare.append(_server_name)
        self.deadlines = Deadlines(self.settings.api)
        self.connections = ConnectionGuard(self.settings.api.max_connections,
                                           self.settings.api.max_connections_per_ip,
                                           lambda reason: self.edge.metrics.inc(
                                               "mssgw_api_connections_refused_total", reason=reason))  # fmt: skip
        self.anonymous = ConnectionGuard(self.settings.api.max_anonymous_connections,
                                         min(self.settings.api.max_connections_per_ip,
                                             self.settings.api.max_anonymous_connections),
                                         lambda reason: self.edge.metrics.inc(
                                             "mssgw_api_connections_refused_total",
                                             reason=f"no-certificate-{reason}"))  # fmt: skip
        self._large = asyncio.Semaphore(LARGE_AT_ONCE)
        self._listener: Listener | None = None
        self.app.add_routes([
            web.get("/v1/openapi.json", self.get_openapi),
            web.post("/v1/messages", self.post_message, expect_handler=self._expect),
            web.get("/v1/messages/{id}", self.get_message),
            web.get("/v1/mailboxes/{address}/messages", self.list_mailbox),
            web.get("/v1/mailboxes/{address}/messages/{id}", self.get_mailbox_message),
            web.delete("/v1/mailboxes/{address}/messages/{id}", self.delete_mailbox_message),
            web.get("/v1/events", self.events),
        ])  # fmt: skip
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self.body_budget = BodyBudget(max(MAX_BUFFERED_DATA_BYTES, self.limit))
        self._open_streams: Counter[str] = Counter()  # open /v1/events streams per identity
        quiet_aiohttp_loggers()
        self._closing = asyncio.Event()
        self.address: tuple[str, int] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind ``host:port`` (``OSError`` when taken); returns the bound address."""
        args = handler_args(self.deadlines)
        self._runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=5.0, **args)
        await self._runner.setup()
        self._listener = Listener(self._runner, args, self.connections, self.deadlines,
                                  lambda reason: self.edge.metrics.inc("mssgw_api_slow_clients_total",
                                                                       phase=reason),
                                  self.anonymous)  # fmt: skip
        try:
            self.address = await self._listener.start(host, port, self.tls)
        except OSError:
            self._listener = None
            await self._runner.cleanup()
            self._runner = None
            raise
        return self.address

    async def close(self) -> None:
        """Stop accepting, end event streams, let submissions in flight commit, then stop."""
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- middleware: problems, login, rate ----------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:  # fmt: skip
        started = time.monotonic()
        status = 500
        caller: Caller | None = None
        protocol = request.protocol
        try:
            if isinstance(protocol, GuardedHandler):
                protocol.request_started()
                if protocol.over_cap:
                    raise over_cap_problem()
            if request.path not in PUBLIC:
                caller = request.get(CALLER_KEY) or await self._admit(request)
                CALLER.set(caller)
            response = await handler(request)
            status = response.status
            if isinstance(protocol, GuardedHandler) and protocol.anonymous:
                response.force_close()  # no certificate: one answer, then the connection is over
            return response
        except Problem as problem:
            status = problem.status
            response = _problem_response(problem)
            if isinstance(protocol, GuardedHandler) and protocol.anonymous:
                response.force_close()
            return response
        except ClientGone:
            status = 499  # nobody to answer: the client closed while its request was read
            log.info("listener=api route=%s the client closed its connection during the request", _route(request))
            gone = web.Response(status=400)
            gone.force_close()
            return gone
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return _problem_response(self._too_big())
        except web.HTTPNotFound:
            status = 404
            return _problem_response(Problem(404, S500_5_5_1_NOT_FOUND, "no-such-endpoint",
                                             detail=f"No endpoint {request.method} {request.path[:100]}"))
        except web.HTTPMethodNotAllowed as exc:
            status = 405
            allowed = Problem(405, S500_5_5_1_METHOD, "method-not-allowed",
                              detail=f"{request.method} is not allowed here; allowed: {', '.join(sorted(exc.allowed_methods))}")
            response = _problem_response(allowed)
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499
            raise
        except web.HTTPException as exc:  # any other of aiohttp's own answers, as a problem
            status = exc.status
            return _problem_response(Problem(exc.status, R.S500_5_5_2_SYNTAX if exc.status < 500
                                             else R.S451_4_3_0_LOCAL_ERROR, "http-error", detail=exc.reason))
        except Exception as exc:
            status = 503
            log.error("listener=api outcome=error route=%s error=%s", _route(request), type(exc).__name__,
                      exc_info=exc)  # fmt: skip
            self.edge.metrics.inc("mssgw_errors_total", listener="api")
            return _problem_response(Problem(503, R.S451_4_3_0_LOCAL_ERROR, "internal-error"))
        finally:
            self.edge.metrics.inc("mssgw_api_requests_total", route=_route(request), status=str(status))
            log.info("listener=api method=%s route=%s status=%d identity=%s ms=%.1f", request.method,
                     _route(request), status, caller.identity if caller else "-",
                     (time.monotonic() - started) * 1000)  # fmt: skip

    async def _admit(self, request: web.Request) -> Caller:
        """The rate bucket, then the certificate login: the caller, or a ``Problem`` (429, 403, 503)."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = peer_certificate(ssl_object)
        # The bucket is taken before the login, so refused certificates are throttled too.
        wait = self.rate.take(certificate_fingerprint(der) if der is not None else f"ip:{request.remote}")
        if wait > 0:
            self.edge.metrics.inc("mssgw_api_rate_limited_total")
            raise Problem(429, S450_4_7_1_RATE, "rate-limit", retry_after=max(1, math.ceil(wait)))
        return await self.edge.login(der, request.remote, tls_summary(ssl_object))

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: the checks of the request head first, then the invitation.

        aiohttp calls this before the middleware; a refusal (over a cap, over the rate, no valid
        certificate, too large, a content coding we do not decode) is the answer, with ``Connection: close`` since the body
        was never invited. The login is kept for the middleware (the bucket is taken once)."""
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            problem = Problem(417, S501_5_5_4_BAD_FIELD, "expectation", title="Expectation failed",
                              detail="Expect: only 100-continue is understood")
        else:
            problem = None
            protocol = request.protocol
            try:
                if isinstance(protocol, GuardedHandler) and protocol.over_cap:
                    raise over_cap_problem()
                request[CALLER_KEY] = await self._admit(request)
                if request.content_length is not None and request.content_length > self.limit:
                    raise self._too_big()
                if (unsupported := unsupported_coding(request)) is not None:
                    raise unsupported
            except Problem as refused:
                problem = refused
        if problem is None:
            if request.version == HttpVersion11:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0  # the 100 is not the answer (aiohttp's own handler does the same)
            return None
        self.edge.metrics.inc("mssgw_api_requests_total", route=_route(request), status=str(problem.status))
        log.info("listener=api method=%s route=%s status=%d (before 100 Continue)", request.method, _route(request),
                 problem.status)  # fmt: skip
        response = _problem_response(problem)
        response.force_close()  # the body was not invited: this connection is over
        return response

    def _too_big(self) -> Problem:
        return Problem(413, R.S552_5_3_4_TOO_BIG, "message-size",
                       detail=f"The request is larger than {self.limit} octets (limits.max_message_size "
                              f"{self.edge.max_size}, in base64 within JSON)")  # fmt: skip

    # --- handlers --------------------------------------------------------------------------------

    async def get_openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi, content_type="application/json", charset="utf-8")

    async def post_message(self, request: web.Request) -> web.Response:
        caller = _caller()
        if request.content_type != "application/json":
            raise Problem(415, S501_5_5_2_BAD_JSON, "media-type",
                          detail="Send the message as application/json (see /v1/openapi.json)")
        if request.content_length is not None and request.content_length > self.limit:
            refused = self._too_big()
            refused.close = True  # its body is not read and thrown away (nor expanded, if encoded)
            raise refused
        keys = request.headers.getall("Idempotency-Key", [])
        if len(keys) > 1:  # RFC 9110 5.3: a singleton field sent twice has no defined meaning
            raise Problem(400, S501_5_5_4_BAD_FIELD, "idempotency-key-malformed",
                          detail="Idempotency-Key: send the header once")
        key = keys[0] if keys else None
        if key is not None and (not key or len(key) > 255 or not key.isprintable() or not key.isascii()):
            raise Problem(400, S501_5_5_4_BAD_FIELD, "idempotency-key-malformed",
                          detail="Idempotency-Key: 1 to 255 printable ASCII characters")
        # An encoded body is held expanded, up to the limit: what it declares says nothing of that.
        encoded = request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity"
        need = request.content_length if request.content_length is not None and not encoded else self.limit
        if not self.body_budget.take(need):
            self.edge.metrics.inc("mssgw_api_body_budget_refused_total")
            raise Problem(503, R.S452_4_3_1_STORAGE, "memory-budget", retry_after=BUDGET_RETRY_AFTER,
                          detail="The gateway holds as many request bodies as it may at once; retry shortly")
        try:
            body = await read_body(request, self.limit, self.deadlines, self._too_big)  # slow: 408, big: 413
            if len(body) > LARGE_BODY:
                # One large request expanded at a time: memory and the loop's share of the GIL stay bounded.
                try:
                    async with asyncio.timeout(LARGE_WAIT_SECONDS):
                        await self._large.acquire()
                except TimeoutError:
                    self.edge.metrics.inc("mssgw_api_body_budget_refused_total")
                    raise Problem(503, R.S452_4_3_1_STORAGE, "memory-budget", retry_after=BUDGET_RETRY_AFTER,
                                  detail="Large requests are handled one at a time; retry shortly") from None
                try:
                    raw = await asyncio.to_thread(load_json, body)
                    del body
                    status, answer = await self.edge.submit(caller, raw, key)
                finally:
                    self._large.release()
            else:
                raw = await asyncio.to_thread(load_json, body) if len(body) > PARSE_IN_THREAD else load_json(body)
                del body
                status, answer = await self.edge.submit(caller, raw, key)
        finally:
            self.body_budget.give_back(need)
        headers = {"Location": f"/v1/messages/{answer['id']}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        return _json(answer, status, headers)

    async def get_message(self, request: web.Request) -> web.Response:
        caller = _caller()
        info = await self.edge.message(caller, request.match_info["id"])
        receipts = [{"kind": r["kind"], "direction": "sent", "queue_id": r["id"], "created_at": r["created_at"]}
                    for r in info.get("receipts", [])]  # fmt: skip
        sender = info.get("sender") or ""
        if sender and sender != "<>":
            mailbox = Mailbox(self.mail_root, sender)
            since = datetime.fromisoformat(info["created_at"])
            received = await asyncio.to_thread(mailbox.reports_about, info.get("message_id"), info["id"], since)
            receipts += [{**r, "direction": "received"} for r in received]
        return _json({
            "id": info["id"],
            "message_id": info.get("message_id"),
            "state": info["state"],
            "created_at": info["created_at"],
            "sender": sender,
            "size": info["size"],
            "recipients": info["recipient_states"],
            "receipts": receipts,
        })

    async def _mailbox(self, request: web.Request) -> Mailbox:
        caller = _caller()
        address = request.match_info["address"]
        if not ADDRESS.match(address):
            raise Problem(400, R.S501_5_1_3_BAD_ADDRESS, "address-syntax", detail="Not a mail address in the path")
        if not await self.edge.may_act_as(caller, address):
            self.edge.audit_writer.submit(_read_refused(caller, address))
            raise Problem(403, S550_5_7_1_NOT_YOURS, "mailbox-not-owned",
                          detail=f"{caller.identity} may not read {address}: not its mailbox nor delegated to it")
        folder = request.query.get("folder", "INBOX")
        try:
            return Mailbox(self.mail_root, address, folder)
        except (DeliveryError, ValueError) as exc:
            raise Problem(400, S501_5_5_4_BAD_FIELD, "folder-invalid", detail=f"folder: {exc}") from None

    async def list_mailbox(self, request: web.Request) -> web.Response:
        mailbox = await self._mailbox(request)
        since = _since(request)
        messages = await asyncio.to_thread(mailbox.list, since)
        return _json({"mailbox": mailbox.address, "messages": messages})

    async def get_mailbox_message(self, request: web.Request) -> web.StreamResponse:
        mailbox = await self._mailbox(request)
        path = await asyncio.to_thread(mailbox.find, request.match_info["id"])
        if path is None:
            raise Problem(404, S550_5_1_1_NO_SUCH, "message-unknown", detail="No such message in this mailbox")
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise Problem(404, S550_5_1_1_NO_SUCH, "message-unknown", detail="No such message in this mailbox") from None
        if request.query.get("raw") == "1":
            return await _write_in_chunks(request, data, "message/rfc822")
        described = await asyncio.to_thread(describe, data)
        return _json({"id": request.match_info["id"], **described})

    async def delete_mailbox_message(self, request: web.Request) -> web.Response:
        mailbox = await self._mailbox(request)
        if not await asyncio.to_thread(mailbox.remove, request.match_info["id"]):
            raise Problem(404, S550_5_1_1_NO_SUCH, "message-unknown", detail="No such message in this mailbox")
        return web.Response(status=204)

    # --- events ----------------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events from ``?since=`` (or the ``Last-Event-ID`` a reconnecting client sends).

        Each event's id is its time (a recipient's state change, a file's arrival), events are
        written in time order within a look, and a reconnect resumes after the last id received.
        """
        caller = _caller()
        since = _since(request) or _last_event(request) or datetime.now(UTC)
        identity = caller.identity.lower()
        if self._open_streams[identity] >= MAX_STREAMS_PER_IDENTITY:
            raise Problem(429, S450_4_7_1_RATE, "event-streams", retry_after=STREAMS_RETRY_AFTER,
                          detail=f"At most {MAX_STREAMS_PER_IDENTITY} open event streams per certificate: "
                                 "close one (one stream carries every event of the mailbox)")  # fmt: skip
        if self._open_streams.total() >= MAX_STREAMS:
            raise Problem(429, S450_4_7_1_RATE, "event-streams", retry_after=STREAMS_RETRY_AFTER,
                          detail=f"The gateway serves at most {MAX_STREAMS} event streams at once; retry later")
        self._open_streams[identity] += 1
        try:
            return await self._stream(request, caller, since)
        finally:
            self._open_streams[identity] -= 1
            if self._open_streams[identity] <= 0:
                del self._open_streams[identity]

    async def _stream(self, request: web.Request, caller: Caller, since: datetime) -> web.StreamResponse:
        mailbox = Mailbox(self.mail_root, caller.identity)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            await response.prepare(request)
            await response.write(b": mssgw events\n\n")
            cursor = floor = since
            seen: dict[str, datetime] = {}  # mailbox entries already told, within the slack window
            last_write = time.monotonic()
            with mailbox_events.listen(mailbox.inbox) as changed:
                while not self._closing.is_set() and not _gone(request):
                    out: list[tuple[datetime, str, dict[str, Any]]] = []
                    states, cursor = await self.edge.lookup(
                        functools.partial(_states_since, identity=caller.identity, since=cursor))
                    out += [(datetime.fromisoformat(s["updated_at"]), "message.state", s) for s in states]
                    # Files are listed from a little before the newest one told (renames lag their mtime).
                    listed = await asyncio.to_thread(mailbox.list, floor - MAILBOX_SLACK)
                    for entry in listed:
                        received = datetime.fromisoformat(entry["received_at"])
                        if entry["id"] in seen or received <= since:
                            continue
                        seen[entry["id"]] = received
                        out.append((received, "mailbox.message", {"mailbox": caller.identity, **entry}))
                        receipt = await self._receipt_event(caller, mailbox, entry["id"])
                        if receipt is not None:
                            out.append((received, "message.receipt", receipt))
                    if seen:
                        floor = max(floor, *seen.values())
                        seen = {k: v for k, v in seen.items() if v > floor - MAILBOX_SLACK}
                    for moment, name, data in sorted(out, key=lambda item: item[0]):
                        await response.write(_sse(name, data, moment))
                        last_write = time.monotonic()
                    if time.monotonic() - last_write >= HEARTBEAT:
                        await response.write(KEEPALIVE)
                        last_write = time.monotonic()
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), timeout=self.poll)
        except _GONE:  # the client went away (a write to a closing transport): the stream is simply over
            pass
        return response

    async def _receipt_event(self, caller: Caller, mailbox: Mailbox, entry_id: str) -> dict[str, Any] | None:
        path = await asyncio.to_thread(mailbox.find, entry_id)
        if path is None:
            return None
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        report = await asyncio.to_thread(read_report, data)
        if report is None or not report["refers_to"]:
            return None
        refers = sorted(report["refers_to"])
        queue_id = await self.edge.lookup(lambda db: _original(db, caller.identity, refers))
        if queue_id is None:
            return None
        return {"id": queue_id, "kind": report["kind"], "mailbox_message": entry_id, "recipients": report["recipients"]}


def _states_since(db: Any, *, identity: str, since: datetime) -> tuple[list[dict[str, Any]], datetime]:
    rows = db.execute(select_recent(identity, since.astimezone(UTC))).all()
    out: list[dict[str, Any]] = []
    cursor = since
    for row in rows:
        updated = as_utc(row.updated_at)
        cursor = max(cursor, updated)
        out.append({"id": row.id, "address": row.address, "state": row.state.value, "attempts": row.attempts,
                    "protection": row.protection, "last_reply": row.last_reply,
                    "updated_at": updated.isoformat()})  # fmt: skip
    return out, cursor


def _original(db: Any, identity: str, refers: list[str]) -> str | None:
    """The queue id of ``identity``'s message a report refers to (by Message-ID or by our queue id)."""
    from gateway.queue.models import QueuedMessage

    wanted = [f"<{r}>" for r in refers]
    stmt = (select(QueuedMessage.id).where(QueuedMessage.auth_identity == identity)
            .where(QueuedMessage.id.in_(refers) | func.lower(QueuedMessage.message_id).in_(wanted))
            .limit(1))  # fmt: skip
    found = db.execute(stmt).scalar()
    return str(found) if found is not None else None


#: A large answer is written in pieces of this size: one write of it all would fill the socket's
#: buffer past TLS flow control, and a client that reads nothing would hold it all in memory.
WRITE_CHUNK = 64 * 1024


async def _write_in_chunks(request: web.Request, data: bytes, content_type: str) -> web.StreamResponse:
    """``data`` as the answer, in ``WRITE_CHUNK`` pieces, each waiting for the client to keep up."""
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: content_type})
    response.content_length = len(data)
    await response.prepare(request)
    view = memoryview(data)
    for start in range(0, len(data), WRITE_CHUNK):
        await response.write(view[start:start + WRITE_CHUNK])
    await response.write_eof()
    return response


def _gone(request: web.Request) -> bool:
    """Whether the client closed its connection (its stream's slot is then given back at once)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _sse(name: str, data: dict[str, Any], moment: datetime) -> bytes:
    return f"id: {moment.isoformat()}\nevent: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _last_event(request: web.Request) -> datetime | None:
    """The time a reconnecting client last heard (its ``Last-Event-ID``); a malformed one is ignored."""
    raw = request.headers.get("Last-Event-ID", "")
    try:
        value = datetime.fromisoformat(raw) if raw else None
    except ValueError:
        return None
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


def _since(request: web.Request) -> datetime | None:
    raw = request.query.get("since")
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise Problem(400, S501_5_5_4_BAD_FIELD, "since-malformed",
                      detail="since: an ISO 8601 date and time (2026-11-30T10:00:00Z)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource if request.match_info.route is not None else None
    return resource.canonical if resource is not None else "-"


def _read_refused(caller: Caller, address: str) -> Any:
    from gateway.audit.trail import AuditEvent

    return AuditEvent("read", "refuse", actor=caller.identity, client=caller.client, recipient=address,
                      rule="mailbox-not-owned", reply=S550_5_7_1_NOT_YOURS.short, detail={"listener": "api"})


async def start_api(edge: ApiEdge, tls: ssl.SSLContext, host: str, port: int) -> ApiServer:
    """The API listening on ``host:port``; ``OSError`` when the address is taken."""
    server = ApiServer(edge, tls)
    await server.start(host, port)
    return server


__all__ = ["ApiServer", "RateLimiter", "start_api"]
