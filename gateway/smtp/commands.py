"""The command loop of every listener: bounded reads, bytes checked before any handler sees them, no client text in logs.

aiosmtpd's own loop (``SMTP._handle_client``) reads a command, decodes its argument with
``surrogateescape`` (a byte that is not UTF-8 becomes a lone surrogate that later reaches
the audit trail), logs every command line at info level and every unknown command word at
warning level (a body pipelined after a refused DATA puts health words in the log), and
shares its command size table between all connections. This loop replaces it:

* a command line is at most ``COMMAND_LINE_BYTES`` octets (RFC 5321 4.5.3.1.4; MAIL has room
  for its parameters, AUTH for a SASL PLAIN response, RFC 4954 4); a longer one is answered
  500 5.5.6 and discarded without being buffered, and past ``MAX_DISCARDED_LINE_BYTES`` the
  connection is closed (421 4.7.0);
* an argument must be valid UTF-8 without control characters: MAIL answers 553 5.1.7,
  RCPT 553 5.1.3, other commands 501 5.5.2; a non-ASCII address needs ``SMTPUTF8`` on MAIL
  (RFC 6531 3.4; else 553 5.6.7, RFC 6533 3) -- all before any handler, record or log;
* every 5xx reply counts as an error: after ``MAX_ERRORS_PER_SESSION`` the session is closed
  with 421 4.7.0, as after ``MAX_COMMANDS_PER_SESSION`` commands;
* a client must finish STARTTLS within ``PRE_TLS_SECONDS`` and log in within
  ``PRE_AUTH_SECONDS`` of connecting (421 4.7.0); an idle session is told 421 4.4.2;
* SASL responses (``challenge_auth``) are bounded like command lines;
* nothing the client wrote is logged: aiosmtpd's logger ``mail.log`` is filtered (only its
  sender and recipient lines, envelope addresses, pass with arguments), and each session
  with protocol errors logs one summary line of counts when it ends.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import re
from base64 import b64decode, b64encode
from dataclasses import dataclass, fields
from typing import Any

from aiosmtpd.smtp import ALLOWED_BEFORE_STARTTLS, MISSING, TLSSetupException, _Missing

from gateway.core import replies as R
from gateway.policy import limits as L
from gateway.smtp.starttls import LoopTlsSMTP

__all__ = ["ClientTextFilter", "GuardedSMTP"]

log = logging.getLogger("mssgw.smtp")

#: C0 controls and DEL are never part of an SMTP argument (RFC 5321 4.1.2; tab is not either).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: aiosmtpd log lines whose arguments are envelope addresses, which may be logged.
_ADDRESS_LINES = frozenset({"%r sender: %s", "%r recip: %s"})


class ClientTextFilter(logging.Filter):
    """Drops ``mail.log`` records that carry anything but the peer address (or an envelope address).

    aiosmtpd logs command lines, unknown command words, SASL blobs it cannot decode and the
    like; the peer address is a tuple, the only argument type let through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in _ADDRESS_LINES:
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,) if record.args else ()
        return all(arg is None or isinstance(arg, tuple) for arg in args)


_FILTER = ClientTextFilter()
logging.getLogger("mail.log").addFilter(_FILTER)


@dataclass
class SessionCounts:
    """What one session did wrong, for its summary line (counts only, never the text)."""

    commands: int = 0
    errors: int = 0
    unknown: int = 0
    too_long: int = 0
    bad_bytes: int = 0

    def summary(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


class LineTooLong(Exception):
    """A line went past its limit; ``closed`` when it was so long the connection was dropped."""

    def __init__(self, closed: bool) -> None:
        super().__init__("line too long")
        self.closed = closed


class GuardedSMTP(LoopTlsSMTP):
    """``LoopTlsSMTP`` with the bounded, non-logging command loop described above."""

    listener_name = "smtp"
    #: Class attributes so that tests can shorten them.
    pre_tls_seconds = L.PRE_TLS_SECONDS
    pre_auth_seconds = L.PRE_AUTH_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("proxy_protocol_timeout") is not None:
            raise ValueError("the PROXY protocol is not read by this command loop")
        super().__init__(*args, **kwargs)
        self.counts = SessionCounts()
        self._closing = False
        self._summarised = False
        self._deadline: asyncio.TimerHandle | None = None

    # --- limits of the session as a whole ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            # One limit for every line the loop reads (the longest is an AUTH line); each command
            # is then measured against its own limit.
            self._reader._limit = L.AUTH_LINE_BYTES  # type: ignore[attr-defined]
            self._deadline = self.loop.call_later(self.pre_tls_seconds, self._check_tls)

    def connection_lost(self, error: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.counts.errors and not self._summarised:
            self._summarised = True
            peer = self.session.peer if self.session is not None else None
            log.info("listener=%s client=%s outcome=protocol-errors %s", self.listener_name,
                     peer[0] if isinstance(peer, tuple) else "-", self.counts.summary())  # fmt: skip
        super().connection_lost(error)

    def logged_in(self) -> bool:
        """Whether the client has proved who it is (subclasses say how); until then ``pre_auth_seconds`` runs."""
        return bool(self.session is not None and self.session.authenticated)

    def _check_tls(self) -> None:
        """``pre_tls_seconds`` after connecting: a listener requiring STARTTLS closes a session still without it."""
        self._deadline = None
        if self.transport is None:
            return
        if self.require_starttls and self._tls_protocol is None:
            self._close_with(R.S421_4_7_0_TOO_SLOW.with_text("STARTTLS not done in time, closing connection"))
            return
        self._deadline = self.loop.call_later(max(self.pre_auth_seconds - self.pre_tls_seconds, 0.0),
                                              self._check_login)

    def _check_login(self) -> None:
        """``pre_auth_seconds`` after connecting: a session that has not logged in is closed."""
        self._deadline = None
        if self.transport is not None and not self.logged_in():
            self._close_with(R.S421_4_7_0_TOO_SLOW)

    def _timeout_cb(self) -> None:
        """Idle too long: say so (421 4.4.2) before closing, as RFC 5321 4.5.3.2 allows."""
        self._close_with(R.S421_4_4_2_TIMEOUT)

    def _close_with(self, reply: R.Reply) -> None:
        if self.transport is None or self._closing:
            return
        self._closing = True
        with contextlib.suppress(RuntimeError, OSError):
            self._writer.write(f"{reply}\r\n".encode())
        self.transport.close()

    async def push(self, status: str | bytes) -> None:
        if (status[:1] if isinstance(status, str) else status[:1].decode("ascii", "replace")) == "5":
            self.counts.errors += 1
        if isinstance(status, str):
            await super().push(status)
        else:
            await super().push(status)

    # --- reading lines -----------------------------------------------------------------------------

    async def _read_line(self) -> bytes | None:
        """One line with its LF, None at EOF; ``LineTooLong`` after discarding a line past the reader limit."""
        reader = self._reader
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as error:
            consumed = error.consumed
        discarded = 0
        while True:  # drop what is buffered, never more than twice the limit at a time
            await reader.read(consumed)
            discarded += consumed
            if discarded > L.MAX_DISCARDED_LINE_BYTES:
                raise LineTooLong(closed=True)
            try:
                await reader.readuntil(b"\n")
                raise LineTooLong(closed=False)
            except asyncio.IncompleteReadError:
                return None
            except asyncio.LimitOverrunError as error:
                consumed = error.consumed

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> _Missing | bytes:
        """aiosmtpd's SASL challenge, with the response line bounded and never logged (RFC 4954 4)."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(raw) if encode_to_b64 else raw))
        try:
            line = await self._read_line()
        except LineTooLong as too_long:
            self.counts.too_long += 1
            if too_long.closed:
                self._close_with(R.S421_4_7_0_ABUSE.with_text("Authentication line far too long, closing connection"))
                return MISSING
            await self.push(str(R.S500_5_5_6_AUTH_LINE_TOO_LONG))
            return MISSING
        if line is None:
            self._close_with(R.S421_4_7_0_ABUSE.with_text("Connection closed during authentication"))
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push(str(R.S501_5_7_0_AUTH_ABORTED))
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push(str(R.S501_5_5_2_BAD_BASE64))
            return MISSING

    # --- the loop --------------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        """aiosmtpd's AUTH with the mechanism name matched without regard to case.

        SASL mechanism names are case-insensitive (RFC 4954 4, RFC 4422 3.1): aiosmtpd
        answered ``AUTH plain ...`` with 504 5.5.4.  A bare ``AUTH`` (no mechanism) is
        aiosmtpd's to answer (501 syntax), never a crash of the session.
        """
        if arg is None:
            await super().smtp_AUTH(arg)
            return
        mechanism, sep, rest = arg.partition(" ")
        await super().smtp_AUTH(mechanism.upper() + sep + rest)

    def _line_limit(self, command: str) -> int:
        if command == "AUTH":
            return L.AUTH_LINE_BYTES
        if self.session is None or not self.session.extended_smtp:
            return L.COMMAND_LINE_BYTES
        dsn = bool(getattr(self.event_handler, "offers_dsn", False))
        if command == "MAIL":
            return L.COMMAND_LINE_BYTES + L.MAIL_LINE_EXTRA_BYTES + (L.DSN_MAIL_EXTRA_BYTES if dsn else 0)
        if command == "RCPT" and dsn:
            return L.COMMAND_LINE_BYTES + L.DSN_RCPT_EXTRA_BYTES
        return L.COMMAND_LINE_BYTES

    def _argument_problem(self, command: str, arg_bytes: bytes) -> tuple[R.Reply | None, str | None]:
        """(a refusal, None) or (None, the decoded argument): UTF-8, no controls, non-ASCII only with SMTPUTF8."""
        bad = {"MAIL": R.S553_5_1_7_BAD_SENDER_BYTES, "RCPT": R.S553_5_1_3_BAD_RECIPIENT_BYTES}.get(
            command, R.S501_5_5_2_BAD_BYTES)
        try:
            arg = arg_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return bad, None
        if _CONTROL.search(arg):
            return bad, None
        if arg.isascii() or command not in ("MAIL", "RCPT"):
            return None, arg
        if command == "MAIL":
            smtputf8 = any(p.upper() == "SMTPUTF8" for p in arg.split()[1:])
        else:
            smtputf8 = self.envelope is not None and self.envelope.smtp_utf8
        return (None, arg) if smtputf8 else (R.S553_5_6_7_NON_ASCII_ADDRESS, None)

    async def _handle_client(self) -> None:
        assert self.session is not None
        await self.push(f"220 {self.hostname} {self.__ident__}")
        budgets: dict[str, int] = dict(self._call_limit_base) if self._enforce_call_limit else {}
        default_budget = self._call_limit_default if self._enforce_call_limit else 0
        while self.transport is not None and not self._closing:
            try:
                await self._one_command(budgets, default_budget)
                if self.counts.errors >= L.MAX_ERRORS_PER_SESSION:
                    self._close_with(R.S421_4_7_0_TOO_MANY_ERRORS)
                elif self.counts.commands >= L.MAX_COMMANDS_PER_SESSION:
                    self._close_with(R.S421_4_7_0_TOO_MANY_COMMANDS)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception as error:
                status = await self.handle_exception(error)
                if isinstance(error, TLSSetupException):  # as aiosmtpd: the connection is unusable
                    if self.transport is not None:
                        self.transport.close()
                    self.connection_lost(error)
                    return
                if self.transport is None:
                    return
                await self.push(status)

    async def _one_command(self, budgets: dict[str, int], default_budget: int) -> None:
        assert self.session is not None
        try:
            line = await self._read_line()
        except LineTooLong as too_long:
            self.counts.too_long += 1
            if too_long.closed:
                self._close_with(R.S421_4_7_0_ABUSE)
            else:
                await self.push(str(R.S500_5_5_6_LINE_TOO_LONG))
            return
        if line is None:  # the client closed its side
            if self.transport is not None:
                self.transport.close()
            self._closing = True
            return
        self.counts.commands += 1
        line = line.rstrip(b"\r\n")
        command_bytes, _, arg_bytes = line.partition(b" ")
        if not line or not command_bytes.isascii() or not command_bytes.isalpha():
            self.counts.unknown += 1
            await self.push(str(R.S500_5_5_2_SYNTAX))
            return
        command = command_bytes.upper().decode("ascii")
        if len(line) + 2 > self._line_limit(command):
            self.counts.too_long += 1
            await self.push(str(R.S500_5_5_6_LINE_TOO_LONG))
            return
        arg: str | None = None
        arg_bytes = arg_bytes.strip()
        if arg_bytes:
            refusal, arg = self._argument_problem(command, arg_bytes)
            if refusal is not None:
                self.counts.bad_bytes += 1
                await self.push(str(refusal))
                return
        if not self._tls_handshake_okay and command != "QUIT":
            await self.push("554 Command refused due to lack of security")
            return
        if self.require_starttls and not self._tls_protocol and command not in ALLOWED_BEFORE_STARTTLS:
            await self.push("530 Must issue a STARTTLS command first")
            return
        if self._enforce_call_limit:
            budget = budgets.get(command, default_budget)
            if budget < 1:
                self._close_with(R.S421_4_7_0_TOO_MANY_COMMANDS.with_text(f"{command} sent too many times"))
                return
            budgets[command] = budget - 1
        method = self._smtp_methods.get(command)
        if method is None:
            self.counts.unknown += 1
            await self.push(str(R.S500_5_5_2_SYNTAX))
            return
        self._reset_timeout()
        await method(arg)
