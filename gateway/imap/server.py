"""The IMAP service: pymap's IMAP4rev1 server over local Maildirs, with logins checked by the directory.

``start_imap`` listens on ``listen.imap`` (clear text, STARTTLS) and
``listen.imaps`` (implicit TLS, RFC 8314). pymap does the protocol (RFC 3501
IMAP4rev1, RFC 2177 IDLE, RFC 4315 UIDPLUS, RFC 6851 MOVE, RFC 3502 MULTIAPPEND,
RFC 4959 SASL-IR is not offered); its Maildir backend does the storage, in the
layout ``gateway.delivery.maildir`` writes. What is ours:

* **Login.** ``LOGIN`` and ``AUTHENTICATE PLAIN`` (RFC 4616) only, and only over TLS:
  in clear text the capability list says ``LOGINDISABLED`` and offers no SASL
  mechanism (pymap would otherwise allow it from loopback clients). The password
  goes to ``Authenticator.check_password(..., protocol="imap")``: the same
  Argon2 check, failure delay, lockout and audit record as SMTP AUTH. Only an
  active local mailbox with a password can log in. A SASL authorization identity
  other than the login's own is refused (``NO [AUTHORIZATIONFAILED]``).
* **Exact bytes.** Messages are stored and served byte for byte (``storage.py``).
* **Isolation.** A session's storage is built from the authenticated address
  only (``MaildirDelivery.mailbox_path``: normalised, lower-case, no ``/``,
  ``..`` or NUL), so ``A@X`` and ``a@x`` share one Maildir and nothing else.
  Folder names go through ``folder_subdir``: an empty part (``"/"`` would
  otherwise map to ``..``, the domain directory), ``.``, ``\\`` or control
  characters are refused with ``NO [CANNOT]``.
* **Delegation.** A delegate of an ORG mailbox logs in as itself and sees only
  its own folders; the ORG mailbox is not exposed as a shared folder (pymap's
  Maildir backend has no shared namespace, RFC 2342, to put it in). Those who
  read the ORG mailbox log in with the ORG mailbox's own credentials.
  Delegation governs sending as the ORG mailbox (SMTP), not reading.
* **Folders.** INBOX, Sent, Drafts, Trash and Junk exist (and are subscribed)
  from the first login.
* **Bounded SEARCH** (``search.py``): cheap paths for size and header keys, a time
  and parse budget per command (``NO [LIMIT]``), at most two at once in the process
  and one per account, so searches over big folders cannot starve the event loop.
* **IDLE without a parked thread, woken by delivery.** pymap's Maildir backend runs
  storage work in a thread pool; its IDLE blocks a pool thread between polls, so idling
  clients beyond the pool size delay every other command (20 idlers on 16 threads:
  login + SELECT 2.1 s instead of 0.4 s). Here the IDLE loop waits on the event loop
  for ``gateway.delivery.maildir.mailbox_events`` (a local delivery, or another session
  of the account changing a folder) and only then re-reads the folder in the pool; a
  fallback re-read every ``IDLE_FALLBACK_SECONDS`` catches other processes' deliveries.
* **Special-use folders** (RFC 6154, ``specialuse.py``): ``SPECIAL-USE`` in CAPABILITY,
  ``\\Sent``, ``\\Drafts``, ``\\Trash`` and ``\\Junk`` in LIST, so clients file their
  copies in our folders instead of creating "Sent Items".
* **Authenticator on its own loop.** Storage commands run in pool threads with
  their own event loops; the login hops back to the service's loop so the
  authenticator's counters and audit writer are only touched there.
* **Bounded input** (``connection.py``, ``limits.py``): command lines, literals
  (before login a few KiB; after login the advertised APPENDLIMIT), nesting and
  continuations are bounded per command; pymap's modified UTF-7 decoder and LIST
  matcher are replaced by linear ones; plaintext pipelined after STARTTLS is
  discarded; a session silent for ``PRE_AUTH_TIMEOUT`` (before login) or
  ``POST_AUTH_TIMEOUT`` (after) gets ``* BYE``.

Errors: pymap answers protocol errors itself (``BAD``/``NO`` with RFC 5530
codes). A refused login is ``NO [AUTHENTICATIONFAILED]``; a locked account or a
directory that cannot answer is ``NO [UNAVAILABLE]`` (try later). ``start_imap``
raises ``OSError`` when a port cannot be bound and ``ssl.SSLError``/``OSError``
when the certificate or key cannot be loaded.

Limits (documented, not bugs): pymap re-reads a selected folder's directory at
each IDLE wake-up, so very large folders cost more per idling client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from argparse import Namespace
from collections.abc import AsyncIterator, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager, closing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from proxyprotocol.reader import ProxyProtocolReader
from proxyprotocol.sock import SocketInfo
from pymap.backend.maildir import Config as MaildirConfig
from pymap.backend.maildir import FilterSet
from pymap.concurrent import Subsystem
from pymap.context import connection_exit, socket_info, subsystem
from pymap.exceptions import AuthorizationFailure, InvalidAuth, NotAllowedError
from pymap.imap import IMAPServer
from pymap.interfaces.login import IdentityInterface, LoginInterface
from pymap.interfaces.token import TokenCredentials
from pymap.parsing.commands import Commands
from pymap.parsing.response import (
    ResponseCode,
    ResponseNo,
)
from pymap.token import AllTokens
from pymap.user import UserMetadata
from pysasl import SASLAuth
from pysasl.creds.server import ServerCredentials
from pysasl.hashing import BuiltinHash
from pysasl.mechanism.plain import PlainMechanism
from sqlalchemy.orm import Session, sessionmaker

from directory.identifiers import InvalidIdentifier, normalise_address
from gateway.auth import Authenticator
from gateway.config import Settings
from gateway.delivery.maildir import DeliveryError, MaildirDelivery
from gateway.imap.appendmem import AppendMemory
from gateway.imap.connection import IDLE_FALLBACK_SECONDS, Connection, SessionState
from gateway.imap.fetch import ParseGate
from gateway.imap.limits import MAX_LINE, install_parser_guards
from gateway.imap.search import BoundedSearchSession, SearchGate
from gateway.imap.specialuse import CAPABILITY as SPECIAL_USE_CAPABILITY
from gateway.imap.specialuse import commands as imap_commands
from gateway.imap.storage import RawMailboxSet, RawMaildir, SafeLayout, write_metadata_beside_target

__all__ = ["IDLE_FALLBACK_SECONDS", "ImapService", "server_tls_context", "start_imap"]

#: Pool threads for Maildir work (disk reads, FETCH parsing); IDLE does not hold one.
IO_THREADS = 16
GREETING = b"mssgw IMAP4rev1 service ready"

_T = TypeVar("_T")
_log = logging.getLogger(__name__)


def server_tls_context(settings: Settings) -> ssl.SSLContext:
    """The server-side TLS context: ``tls.cert``/``tls.key`` or the development PKI's server pair."""
    cert = settings.path("tls", "cert", settings.pki_dir / "server.pem")
    key = settings.path("tls", "key", settings.pki_dir / "server.key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if settings.tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.load_cert_chain(cert, key)
    return context


# --- storage: pymap's Maildir backend, rooted at one mailbox ------------------------


class _Config(MaildirConfig):
    """pymap settings: PLAIN only, and only once TLS is up; the service's turns for SEARCH."""

    search_gate: SearchGate | None = None
    parse_gate: ParseGate | None = None
    append_memory: AppendMemory | None = None

    @property
    def tls_auth(self) -> SASLAuth:
        return SASLAuth([PlainMechanism()])

    @property
    def greeting(self) -> bytes:
        return GREETING

    @property
    def commands(self) -> Commands:
        return imap_commands()

    @property
    def login_capability(self) -> Sequence[bytes]:
        return [*super().login_capability, SPECIAL_USE_CAPABILITY]


class _Session(BoundedSearchSession):
    """A logged-in account's session; ``mailbox_root`` keys its ``mailbox_events``."""

    mailbox_root: str = ""


class _Identity(IdentityInterface):
    """An authenticated local mailbox; its session sees ``mailbox_path(address)`` and nothing else."""

    def __init__(self, address: str, config: _Config, delivery: MaildirDelivery) -> None:
        self._name = address
        self._config = config
        self._delivery = delivery

    @property
    def name(self) -> str:
        return self._name

    @property
    def roles(self) -> frozenset[str]:
        return frozenset()

    @asynccontextmanager
    async def new_session(self) -> AsyncIterator[_Session]:
        try:
            self._delivery.ensure_folders(self._name)
            path = str(self._delivery.mailbox_path(self._name))
        except DeliveryError as exc:
            raise NotAllowedError(f"Mailbox unavailable: {exc}") from None
        layout = SafeLayout(path, RawMaildir)
        mailbox_set = RawMailboxSet(RawMaildir(path, create=False), layout)
        session = _Session(self._name, self._config, mailbox_set, FilterSet(path))
        session.mailbox_root = path
        yield session

    async def new_token(self, *, expiration: datetime | None = None) -> str | None:
        return None

    async def get(self) -> UserMetadata:
        return UserMetadata(self._config, self._name)

    async def set(self, metadata: UserMetadata) -> int | None:
        raise NotAllowedError("Accounts are managed with 'mssgw directory'.")

    async def delete(self) -> None:
        raise NotAllowedError("Accounts are managed with 'mssgw directory'.")


class _SecretCapture:
    """A pysasl identity that records the secret it is compared with (the public way to read it)."""

    def __init__(self) -> None:
        self.secret: str | None = None

    @property
    def authcid(self) -> str:
        return ""

    def compare_authcid(self, authcid: str) -> bool:
        return True

    def compare_secret(self, secret: str) -> bool:
        self.secret = secret
        return True

    def get_clear_secret(self) -> str | None:
        return None


class _DirectoryLogin(LoginInterface):
    """pymap's login hook: passwords checked by our ``Authenticator`` on the service's event loop."""

    def __init__(
        self, config: _Config, authenticator: Authenticator, delivery: MaildirDelivery, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._config = config
        self._authenticator = authenticator
        self._delivery = delivery
        self._loop = loop
        self._tokens = AllTokens(config)

    @property
    def tokens(self) -> AllTokens:
        return self._tokens

    async def _on_service_loop(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def authenticate(self, credentials: ServerCredentials) -> _Identity:
        if isinstance(credentials, TokenCredentials):
            raise InvalidAuth()
        capture = _SecretCapture()
        credentials.verify(capture)
        if capture.secret is None:
            raise InvalidAuth()
        try:
            peer = socket_info.get().peername_ip
        except (AttributeError, OSError):  # proxyprotocol reads the socket, gone once the client reset
            raise ConnectionResetError() from None
        client = str(peer) if peer is not None else None
        outcome = await self._on_service_loop(
            self._authenticator.check_password(credentials.authcid, capture.secret, client=client, protocol="imap")
        )
        if outcome.ok and outcome.identity:
            return _Identity(outcome.identity, self._config, self._delivery)
        if outcome.reason in {"locked", "unavailable"}:
            raise _Unavailable()
        raise InvalidAuth()

    async def authorize(self, authenticated: IdentityInterface, authzid: str) -> IdentityInterface:
        try:
            wanted = normalise_address(authzid) if authzid else authenticated.name
        except InvalidIdentifier:
            raise AuthorizationFailure() from None
        if wanted != authenticated.name:
            raise AuthorizationFailure()
        return authenticated


class _Unavailable(InvalidAuth):
    """Locked out after too many failures, or the directory cannot answer: try again later."""

    def __init__(self) -> None:
        super().__init__("Login temporarily unavailable, try again later.")

    def get_response(self, tag: bytes) -> ResponseNo:
        return ResponseNo(tag, self._raw, ResponseCode.of(b"UNAVAILABLE"))


# --- protocol: pymap's connection, bounded (connection.py) -----------------------------


class _Server(IMAPServer):
    def __init__(self, login: LoginInterface, config: _Config, *, implicit_tls: bool, service: ImapService) -> None:
        super().__init__(login, config)
        self._implicit = implicit_tls
        self._service = service

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sock_info: SocketInfo) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._service._connections.add(task)
        subsystem.set(self._config.subsystem)  # pymap reads it from a context variable
        try:
            conn = Connection(self.commands, self._config, reader, writer, sock_info)
            state = SessionState(self._login, self._config, implicit_tls=self._implicit)
            async with AsyncExitStack() as stack:
                connection_exit.set(stack)
                stack.enter_context(closing(conn))
                await conn.run(state)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:
            if not writer.transport.is_closing():
                raise
            _log.debug("imap session ended after the client went away (%s)", type(exc).__name__)
        finally:
            if task is not None:
                self._service._connections.discard(task)


@dataclass
class ImapService:
    """The running IMAP listeners; ``addresses`` maps ``"imap"``/``"imaps"`` to the bound (host, port)."""

    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list, repr=False)
    _connections: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    async def close(self) -> None:
        """Stop listening, end open sessions, release the pool."""
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None


def _make_config(settings: Settings, tls: ssl.SSLContext, executor: ThreadPoolExecutor) -> _Config:
    args = Namespace(passlib_cfg=None, proxy_protocol=None, debug=False, inherited_sockets=None)
    return _Config(
        args,
        host=None,
        port=0,
        base_dir=str(settings.mail_dir),
        layout="++",
        colon=None,
        ssl_context=tls,
        tls_enabled=True,
        subsystem=Subsystem.for_executor(executor),
        hash_context=BuiltinHash(),
        cpu_subsystem=Subsystem.for_executor(executor),
        invalid_user_sleep=0.0,  # the Authenticator delays failures itself
        reject_dnsbl=False,
        max_append_len=settings.limits.max_message_size,  # the same bound as SMTP
    )


async def start_imap(
    settings: Settings, factory: sessionmaker[Session], authenticator: Authenticator
) -> ImapService:
    """Bind ``listen.imap`` (STARTTLS) and ``listen.imaps`` (implicit TLS) and serve until ``close()``.

    ``factory`` is the directory's session factory; logins reach the directory only
    through ``authenticator`` (which holds its own factory), so it is kept for symmetry with
    the other services and future per-login lookups.
    """
    del factory  # see docstring
    write_metadata_beside_target()
    install_parser_guards()
    tls = server_tls_context(settings)
    executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="imap-io")
    config = _make_config(settings, tls, executor)
    config.search_gate = SearchGate()
    config.parse_gate = ParseGate()
    config.append_memory = AppendMemory()
    delivery = MaildirDelivery(settings.mail_dir)
    login = _DirectoryLogin(config, authenticator, delivery, asyncio.get_running_loop())
    service = ImapService(_executor=executor)
    reader = ProxyProtocolReader(config.proxy_protocol)
    try:
        for name, implicit in (("imap", False), ("imaps", True)):
            where = settings.listen(name)
            if where is None:
                continue
            callback = reader.get_callback(_Server(login, config, implicit_tls=implicit, service=service))
            server = await asyncio.start_server(
                callback, host=where[0], port=where[1], ssl=tls if implicit else None, limit=MAX_LINE
            )
            service._servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            service.addresses[name] = (str(host), int(port))
    except BaseException:
        await service.close()
        raise
    return service

