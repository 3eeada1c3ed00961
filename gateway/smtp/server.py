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

The engine talks to its handler through aiosmtpd's hooks and ``EdgeHooks`` (connect and
exception), so it imports no handler: ``gateway.smtp.handler.EdgeHandler`` is what the
submission and inbound handlers share (auditing, directory lookups, the trace field, the
durable enqueue step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from typing import Any, Protocol, cast

from aiosmtpd.smtp import MISSING, Envelope, Session, syntax

from gateway.config import Settings
from gateway.core import replies as R
from gateway.core.budget import OctetBudget
from gateway.policy.limits import EDGE_MAX_MESSAGE_BYTES, MAX_BUFFERED_DATA_BYTES
from gateway.smtp.commands import GuardedSMTP
from gateway.smtp.dsn import (
    MAIL_PARAMS,
    RCPT_PARAMS,
    DsnSyntaxError,
    MailDsn,
    RcptDsn,
    parse_mail,
    parse_rcpt,
    take_params,
)

log = logging.getLogger("mssgw.smtp")

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
    "503 TLS already active": R.S503_5_5_1_TLS_ACTIVE,
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
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: ``<local@domain>`` with dot-atom parts, then nothing or whitespace and the parameters.
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+([^\s(].*)|)\Z", re.S)


#: Command budgets per connection (aiosmtpd ``command_call_limit``); going over closes it with 421.
#: DATA is read in chunks of this size (aiosmtpd reads it one line per await).
DATA_CHUNK = 1 << 16

CALL_LIMITS = {"AUTH": 8, "STARTTLS": 3, "EHLO": 16, "HELO": 16, "NOOP": 50, "VRFY": 5, "HELP": 10,
               "*": 1_000_000}  # fmt: skip


class DataBudget(OctetBudget):
    """Octets of message content buffered by the DATA readers of this process (one event loop).

    Each reader takes what it buffers and gives it back when its transaction is over (stored,
    refused or cut off); a reader that would go over the total stops buffering instead.
    """


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


class EdgeHooks(Protocol):
    """What the engine asks of its handler besides aiosmtpd's ``handle_*`` hooks
    (``gateway.smtp.handler.EdgeHandler``); ``on_exception`` returns the reply to send."""

    settings: Settings
    listener: str  # the listener's name in logs and metrics: submission, inbound, ...
    offers_dsn: bool  # the listener offers the DSN extension (RFC 3461): ENVID, RET, NOTIFY, ORCPT

    def on_connect(self, server: GatewaySMTP) -> None: ...

    def on_exception(self, server: GatewaySMTP, error: Exception) -> str: ...


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
        #: RFC 3461 parameters of this transaction: ENVID/RET, and NOTIFY/ORCPT per accepted recipient.
        self.dsn = MailDsn()
        self.dsn_rcpt: dict[str, RcptDsn] = {}
        #: What the engine read from the MAIL or RCPT line being handled (or the refusal), for the hook.
        self.dsn_pending: MailDsn | RcptDsn | R.Reply | None = None


class GatewaySMTP(GuardedSMTP):
    """One SMTP connection. ``registry`` holds live connections for shutdown."""

    def __init__(self, handler: EdgeHooks, *, implicit_tls: bool, registry: set[GatewaySMTP],
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
            cast(EdgeHooks, self.event_handler).on_connect(self)

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

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, with ENVID and RET taken out first where the handler offers DSN.

        Their values (or the 501 5.5.4 refusing them) wait in ``envelope.dsn_pending`` for the
        handler's MAIL hook, so aiosmtpd's own checks (HELO, AUTH, nested MAIL, SIZE) come first."""
        await super().smtp_MAIL(self._take_dsn(arg, "FROM:", MAIL_PARAMS))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """aiosmtpd's RCPT, with NOTIFY and ORCPT taken out first (see ``smtp_MAIL``)."""
        await super().smtp_RCPT(self._take_dsn(arg, "TO:", RCPT_PARAMS))

    def _take_dsn(self, arg: str | None, keyword: str, names: frozenset[str]) -> str | None:
        envelope = self.envelope
        if not isinstance(envelope, GatewayEnvelope):
            return arg
        envelope.dsn_pending = None
        if arg is None or self.session is None or not self.session.extended_smtp:
            return arg
        if not getattr(self.event_handler, "offers_dsn", False):
            return arg  # aiosmtpd answers 555: parameters not recognised
        arg, taken = take_params(arg, keyword, names, self._getaddr)
        try:
            envelope.dsn_pending = parse_mail(taken) if keyword == "FROM:" else parse_rcpt(taken)
        except DsnSyntaxError as exc:
            envelope.dsn_pending = R.S501_5_5_4_DSN_SYNTAX.with_text(str(exc))
        return arg

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
        return cast(EdgeHooks, self.event_handler).on_exception(self, error)

    async def close_for_shutdown(self) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(RuntimeError, OSError, AttributeError):  # already closing (or TLS torn down)
            self._writer.write(f"{R.S421_4_3_2_SHUTTING_DOWN}\r\n".encode())
        self.transport.close()
















async def start_listener(
    handler: EdgeHooks,
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
