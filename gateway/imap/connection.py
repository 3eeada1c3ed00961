"""One IMAP connection: pymap's command loop with bounded reads, a safe STARTTLS and idle timeouts.

pymap's ``IMAPConnection`` reads a command line with ``StreamReader.readline``
and appends each LITERAL+ literal it announces, whatever its size, then parses
the lot on the event loop. Here, per command (``limits`` names the bounds):

* **Lines** longer than ``MAX_LINE`` (``PRE_AUTH_LINE_MAX`` before login) are
  read through and thrown away; the command gets ``BAD`` and the session goes on.
  A ``{N+}`` literal such a line announces is read and dropped too (within the
  literal bounds below, else ``BAD`` + ``BYE``): its bytes never run as commands.
* **Literals** are counted against the command's budget before a byte of them is
  read: before login ``PRE_AUTH_LITERAL_MAX`` each and ``PRE_AUTH_COMMAND_MAX`` in
  all, after login the advertised ``APPENDLIMIT`` (RFC 7889) for APPEND messages
  and ``NON_APPEND_LITERAL_MAX`` for other literals. A synchronizing literal
  beyond the bound is refused instead of being invited (``NO [TOOBIG]`` for APPEND,
  ``BAD [TOOBIG]`` otherwise); a non-synchronizing one is already on its way, so the
  command gets ``BAD [TOOBIG]`` and the connection is closed (RFC 7888 4).
* **Parsing** that would recurse too deep or that raises anything but pymap's
  own ``NotParseable`` answers ``BAD`` instead of ending the connection with a
  traceback; at most ``MAX_LITERALS`` continuations (each one re-parses the command).
* **STARTTLS** (RFC 3501 6.2.1, RFC 2595 3.1): whatever the client sent in clear
  after the STARTTLS line is discarded before the handshake, so it never runs
  inside the TLS session (the same rule as RFC 3207 5 for SMTP).
* **IDLE wakes on change** (RFC 2177): the session listens on its mailbox's
  ``mailbox_events`` (set by local delivery and by the other IMAP sessions of the same
  account in this process) and re-reads the folder when told; the folder is re-read every
  ``IDLE_FALLBACK_SECONDS`` too, for deliveries by other processes sharing the data folder.
* **Special-use folders** (RFC 6154, ``specialuse``): LIST names ``\\Sent``, ``\\Drafts``,
  ``\\Trash`` and ``\\Junk``; ``LIST (SPECIAL-USE)`` lists only those.
* **Inactivity**: a command must arrive within ``PRE_AUTH_TIMEOUT`` before login
  and ``POST_AUTH_TIMEOUT`` after (RFC 3501 5.4: at least 30 minutes), else
  ``* BYE`` and the connection is closed. IDLE counts as a command being read.
* **Total time before login**: ``PRE_AUTH_TOTAL`` from the connection, however many
  NOOPs are sent, then ``* BYE`` (a parked pre-login session holds a socket and a task).
* **SASL PLAIN** whose identity or password is not UTF-8 answers ``NO [AUTHENTICATIONFAILED]``
  (pysasl raised ``UnicodeDecodeError``, which pymap answered with ``* BYE [SERVERBUG]``).
* **Too many errors**: pymap closes after consecutive ``BAD`` answers but adds its
  ``* BYE`` (RFC 3501 7.1.5) once the answer is written; it is written here before closing.
* **A client gone mid-command**: the answer to a command that finishes after the
  client reset the connection is dropped quietly (a debug line), not a traceback.
* **APPEND memory**: every APPEND literal is counted in the service-wide budget of
  ``appendmem`` before it is read (``NO [LIMIT]`` before the ``+``, or a bounded wait).
* **SEARCH** waits for its turn (``search.SearchGate``) before it reaches the pool.
* **FETCH** loads each message off the loop, in turns (``fetch.ParseGate``, via the session).
* **Storage races and disk errors** (two sessions creating or renaming one
  folder) answer ``NO`` with an RFC 5530 code, not a dropped connection.

Nothing the client sent is logged: refusals are answered, not recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import time
from typing import Any

from pymap.config import IMAPConfig
from pymap.context import current_command, subsystem
from pymap.exceptions import InvalidAuth
from pymap.imap import IMAPConnection
from pymap.imap.state import ConnectionState
from pymap.interfaces.login import LoginInterface
from pymap.parsing import Params
from pymap.parsing.command import Command
from pymap.parsing.command.auth import LSubCommand
from pymap.parsing.command.select import IdleCommand, SearchCommand
from pymap.parsing.commands import InvalidCommand
from pymap.parsing.response import (
    CommandResponse,
    Response,
    ResponseBad,
    ResponseBye,
    ResponseCode,
    ResponseContinuation,
    ResponseNo,
    ResponseOk,
)
from pymap.parsing.response.specials import ListResponse, LSubResponse
from pymap.parsing.state import ExpectContinuation, ParsingInterrupt, ParsingState
from pysasl.creds.server import ServerCredentials
from pysasl.exception import AuthenticationError

from gateway.delivery.maildir import mailbox_events
from gateway.imap.limits import (
    COMMAND_MAX,
    MAX_LINE,
    MAX_LITERALS,
    NON_APPEND_LITERAL_MAX,
    PRE_AUTH_COMMAND_MAX,
    PRE_AUTH_LINE_MAX,
    PRE_AUTH_LITERAL_MAX,
    LineScanner,
)
from gateway.imap.specialuse import attributes_for

__all__ = ["IDLE_FALLBACK_SECONDS", "POST_AUTH_TIMEOUT", "PRE_AUTH_TIMEOUT", "Connection", "SessionState"]

#: Seconds a client may stay silent before login (enough to type a password, not to park).
PRE_AUTH_TIMEOUT = 60.0
#: Seconds a logged-in client may stay silent (RFC 3501 5.4: at least 30 minutes).
POST_AUTH_TIMEOUT = 30 * 60.0
#: Seconds from connect to login, whatever the client sends meanwhile (NOOPs do not extend it).
PRE_AUTH_TOTAL = 120.0
#: How often an IDLE client's folder is re-read when nothing in this process said it changed:
#: the fallback for deliveries and flag changes by other processes on the same data folder.
IDLE_FALLBACK_SECONDS = 15.0
#: Commands after which the account's other sessions (IDLE ones) are told to look again.
_CHANGING = frozenset({b"APPEND", b"COPY", b"MOVE", b"STORE", b"EXPUNGE", b"CLOSE",
                       b"UID COPY", b"UID MOVE", b"UID STORE", b"UID EXPUNGE"})

_log = logging.getLogger(__name__)
_TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2C-\x5B\x5D-\x7A\x7C\x7E]{1,64}(?= )")
_APPEND = re.compile(rb"[^ ]+ +APPEND ", re.IGNORECASE)
_LITERAL_PLUS = re.compile(rb"~?\{(\d+)\+\}\r?\n$")
_TOOBIG = ResponseCode.of(b"TOOBIG")
_LIMIT = ResponseCode.of(b"LIMIT")
_TAIL = 32  # bytes of an overlong line kept to find the literal it announces
_SKIP_CHUNK = 64 * 1024  # bytes read at a time from a literal being skipped


def _is_toobig(code: ResponseCode | None) -> bool:
    return code is not None and bytes(code) == b"[TOOBIG]"


def _tag_of(head: bytes | memoryview) -> bytes:
    match = _TAG.match(head)
    return match.group(0) if match else b"*"


class _ClosingBad(ResponseBad):
    """A tagged ``BAD`` followed by ``* BYE``: the connection is closed after it."""

    @property
    def is_terminal(self) -> bool:
        return True

    async def async_write(self, writer: Any) -> None:
        self.write(writer)

    def write(self, writer: Any) -> None:
        Response.write(self, writer)  # the tagged line alone, without untagged responses
        ResponseBye(b"Closing the connection.").write(writer)


class Refused(Command):
    """A command refused before pymap parsed it (too long, too big, too deep, unparseable)."""

    command = b"[REFUSED]"

    def __init__(self, tag: bytes, text: bytes, code: ResponseCode | None = None, *,
                 close: bool = False, no: bool = False) -> None:
        super().__init__(tag)
        self.text = text
        self.code = code
        self.close = close
        self.no = no

    @property
    def value(self) -> bytes:
        return self.text

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[Command, memoryview]:
        raise NotImplementedError

    def response(self) -> CommandResponse:
        if self.close:
            return _ClosingBad(self.tag, self.text, self.code)
        if self.no:
            return ResponseNo(self.tag, self.text, self.code)
        return ResponseBad(self.tag, self.text, self.code)


class _Refusal(Exception):
    """Raised while reading a command; becomes a ``Refused`` command."""

    def __init__(self, text: bytes, code: ResponseCode | None = None, *, close: bool = False,
                 no: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.close = close
        self.no = no


class _Budget:
    """What one command may still make the connection buffer."""

    def __init__(self, *, authenticated: bool, append_limit: int) -> None:
        self.authenticated = authenticated
        self.append_limit = append_limit
        self.used = 0
        self.message_bytes = 0
        self.literals = 0
        self.append: bool | None = None
        self.scanner = LineScanner()
        self.refusal: _Refusal | None = None

    @property
    def line_max(self) -> int:
        return MAX_LINE if self.authenticated else PRE_AUTH_LINE_MAX

    def piece(self, piece: bytes) -> None:
        """Count a line piece; remember (not raise) a nesting refusal so the command is read through."""
        if self.append is None:
            self.append = _APPEND.match(piece) is not None
        self.used += len(piece)
        limit = COMMAND_MAX if self.authenticated else PRE_AUTH_COMMAND_MAX
        if self.used > limit:
            raise _Refusal(b"Command too long.", _TOOBIG, close=True)
        if self.refusal is None:
            why = self.scanner.refusal(piece)
            if why is not None:
                self.refusal = _Refusal(why)

    def literal(self, length: int, *, synchronizing: bool) -> None:
        """Check a literal before reading it (raise ``_Refusal``), then count it."""
        self.literals += 1
        close = not synchronizing  # its bytes are already on their way
        if self.literals > MAX_LITERALS:
            raise _Refusal(b"Too many literals in one command.", close=close)
        if not self.authenticated:
            if length > PRE_AUTH_LITERAL_MAX or self.used + length > PRE_AUTH_COMMAND_MAX:
                raise _Refusal(b"Literal too large before login.", _TOOBIG, close=close)
        elif self.append:
            if self.message_bytes + length > self.append_limit:
                raise _Refusal(b"Message larger than APPENDLIMIT.", _TOOBIG, close=close, no=not close)
            self.message_bytes += length
            return
        elif length > NON_APPEND_LITERAL_MAX or self.used + length > COMMAND_MAX:
            raise _Refusal(b"Literal too large.", _TOOBIG, close=close)
        self.used += length


class SessionState(ConnectionState):
    """pymap's connection state: TLS-only login, answers for refused commands and storage races."""

    def __init__(self, login: LoginInterface, config: IMAPConfig, *, implicit_tls: bool) -> None:
        super().__init__(login, config)
        if implicit_tls:
            with contextlib.suppress(ValueError):
                self._capability.remove(b"STARTTLS")
            self.auth = config.tls_auth

    @property
    def authenticated(self) -> bool:
        return self._session is not None

    async def do_greeting(self) -> CommandResponse:
        # pymap enables login in clear text for loopback peers; we never do.
        return ResponseOk(b"*", self.config.greeting, self.capability)

    async def do_command(self, cmd: Command) -> CommandResponse:
        if isinstance(cmd, Refused):
            return cmd.response()
        if isinstance(cmd, InvalidCommand) and cmd.parse_exc is not None and _is_toobig(cmd.parse_exc.code):
            if cmd.command_name == b"APPEND":
                return ResponseNo(cmd.tag, b"Message larger than APPENDLIMIT.", _TOOBIG)
            return ResponseBad(cmd.tag, b"Literal too large.", _TOOBIG)
        try:
            response = await super().do_command(cmd)
        except FileExistsError:
            return ResponseNo(cmd.tag, b"Mailbox already exists.", ResponseCode.of(b"ALREADYEXISTS"))
        except FileNotFoundError:
            return ResponseNo(cmd.tag, b"Mailbox does not exist.", ResponseCode.of(b"NONEXISTENT"))
        except KeyError:  # pymap's backend lost a race with another session on this folder
            return ResponseNo(cmd.tag, b"Mailbox changed by another session, try again.", ResponseCode.of(b"INUSE"))
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.EINVAL, errno.ENOTDIR, errno.EISDIR):
                return ResponseNo(cmd.tag, b"Mailbox operation not possible.", ResponseCode.of(b"CANNOT"))
            _log.warning("imap storage error command=%s errno=%s", type(cmd).__name__,
                         errno.errorcode.get(exc.errno or 0, "?"))
            return ResponseNo(cmd.tag, b"Storage unavailable, try again later.", ResponseCode.of(b"UNAVAILABLE"))
        if cmd.command in _CHANGING and isinstance(response, ResponseOk):
            root = self.mailbox_root
            if root is not None:
                mailbox_events.changed(root)
        return response

    @property
    def mailbox_root(self) -> str | None:
        """The logged-in account's INBOX directory (the ``mailbox_events`` key), if logged in."""
        return getattr(self._session, "mailbox_root", None)

    async def do_list(self, cmd: Any) -> tuple[CommandResponse, Any]:
        """pymap's LIST with the RFC 6154 attributes, and ``LIST (SPECIAL-USE)`` listing only those."""
        mailboxes, updates = await self.session.list_mailboxes(
            cmd.ref_name, cmd.filter, subscribed=cmd.only_subscribed, selected=self._selected
        )
        response = ResponseOk(cmd.tag, cmd.command + b" completed.")
        for name, sep, attrs in mailboxes:
            if isinstance(cmd, LSubCommand):
                response.add_untagged(LSubResponse(name, sep, attrs))
                continue
            full = attributes_for(name, attrs)
            if getattr(cmd, "special_use_only", False) and len(full) == len(attrs):
                continue
            response.add_untagged(ListResponse(name, sep, full))
        return response, updates


class Connection(IMAPConnection):
    """pymap's connection with bounded reads, STARTTLS that forgets, timeouts and a thread-free IDLE."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state: ConnectionState | None = None
        self._budget = self._new_budget()
        self._head: bytes | None = None  # the start of the command being read, for its tag
        self._said_bye = False
        self._connected_at = time.monotonic()
        self._last_written: Response | None = None
        self._last_was_terminal = False
        self._append_held = 0  # APPEND literal bytes counted in ``appendmem`` for the current command

    async def run(self, state: ConnectionState) -> None:
        self._state = state
        try:
            await super().run(state)
        finally:
            self._release_append()
        last = self._last_written
        if last is not None and last.is_terminal and not self._last_was_terminal and not self._said_bye:
            # pymap's bad-command limit added its BYE after writing the tagged BAD.
            self._said_bye = True
            await self.write_response(ResponseBye(b"Too many errors, disconnecting."))

    def _exec(self, future: Any) -> Any:
        """pymap runs storage work here; a SEARCH first waits for its turn (``search.SearchGate``)."""
        gate = getattr(self.config, "search_gate", None)
        if gate is None or not isinstance(current_command.get(None), SearchCommand):
            return super()._exec(future)
        session = getattr(self._state, "_session", None)
        account = str(getattr(session, "owner", ""))
        return gate.run(account, super()._exec(future), also_close=future)

    async def write_response(self, resp: Response) -> None:
        """pymap's write, silent when the client has gone (a reset transport raises ``RuntimeError``)."""
        self._last_written = resp
        self._last_was_terminal = resp.is_terminal
        if self.writer.transport.is_closing():
            _log.debug("imap answer dropped: client gone")
            return
        try:
            await super().write_response(resp)
        except (RuntimeError, OSError):
            _log.debug("imap answer dropped: client gone")

    async def _hold_append(self, size: int, *, synchronizing: bool) -> None:
        """Count an APPEND literal in the service's memory budget before reading it (``appendmem``)."""
        memory = getattr(self.config, "append_memory", None)
        if memory is None or not size:
            return
        fits = memory.try_take(size) if synchronizing else await memory.take(size)
        if not fits:
            raise _Refusal(b"Too many messages being received; try again later.", _LIMIT,
                           close=not synchronizing, no=synchronizing)
        self._append_held += size

    def _release_append(self) -> None:
        memory = getattr(self.config, "append_memory", None)
        if memory is not None and self._append_held:
            memory.give(self._append_held)
        self._append_held = 0

    def _new_budget(self) -> _Budget:
        authenticated = isinstance(self._state, SessionState) and self._state.authenticated
        return _Budget(authenticated=authenticated, append_limit=int(self.params.max_append_len or 0))

    def _timeout(self) -> tuple[float, bytes]:
        """Seconds the next read may take, and the BYE text if it does not come in time."""
        if self._budget.authenticated:
            return POST_AUTH_TIMEOUT, b"Autologout; idle for too long."
        left = PRE_AUTH_TOTAL - (time.monotonic() - self._connected_at)
        if left < PRE_AUTH_TIMEOUT:
            return max(left, 0.0), b"Autologout; no login in time."
        return PRE_AUTH_TIMEOUT, b"Autologout; idle for too long."

    async def _timed(self, read: Any) -> bytes:
        seconds, why = self._timeout()
        try:
            async with asyncio.timeout(seconds):
                return bytes(await read)
        except TimeoutError:
            self._said_bye = True
            await self.write_response(ResponseBye(why))
            raise EOFError() from None

    async def _piece(self) -> bytes:
        """One CRLF-terminated line piece; an overlong one is read through and refused."""
        budget = self._budget
        try:
            piece = await self._timed(self.reader.readuntil(b"\n"))
        except asyncio.IncompleteReadError:
            raise EOFError() from None
        except asyncio.LimitOverrunError as exc:
            head = await self._timed(self.reader.readexactly(exc.consumed))
            tail = head[-_TAIL:]
            while True:
                try:
                    tail = (tail + await self._timed(self.reader.readuntil(b"\n")))[-_TAIL:]
                    break
                except asyncio.LimitOverrunError as more:
                    chunk = await self._timed(self.reader.readexactly(more.consumed))
                    tail = (tail + chunk)[-_TAIL:]
                except asyncio.IncompleteReadError:
                    raise EOFError() from None
            return await self._overlong(head, tail)
        if len(piece) > budget.line_max:
            return await self._overlong(piece, piece[-_TAIL:])
        self._head = self._head or piece[:80]
        budget.piece(piece)
        return piece

    async def _overlong(self, head: bytes, tail: bytes) -> bytes:
        """Refuse a line read through; skip the literal it announces so its bytes never run as commands.

        A non-synchronizing literal (``{N+}``) is already on its way: it is read in bounded
        chunks and dropped (within the command's literal bound, else ``BAD`` + ``BYE``), and
        the line piece after it is read the same way. A synchronizing one (``{N}``) is never
        invited (no ``+``), so a client does not send it.
        """
        budget = self._budget
        self._head = self._head or head[:80]
        if budget.append is None:
            budget.append = _APPEND.match(head) is not None
        budget.refusal = budget.refusal or _Refusal(b"Line too long.")
        match = _LITERAL_PLUS.search(tail)
        if match is None:
            return b"\r\n"
        if len(match.group(1)) > 12:
            raise _Refusal(b"Literal too large.", _TOOBIG, close=True)
        length = int(match.group(1))
        budget.literal(length, synchronizing=False)
        while length:
            chunk = await self._timed(self.reader.read(min(length, _SKIP_CHUNK)))
            if not chunk:
                raise EOFError()
            length -= len(chunk)
        return await self._piece()

    async def readline(self) -> memoryview:
        buf = bytearray(await self._piece())
        while True:
            match = _LITERAL_PLUS.search(buf) if buf.endswith(b"+}\n") or buf.endswith(b"+}\r\n") else None
            if match is None:
                return memoryview(buf)
            if len(match.group(1)) > 12:
                raise _Refusal(b"Literal too large.", _TOOBIG, close=True)
            length = int(match.group(1))
            self._budget.literal(length, synchronizing=False)
            if self._budget.append:
                await self._hold_append(length, synchronizing=False)
            buf += await self._timed(self.reader.readexactly(length))
            buf += await self._piece()

    async def read_continuation(self, literal_length: int) -> memoryview:
        literal = await self._timed(self.reader.readexactly(literal_length)) if literal_length else b""
        return memoryview(literal + bytes(await self.readline()))

    async def read_command(self, state: ConnectionState) -> Command:
        self._release_append()  # the previous command has been answered
        self._budget = self._new_budget()
        self._head = None
        try:
            return await self._read_command()
        except _Refusal as refusal:
            return Refused(_tag_of(self._head or b""), refusal.text, refusal.code, close=refusal.close,
                           no=refusal.no)

    async def _read_command(self) -> Command:
        line = await self.readline()
        conts: list[memoryview] = []
        while True:
            if self._budget.refusal is not None:
                raise self._budget.refusal
            params = self.params.copy(ParsingState(continuations=conts))
            try:
                cmd, _ = self.commands.parse(line, params)
            except ParsingInterrupt as interrupt:
                expected = interrupt.expected
                if not isinstance(expected, ExpectContinuation):
                    raise _Refusal(b"Invalid command.") from None
                self._budget.literal(expected.literal_length, synchronizing=True)
                if self._budget.append:
                    await self._hold_append(expected.literal_length, synchronizing=True)
                await self.write_response(ResponseContinuation(expected.message))
                conts.append(await self.read_continuation(expected.literal_length))
            except Exception as exc:  # pymap's parser raised something other than NotParseable
                _log.debug("imap command not parseable: %s", type(exc).__name__)
                raise _Refusal(b"Invalid command.") from None
            else:
                return cmd

    async def authenticate(self, state: ConnectionState, mech_name: bytes) -> ServerCredentials | None:
        try:
            return await super().authenticate(state, mech_name)
        except _Refusal as refusal:
            raise AuthenticationError(refusal.text.decode("ascii")) from None
        except UnicodeError:  # pysasl decodes identities and password as UTF-8
            raise InvalidAuth() from None

    async def read_idle_done(self, cmd: IdleCommand) -> bool:
        try:
            return await super().read_idle_done(cmd)
        except _Refusal:
            return False

    async def start_tls(self) -> None:
        # RFC 2595 3.1 / RFC 3207 5: nothing received before the handshake counts after it.
        self.reader._buffer.clear()  # type: ignore[attr-defined]
        await super().start_tls()

    async def send_error_disconnect(self) -> None:
        if not self._said_bye:
            await super().send_error_disconnect()

    async def idle(self, state: ConnectionState, cmd: IdleCommand) -> CommandResponse:
        response: CommandResponse = await self._exec(state.do_command(cmd))
        if not isinstance(response, ResponseOk):
            return response
        await self.write_response(ResponseContinuation(b"Idling."))
        stop = asyncio.Event()
        poller = asyncio.create_task(self._poll(state, cmd, stop))
        try:
            ok = await self.read_idle_done(cmd)
        finally:
            stop.set()
            await poller
        return response if ok else ResponseBad(cmd.tag, b'Expected "DONE".')

    async def _poll(self, state: ConnectionState, cmd: IdleCommand, stop: asyncio.Event) -> None:
        """Re-read the folder now, then whenever the mailbox is said to have changed (or every
        ``IDLE_FALLBACK_SECONDS``), until DONE. The notice is cleared before each read, so a
        delivery landing during a read triggers one more read rather than being missed."""
        no_wait = subsystem.get().new_event()
        no_wait.set()  # pymap's backend would otherwise block a pool thread on it
        root = state.mailbox_root if isinstance(state, SessionState) else None
        with contextlib.ExitStack() as stack:
            changed = stack.enter_context(mailbox_events.listen(root)) if root is not None else asyncio.Event()
            while not stop.is_set():
                changed.clear()
                untagged = await self._exec(state.receive_updates(cmd, no_wait))
                await asyncio.shield(self.write_updates(untagged))
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(changed.wait())]
                try:
                    await asyncio.wait(waits, timeout=IDLE_FALLBACK_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waits:
                        waiter.cancel()

