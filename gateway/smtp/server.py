"""The SMTP protocol engine of every listener: aiosmtpd's ``SMTP`` with the gateway's replies and state.

aiosmtpd parses commands and DATA (RFC 5321; RFC 3207 STARTTLS; RFC 4954 AUTH;
RFC 1870 SIZE; RFC 6152 8BITMIME; RFC 6531 SMTPUTF8) and, since 1.4.5, ends DATA
only on ``CRLF.CRLF``. The command loop under it is ours (``gateway.smtp.commands``:
bounded lines, UTF-8-only arguments, error and time budgets, no client text in logs). This
subclass adds what the gateway needs around it:

* every reply aiosmtpd writes by itself is translated to our named reply (with an
  enhanced status code, RFC 3463) through one table, ``BUILTIN_REPLIES``;
* implicit TLS (RFC 8314, port 465) counts as TLS for ``auth_require_tls``;
* ``handle_exception`` never leaks the exception text and never answers 5xx: an
  unexpected error is a temporary local problem (451 4.3.0);
* live connections are tracked so that shutdown can finish transactions in flight
  and then say 421 4.3.2 to the rest.

``EdgeHandler`` holds what the submission and inbound handlers share: connect and
exception auditing, directory lookups off the event loop (an outage answers
451 4.3.5), the ``Received:`` trace header and the durable enqueue step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, TypeVar

from aiosmtpd.smtp import MISSING, Envelope, Session, TLSSetupException, syntax
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from directory.facts import recipient_facts, sender_facts
from gateway.audit.trail import AuditEvent, AuditWriter
from gateway.config import Settings
from gateway.core import replies as R
from gateway.core.errors import OutageError
from gateway.core.tls import peer_certificate, tls_summary
from gateway.core.ttlcache import TtlCache
from gateway.metrics import Metrics
from gateway.policy.content import ContentFacts, cheap_to_inspect, decide_content, inspect_content
from gateway.policy.decision import Decision
from gateway.policy.limits import EDGE_MAX_MESSAGE_BYTES, MAX_BUFFERED_DATA_BYTES
from gateway.policy.recipients import decide_recipient
from gateway.policy.senders import decide_sender
from gateway.queue.intake import Arrival, Intake
from gateway.queue.store import Enqueued, QueueError
from gateway.smtp.commands import GuardedSMTP

log = logging.getLogger("mssgw.smtp")
T = TypeVar("T")

#: aiosmtpd's own reply texts (1.4.6) and the reply the gateway sends instead.
BUILTIN_REPLIES: dict[str, R.Reply] = {
    "500 Error: bad syntax": R.S500_5_5_2_SYNTAX,
    "500 Command line too long": R.S500_5_5_6_LINE_TOO_LONG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": R.S550_5_6_0_LINE_TOO_LONG,
    "500 Error: strict ASCII mode": R.S500_5_5_2_SYNTAX,
    "530 Must issue a STARTTLS command first": R.S530_5_7_0_TLS_REQUIRED,
    "552 Error: Too much mail data": R.S552_5_3_4_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": R.S552_5_3_4_TOO_BIG,
    "503 Error: need MAIL command": R.S503_5_5_1_NEED_MAIL,
    "503 Error: need RCPT command": R.S503_5_5_1_NEED_RCPT,
    "503 Error: nested MAIL command": R.S503_5_5_1_BAD_SEQUENCE,
    "554 Command refused due to lack of security": R.S554_5_7_0_TLS_FAILED,
    "454 TLS not available": R.S454_4_7_0_TLS_UNAVAILABLE,
    "220 Ready to start TLS": R.S220_2_0_0_TLS_READY,
    "221 Bye": R.S221_2_0_0_BYE,
    "250 OK": R.S250_2_0_0_OK,
    "555 MAIL FROM parameters not recognized or not implemented": R.S555_5_5_4_BAD_PARAMS,
    "555 RCPT TO parameters not recognized or not implemented": R.S555_5_5_4_BAD_PARAMS,
}
_BUILTIN_PREFIXES: tuple[tuple[str, R.Reply], ...] = (
    ("501 Syntax:", R.S501_5_5_4_SYNTAX_ARGS),
    ("501 Error:", R.S501_5_5_4_SYNTAX_ARGS),
    ("500 Error: command", R.S500_5_5_2_SYNTAX),
    ("503 Error: send", R.S503_5_5_1_BAD_SEQUENCE),
)
#: The null reverse-path (RFC 5321 4.5.5) as held in ``envelope.mail_from``: aiosmtpd needs a
#: non-empty sender before RCPT, so ``<>`` is kept as this marker and queued as sender "".
NULL_PATH = "<>"
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-\[\]:_]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: ``<local@domain>`` with dot-atom parts, then nothing or whitespace and the parameters.
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+([^\s(].*)|)\Z", re.S)

#: RCPT and MAIL decisions are reused for this long (seconds) and at most this many are kept. A
#: directory change (mailbox deactivated, domain blocked, delegation removed) reaches RCPT and
#: MAIL within this delay; the delivery side reads the directory again, and logins (passwords,
#: certificates) are never cached here.
RCPT_CACHE_SECONDS = 5.0
RCPT_CACHE_SIZE = 20_000

#: Command budgets per connection (aiosmtpd ``command_call_limit``); going over closes it with 421.
#: DATA is read in chunks of this size (aiosmtpd reads it one line per await).
DATA_CHUNK = 1 << 16

CALL_LIMITS = {"AUTH": 8, "STARTTLS": 3, "EHLO": 16, "HELO": 16, "NOOP": 50, "VRFY": 5, "HELP": 10,
               "*": 1_000_000}  # fmt: skip


class DataBudget:
    """Octets of message content buffered by the DATA readers of this process (one event loop).

    Each reader takes what it buffers and gives it back when its transaction is over (stored,
    refused or cut off); a reader that would go over the total stops buffering instead.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0

    def take(self, octets: int) -> bool:
        if self.held + octets > self.total:
            return False
        self.held += octets
        return True

    def give_back(self, octets: int) -> None:
        self.held = max(0, self.held - octets)


#: Shared by every listener of the process (submission, inbound): memory is one resource.
DATA_BUDGET = DataBudget(MAX_BUFFERED_DATA_BYTES)
OVER_BUDGET = str(R.S452_4_3_1_STORAGE)


def translate(status: str) -> str:
    """Our reply for one of aiosmtpd's built-in texts; other replies pass unchanged."""
    reply = BUILTIN_REPLIES.get(status)
    if reply is None:
        for prefix, candidate in _BUILTIN_PREFIXES:
            if status.startswith(prefix):
                reply = candidate
                break
    return str(reply) if reply is not None else status


class GatewaySession(Session):
    """aiosmtpd's session plus who the client is (reset after STARTTLS, RFC 3207 4.2)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.identity: str | None = None  # the mailbox this client acts as
        self.auth_method: str | None = None  # password, certificate
        self.cert_checked = False
        self.client_ip: str | None = None
        self.ssl_object: ssl.SSLObject | ssl.SSLSocket | None = None
        self.peer_domain: str | None = None  # inbound: the verified sending operator's domain


class GatewayEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.protections: dict[str, str] = {}
        self.started = time.monotonic()


class GatewaySMTP(GuardedSMTP):
    """One SMTP connection. ``registry`` holds live connections for shutdown."""

    def __init__(self, handler: EdgeHandler, *, implicit_tls: bool, registry: set[GatewaySMTP],
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._implicit_tls = implicit_tls
        self._registry = registry
        self.busy = False  # inside a transaction's DATA processing
        self.listener_name = handler.listener
        self._held = 0  # octets of DATA_BUDGET this connection's transaction holds

    def logged_in(self) -> bool:
        """A password or certificate login (submission), or a sender accepted from a verified peer (inbound)."""
        session = self.gw_session()
        return bool(session.authenticated or session.identity or session.peer_domain)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """``<>`` (the null reverse-path, with or without parameters) is ``NULL_PATH``; the rest as aiosmtpd.

        A plain ``<dot-atom@dot-atom>`` (nearly every MAIL and RCPT) is split by one regular
        expression with aiosmtpd's answer; anything else (quoted local parts, comments, address
        literals) goes through aiosmtpd's RFC 5322 parser, which costs ~50 times more, and a path
        that makes that parser fail is a syntax error (553, as aiosmtpd answers an unparsable
        path), not a local error.
        """
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            return NULL_PATH, stripped[2:]
        plain = _PLAIN_PATH.match(stripped)
        if plain is not None:
            address = plain.group(1)
            if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
                return None, None
            return address, plain.group(2) or ""
        try:
            return super()._getaddr(arg)
        except Exception:  # the stdlib parser trips on some malformed paths ("<a@[>"): a syntax error
            return None, None

    def _create_session(self) -> Session:
        return GatewaySession(self.loop)

    def _create_envelope(self) -> Envelope:
        return GatewayEnvelope()

    def gw_session(self) -> GatewaySession:
        assert isinstance(self.session, GatewaySession)
        return self.session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        session = self.gw_session()
        peer = session.peer
        session.client_ip = str(peer[0]) if isinstance(peer, tuple) else None
        if self._implicit_tls and first:
            # Implicit TLS (RFC 8314): the connection is encrypted from its first byte.
            # aiosmtpd only knows STARTTLS; mark TLS as done so AUTH is offered.
            self._tls_protocol = transport  # type: ignore[assignment]
            session.ssl_object = transport.get_extra_info("ssl_object")
        elif self._tls_protocol is not None and session.ssl is not None:
            session.ssl_object = session.ssl.get("ssl_object")
        if first:
            self._registry.add(self)
            handler = self.event_handler
            assert isinstance(handler, EdgeHandler)
            handler.on_connect(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._registry.discard(self)
        super().connection_lost(error)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """``LoopTlsSMTP``'s STARTTLS; the new session then gets the client address and TLS object."""
        await super().smtp_STARTTLS(arg)
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if ssl_object is not None:
            session = self.gw_session()
            session.client_ip = str(session.peer[0]) if isinstance(session.peer, tuple) else None
            session.ssl_object = ssl_object

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA (same checks, limits and replies), reading the content in chunks.

        The content ends at the first ``CRLF.CRLF`` (RFC 5321 4.1.1.4; a message may also be
        just ``.CRLF``); leading dots are removed (4.5.2). A line longer than
        ``line_length_limit`` octets with its CRLF answers 500 "Line too long", more than
        ``data_size_limit`` octets 552, each after the whole content is read, as aiosmtpd
        does. Bytes a pipelining client sent after the terminator are left for the next command.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._held = 0
        try:
            try:
                content, failure = await self._read_data()
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            if content is None:  # the client closed the connection mid-DATA
                self._writer.close()
                return
            if failure is not None:
                await self.push(failure)
                self._set_post_data_state()  # type: ignore[no-untyped-call]
                return
            self.envelope.content = content
            self.envelope.original_content = content
            status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
        finally:
            DATA_BUDGET.give_back(self._held)  # the content is stored (or refused) by now
            self._held = 0

    async def _read_data(self) -> tuple[bytes | None, str | None]:
        """The unstuffed content (None on EOF) and aiosmtpd's failure reply, if any."""
        reader = self._reader
        limit = self.data_size_limit or 0
        max_line = self.line_length_limit
        # A CRLF in front makes the terminator always CRLF.CRLF, even for an empty message.
        buf = bytearray(b"\r\n")
        search = 0  # where to look for the terminator next
        checked = 2  # buf[2:checked] are whole lines already measured
        dropped = 0  # content octets discarded after a failure (memory stays bounded)
        failure: str | None = None
        saved_limit = reader._limit  # type: ignore[attr-defined]  # StreamReader pauses the socket at 2 x limit
        reader._limit = max(saved_limit, DATA_CHUNK)  # type: ignore[attr-defined]
        try:
            while True:
                end = buf.find(b"\r\n.\r\n", search)
                upto = end + 2 if end >= 0 else buf.rfind(b"\r\n", checked) + 2
                if failure is None and upto > checked:
                    if max(map(len, bytes(buf[checked:upto]).split(b"\r\n"))) + 2 > max_line:
                        failure = "500 Line too long (see RFC5321 4.5.3.1.6)"
                    checked = upto
                if failure is None and end < 0 and len(buf) - checked > max_line:
                    failure = "500 Line too long (see RFC5321 4.5.3.1.6)"
                size = dropped + (end if end >= 0 else len(buf) - 4) - 2
                if failure is None and limit and size > limit:
                    failure = "552 Error: Too much mail data"
                if end >= 0:
                    rest = buf[end + 5:]
                    if rest:
                        reader._buffer[0:0] = rest  # type: ignore[attr-defined]  # pipelined commands after the data
                    if failure is not None:
                        return b"", failure
                    del buf[end + 2:]
                    return bytes(buf.replace(b"\r\n.", b"\r\n"))[2:], None
                if failure is not None and len(buf) > 4:
                    dropped += len(buf) - 4
                    del buf[:-4]
                    checked = 0
                search = max(len(buf) - 4, 0)
                chunk = await reader.read(DATA_CHUNK)
                if not chunk:
                    return None, None
                if failure is None and not DATA_BUDGET.take(len(chunk)):
                    failure = OVER_BUDGET  # too much content in memory process-wide: discard, try later
                elif failure is None:
                    self._held += len(chunk)
                buf += chunk
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            await super().push(translate(status))
        else:
            await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        handler = self.event_handler
        assert isinstance(handler, EdgeHandler)
        return handler.on_exception(self, error)

    async def close_for_shutdown(self) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(RuntimeError, OSError, AttributeError):  # already closing (or TLS torn down)
            self._writer.write(f"{R.S421_4_3_2_SHUTTING_DOWN}\r\n".encode())
        self.transport.close()


@dataclass
class EdgeDeps:
    """What a handler needs; built once by ``gateway.app.Gateway``."""

    settings: Settings
    sessions: sessionmaker[DbSession]
    intake: Intake  # the queue's one door: durable when ``accept`` returns
    audit: AuditWriter
    metrics: Metrics
    readers: sessionmaker[DbSession] | None = None  # directory lookups (SQLite: never take the write lock)


class Outage(OutageError):
    """The directory, database or spool cannot answer now: a temporary failure."""

    def __init__(self, reply: R.Reply) -> None:
        super().__init__(reply.short)
        self.reply = reply


class EdgeHandler:
    """Shared behaviour of the submission and inbound handlers (aiosmtpd hooks)."""

    listener = "smtp"
    origin = "submission"

    def __init__(self, deps: EdgeDeps) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.metrics = deps.metrics
        self.max_recipients = deps.settings.limits.max_recipients
        self.max_line = deps.settings.limits.max_line_length
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._decisions = TtlCache(RCPT_CACHE_SECONDS, RCPT_CACHE_SIZE)

    # --- hooks every listener shares ------------------------------------------------------

    def on_connect(self, server: GatewaySMTP) -> None:
        self.metrics.inc("mssgw_sessions_total", listener=self.listener)
        self.audit(AuditEvent("connect", "info", client=server.gw_session().client_ip,
                              detail={"listener": self.listener}))  # fmt: skip

    def on_exception(self, server: GatewaySMTP, error: Exception) -> str:
        session = server.gw_session()
        if isinstance(error, TLSSetupException):
            cause = error.__cause__
            log.info("listener=%s client=%s outcome=tls-failed error=%s", self.listener, session.client_ip,
                     type(cause).__name__ if cause else "unknown")
            self.metrics.inc("mssgw_tls_failures_total", listener=self.listener)
            self.audit(AuditEvent("tls", "refuse", client=session.client_ip, rule="tls-handshake",
                                  detail={"listener": self.listener,
                                          "error": getattr(cause, "reason", None) or type(cause).__name__}))
            return str(R.S554_5_7_0_TLS_FAILED)
        if isinstance(error, Outage):  # a step that did not catch its own outage: the same reply
            return str(error.reply)
        if isinstance(error, OutageError):  # any store that cannot answer now: try again later
            log.warning("listener=%s client=%s outcome=outage error=%s", self.listener, session.client_ip,
                        type(error).__name__)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind=type(error).__name__)
            return str(R.S451_4_3_0_LOCAL_ERROR)
        log.error("listener=%s client=%s outcome=error error=%s", self.listener, session.client_ip,
                  type(error).__name__, exc_info=error)
        self.metrics.inc("mssgw_errors_total", listener=self.listener)
        return str(R.S451_4_3_0_LOCAL_ERROR)

    async def handle_EHLO(self, server: GatewaySMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        # Never advertise an empty AUTH line (inbound has no mechanisms); our replies carry
        # enhanced status codes (RFC 2034).
        kept = [r for r in responses if r.rstrip() != "250-AUTH"]
        return [*kept[:-1], "250-ENHANCEDSTATUSCODES", kept[-1]]

    async def handle_RCPT(self, server: GatewaySMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        """The recipient rules, exactly as ``mssgw domains check`` (``--inbound`` on the inbound listener)."""
        inbound = self.origin == "inbound"
        assert isinstance(envelope, GatewayEnvelope)
        sess = server.gw_session()
        if len(envelope.rcpt_tos) >= self.max_recipients:
            decision = Decision.refuse(R.S452_4_5_3_TOO_MANY_RECIPIENTS, "too-many-recipients",
                                       f"at most {self.max_recipients} recipients per message")
            normalised = address
        else:
            try:
                normalised, decision = await self.recipient_decision(address, inbound)
            except Outage as exc:
                return str(exc.reply)
        outcome = verdict(decision)
        self.metrics.inc("mssgw_rcpt_total", listener=self.listener, decision=outcome, rule=decision.rule)
        self.audit(AuditEvent("rcpt", outcome, actor=sess.identity or sess.peer_domain, client=sess.client_ip,
                              sender=envelope.mail_from, recipient=normalised, rule=decision.rule,
                              reply=decision.reply.short, detail=dict(decision.facts)))  # fmt: skip
        if decision.accepted:
            envelope.rcpt_tos.append(normalised)
            envelope.protections[normalised] = dict(decision.facts).get("protection", "")
        return str(decision.reply)

    async def recipient_decision(self, address: str, inbound: bool) -> tuple[str, Decision]:
        """The recipient chain's answer, reused for ``RCPT_CACHE_SECONDS`` (no thread hop on a hit)."""
        key = ("rcpt", inbound, address.strip().lower())
        return await self.cached_lookup(key, lambda db: _rcpt_decision(db, address, inbound))  # type: ignore[no-any-return]

    async def cached_lookup(self, key: Hashable, fn: Callable[[DbSession], Any]) -> Any:
        """``lookup`` reused for ``RCPT_CACHE_SECONDS`` under ``key``: a hit costs no thread hop.

        Outages are never cached (``lookup`` raises before anything is stored).
        """
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        answer = await self.lookup(fn)
        self._decisions.put(key, answer)
        return answer

    async def check_content(self, data: bytes) -> tuple[ContentFacts, Decision]:
        """The content rules: on the event loop when cheap, else in a thread (a large MIME tree)."""
        opaque = self.origin == "inbound"

        def run() -> tuple[ContentFacts, Decision]:
            facts = inspect_content(data, max_line_length=self.max_line, opaque_crypto=opaque)
            return facts, decide_content(facts)

        if cheap_to_inspect(data, opaque_crypto=opaque):
            return run()
        return await asyncio.to_thread(run)

    async def check_authors(self, sess: GatewaySession, envelope: Envelope, facts: ContentFacts) -> Decision:
        """``From:``, ``Sender:``, ``Resent-From:`` and ``Resent-Sender:`` name only mailboxes the identity may send as.

        The same sender rules as MAIL FROM (own mailbox or delegated, active), reused from the
        decision cache; the envelope sender was checked at MAIL already. The first field that
        names another mailbox refuses the message (550 5.7.1) and says which field it was.
        """
        identity = sess.identity
        assert identity is not None
        mail_from = (envelope.mail_from or "").lower()
        for field, address in (("from", facts.from_addresses[0]), *facts.other_senders):
            if address == mail_from:
                continue
            decision = await self.cached_lookup(
                ("mail", identity.lower(), address.strip().lower()),
                functools.partial(_sender_decision, identity=identity, address=address))
            if not decision.accepted:
                reply = R.S550_5_7_1_FROM_MISMATCH if field == "from" else R.S550_5_7_1_SENDER_HEADER_MISMATCH
                name = "-".join(part.capitalize() for part in field.split("-"))
                return Decision.refuse(reply, f"{field}-header-not-owned",
                                       f"{identity} may not use {address} in the {name}: header")
        return Decision.accept(R.S250_2_6_0_QUEUED, "from-header", "author and sender fields name mailboxes it may use")

    def refuse_content(self, sess: GatewaySession, envelope: Envelope, decision: Decision, size: int) -> str:
        assert isinstance(envelope, GatewayEnvelope)
        self.metrics.inc("mssgw_content_refused_total", rule=decision.rule)
        self.audit(AuditEvent("data", "refuse", actor=sess.identity or sess.peer_domain, client=sess.client_ip,
                              sender=envelope.mail_from, rule=decision.rule, reply=decision.reply.short,
                              detail={"size": size, "recipients": len(envelope.rcpt_tos)}))  # fmt: skip
        self.log_outcome("refused", envelope, size=size, reply=decision.reply.short)
        return str(decision.reply)

    def accept_events(self, sess: GatewaySession, envelope: Envelope, queue_id: str, size: int) -> list[AuditEvent]:
        return [
            AuditEvent("accept", "accept", actor=sess.identity or sess.peer_domain, client=sess.client_ip,
                       sender=sender_of(envelope), recipient=rcpt, queue_id=queue_id, rule="queued",
                       reply=R.S250_2_6_0_QUEUED.short, detail={"size": size, "origin": self.origin})
            for rcpt in envelope.rcpt_tos
        ]  # fmt: skip

    # --- helpers ----------------------------------------------------------------------------

    def audit(self, *events: AuditEvent) -> None:
        self.deps.audit.submit(*events)

    async def lookup(self, fn: Callable[[DbSession], T]) -> T:
        """Run a read of the directory in a thread; any failure is an ``Outage`` (451 4.3.5)."""

        factory = self.deps.readers or self.deps.sessions

        def run() -> T:
            with factory() as db, db.begin():
                return fn(db)

        try:
            return await asyncio.to_thread(run)
        except Exception as exc:
            log.warning("listener=%s outcome=directory-unavailable error=%s", self.listener, type(exc).__name__)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind="directory")
            raise Outage(R.S451_4_3_5_POLICY_UNAVAILABLE) from exc

    def received_header(self, server: GatewaySMTP, envelope: Envelope, queue_id: str) -> bytes:
        """RFC 5321 4.4 trace field; RFC 3848 / RFC 6531 protocol names. No content."""
        session = server.gw_session()
        helo = _HELO_SAFE.sub("", session.host_name or "unknown")[:255] or "unknown"
        tls = tls_summary(session.ssl_object)
        proto = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") + ("S" if tls else "") + (
            "A" if session.identity else "")
        lines = [
            f"Received: from {helo} ([{session.client_ip or 'unknown'}])",
            f"\tby {self.settings.hostname} (mssgw) with {proto} id {queue_id}" + (f" ({tls})" if tls else "") + ";",
            f"\t{format_datetime(datetime.now(UTC))}",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def peer_der(self, server: GatewaySMTP) -> bytes | None:
        return peer_certificate(server.gw_session().ssl_object)

    # --- the end of a transaction ---------------------------------------------------------

    async def store(self, server: GatewaySMTP, envelope: GatewayEnvelope, data: bytes, *, queue_id: str,
                    events: list[AuditEvent], **envelope_facts: Any) -> Enqueued:
        """Hand the message to the queue (``Intake.accept``); returns only once it is committed."""
        self._inflight += 1
        self._idle.clear()
        server.busy = True
        arrival = Arrival(data, sender_of(envelope), list(envelope.rcpt_tos), self.origin, queue_id=queue_id,
                          client_address=server.gw_session().client_ip, protections=envelope.protections,
                          events=events, **envelope_facts)  # fmt: skip
        try:
            return await self.deps.intake.accept(arrival)
        except QueueError as exc:
            no_space = isinstance(exc.__cause__, OSError) and exc.__cause__.errno == 28
            log.error("listener=%s outcome=queue-unavailable error=%s", self.listener, exc)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind="queue")
            raise Outage(R.S452_4_3_1_STORAGE if no_space else R.S451_4_3_0_LOCAL_ERROR) from exc
        finally:
            server.busy = False
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def log_outcome(self, outcome: str, envelope: GatewayEnvelope, *, queue_id: str = "-", size: int = 0,
                    reply: str = "") -> None:
        elapsed = (time.monotonic() - envelope.started) * 1000
        log.info("listener=%s outcome=%s queue_id=%s sender=%s rcpts=%d size=%d ms=%.1f%s", self.listener, outcome,
                 queue_id, envelope.mail_from or "<>", len(envelope.rcpt_tos), size, elapsed,
                 f" reply={reply!r}" if reply else "")  # fmt: skip


def sender_of(envelope: Envelope) -> str:
    """The envelope sender as queued: "" for the null reverse-path."""
    sender = envelope.mail_from or ""
    return "" if sender == NULL_PATH else sender


def verdict(decision: Decision) -> str:
    return "accept" if decision.accepted else "refuse"


def _sender_decision(db: DbSession, *, identity: str, address: str) -> Decision:
    return decide_sender(sender_facts(db, identity, address))


def _rcpt_decision(db: DbSession, address: str, inbound: bool) -> tuple[str, Decision]:
    facts = recipient_facts(db, address)
    return facts.address, decide_recipient(facts, inbound=inbound)


async def start_listener(
    handler: EdgeHandler,
    host: str,
    port: int,
    *,
    tls_context: ssl.SSLContext,
    implicit_tls: bool,
    registry: set[GatewaySMTP],
    require_starttls: bool = True,
    auth: bool = True,
) -> asyncio.Server:
    """Listen on ``host:port``; raises ``OSError`` when the address is taken."""
    settings = handler.settings
    loop = asyncio.get_running_loop()

    def factory() -> GatewaySMTP:
        return GatewaySMTP(
            handler,
            implicit_tls=implicit_tls,
            registry=registry,
            hostname=settings.hostname,
            ident="mssgw ESMTP",
            # The workers wrap at most EDGE_MAX_MESSAGE_BYTES (plus the fields we add): never accept more.
            data_size_limit=min(settings.limits.max_message_size, EDGE_MAX_MESSAGE_BYTES),
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit_tls else tls_context,
            require_starttls=require_starttls and not implicit_tls,
            timeout=settings.limits.session_timeout,
            auth_require_tls=True,
            auth_exclude_mechanism=None if auth else ["PLAIN", "LOGIN"],
            command_call_limit=CALL_LIMITS,
            loop=loop,
        )

    return await loop.create_server(factory, host, port, ssl=tls_context if implicit_tls else None,
                                    reuse_address=True)
