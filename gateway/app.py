"""The running gateway: database, TLS, SMTP listeners, queue workers, IMAP and metrics, started and stopped as one.

``Gateway(settings).run_forever()`` is ``mssgw serve``. ``start()`` checks the
certificates (missing or expired: ``GatewayStartError``), migrates the database,
binds every listener of ``[listen]`` (a taken port: ``GatewayStartError`` naming the
setting and address), logs one line per listener, then starts the queue workers and
the IMAP service when their modules are present. ``stop()`` (SIGTERM, SIGINT) stops
accepting connections, lets transactions already in DATA finish committing, says
421 4.3.2 to the other sessions, stops workers and IMAP, and flushes the audit writer.
The audit retention purge runs at start and then daily.

Live reload: every ``RELOAD_INTERVAL`` seconds a cheap summary of the trust list, certificates
and anchors (``directory.facts.trust_counter``) and the TLS files' mtimes are compared with
the last ones; when they moved, per-domain digests (``trust_signature``) say what changed. On a
change (``mssgw peers``, ``domains``, ``certs import``, ``certs trust-anchor``), the
listeners' TLS context and the relay's are rebuilt for new connections,
the key caches are dropped, deferred mail to the changed domains is made due now, and one
line ``trust reloaded generation=N ...`` is logged. No restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from directory.db import DatabaseError, make_engine, migrate, session_factory
from directory.secrets import operator_key_pem, pseudonym_salt
from gateway.audit.redact import install_log_redaction, set_salt
from gateway.audit.seal import Sealer
from gateway.audit.trail import AuditEvent, AuditWriter, bind_node, purge
from gateway.auth import Authenticator
from gateway.config import Settings
from gateway.core.errors import ConfigurationError, MssgwError
from gateway.core.memory import TRIM_INTERVAL, limit_malloc_arenas, release_free_memory
from gateway.core.tls import (
    ReloadableServerTls,
    TlsConfigError,
    requests_client_cert,
    server_context,
    server_files,
    set_operator_key_source,
)
from gateway.metrics import Metrics, serve_metrics
from gateway.queue.intake import Intake
from gateway.queue.store import QueueError, QueueStore
from gateway.smtp.handler import EdgeDeps, EdgeHandler
from gateway.smtp.inbound import InboundHandler
from gateway.smtp.server import GatewaySMTP, start_listener
from gateway.smtp.submission import SubmissionHandler

log = logging.getLogger("mssgw.app")

PURGE_INTERVAL = 24 * 3600.0
SHUTDOWN_GRACE = 30.0  # seconds given to transactions in DATA to commit
WRITER_THREADS = 16  # enqueue threads (spool writes in parallel, database commits grouped)
RELOAD_INTERVAL = 2.0  # seconds between two looks at the trust list, anchors and TLS files


class GatewayStartError(ConfigurationError):
    """The gateway cannot start; the message is one line naming the setting or file."""


def purge_audit(factory: sessionmaker[Session], settings: Settings) -> int:
    """Apply ``audit.retention_days``; returns the number of records removed."""
    days = settings.audit.retention_days
    with factory() as session, session.begin():
        return purge(session, older_than=timedelta(days=days))


class Gateway:
    """``workers=False`` makes an edge-only node: it accepts and queues, another node delivers."""

    def __init__(self, settings: Settings, *, workers: bool = True, imap: bool = True) -> None:
        self.settings = settings
        self.with_workers = workers
        self.with_imap = imap
        self.workers: Any = None
        self.metrics = Metrics()
        self.addresses: dict[str, tuple[str, int]] = {}
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Session] | None = None
        self.readers: sessionmaker[Session] | None = None
        self._read_engine: Engine | None = None
        self._writer: ThreadPoolExecutor | None = None
        self.store: QueueStore | None = None
        self.audit: AuditWriter | None = None
        self.authenticator: Authenticator | None = None
        self.handlers: list[EdgeHandler] = []
        self._servers: list[asyncio.Server] = []
        self._connections: set[GatewaySMTP] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._services: list[tuple[str, Callable[[], Awaitable[Any]]]] = []  # (name, async close)
        self.tls: ReloadableServerTls | None = None  # listeners that ask for a client certificate
        self.tls_people: ReloadableServerTls | None = None  # listeners that do not
        self.api: Any = None  # gateway.api.server.ApiServer when listen.api is set
        self._trust_seen: tuple[tuple[object, ...], tuple[float, ...]] | None = None  # (counter, file stamps)
        self._trust_digest: dict[str, str] = {}
        # One reload at a time: two interleaved (the watcher and a caller) could each retry the
        # deferred mail, and the slower could put back the older view of the trust list.
        self._trust_lock = asyncio.Lock()

    # --- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        # Patients' mailbox addresses hold their INS: pseudonymised in every log line and audit record.
        install_log_redaction()
        try:
            tls = server_context(self.settings)
        except TlsConfigError as exc:
            raise GatewayStartError(str(exc)) from None
        self.engine = make_engine(self.settings.database_url, echo=self.settings.database.echo)
        bind_node(self.engine, self.settings.audit.node)  # this node's audit chain
        try:
            await asyncio.to_thread(migrate, self.engine)
        except DatabaseError as exc:
            raise GatewayStartError(str(exc)) from None
        self.sessions = session_factory(self.engine)
        self.readers = self._reader_factory()
        # Secrets every node shares, sealed in the database under this node's key-encryption key:
        # a missing or wrong KEK stops the start here, with the sentence that says what to do.
        try:
            set_salt(await asyncio.to_thread(pseudonym_salt, self.sessions, self.settings,
                                             self.settings.keys_dir / "patient-pseudonym.salt"))  # fmt: skip
        except MssgwError as exc:
            raise GatewayStartError(str(exc)) from None
        readers = self.readers or self.sessions
        set_operator_key_source(self.settings.home, lambda: operator_key_pem(readers, self.settings))
        try:
            self._trust_seen = await asyncio.to_thread(self._trust_state)
            self._trust_digest = await asyncio.to_thread(self._trust_digest_now)
            anchors = await asyncio.to_thread(self._anchors)
            tls = server_context(self.settings, anchors)
            people = server_context(self.settings, anchors, request_client_cert=False)
        except TlsConfigError as exc:
            raise GatewayStartError(str(exc)) from None
        # Two contexts: listeners that ask clients for a certificate (inbound, tls.request_client_cert)
        # and the clinicians' ones that do not; both reloaded together.
        self.tls = ReloadableServerTls(tls)
        self.tls_people = ReloadableServerTls(people)
        # Enqueue threads: they write and fsync spool files side by side; the database writes
        # of new messages and audit batches are group-committed by one of them at a time
        # (``QueueStore.group``), so even SQLite sees one writer and no busy-waits.
        self._writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="queue-writer")
        q = self.settings.queue
        self.store = QueueStore.for_database(self.sessions, self.settings.spool_dir,
                                             lifetime=timedelta(hours=q.lifetime_hours),
                                             lease=timedelta(seconds=q.lease_seconds))  # fmt: skip
        self.metrics.gauge("mssgw_quarantined_messages", self.store.quarantined_count)
        self.audit = AuditWriter(self.sessions, executor=self._writer, sink=self.store.append_audit,
                                 sealer=Sealer.for_settings(self.settings, self.sessions))  # sealed now and then
        self.audit.start()
        self.authenticator = Authenticator(self.sessions, self.settings, self.audit, readers=self.readers)
        # The queue's one door for every edge (SMTP listeners, the HTTP API).
        self.intake = Intake(self.store, writer=self._writer, audit=self.audit, handoff=lambda: self.workers,
                             on_queued=self._wake)  # fmt: skip
        deps = EdgeDeps(self.settings, self.sessions, self.intake, self.audit, self.metrics, readers=self.readers)
        submission = SubmissionHandler(deps, self.authenticator)
        inbound = InboundHandler(deps)
        self.handlers = [submission, inbound]
        try:
            await self._listen("submission", submission, self._tls_for("submission"), implicit_tls=False)
            await self._listen("submissions", submission, self._tls_for("submissions"), implicit_tls=True)
            await self._listen("inbound", inbound, self._tls_for("inbound"), implicit_tls=False, auth=False)
            await self._start_api(self._tls_for("api"))
            where = self.settings.listen("metrics")
            if where is not None:
                server = await self._bind("metrics", where, serve_metrics(self.metrics, *where))
                self._servers.append(server)
        except GatewayStartError:
            await self.stop()
            raise
        if self.with_workers:
            await self._start_workers()
        if self.with_imap:
            await self._start_imap()
        self._tasks.append(asyncio.create_task(self._purge_daily(), name="audit-purge"))
        self._tasks.append(asyncio.create_task(self._watch_trust(), name="trust-watch"))
        self._tasks.append(asyncio.create_task(self._trim_memory(), name="memory-trim"))
        self.audit.submit(AuditEvent("start", "info", actor=self.settings.hostname,
                                     detail={k: f"{h}:{p}" for k, (h, p) in self.addresses.items()}))

    def _tls_for(self, listener: str) -> ssl.SSLContext:
        """The listener's TLS context: asking for a client certificate or not (``requests_client_cert``)."""
        chosen = self.tls if requests_client_cert(self.settings, listener) else self.tls_people
        assert chosen is not None
        return chosen.context

    def _reader_factory(self) -> sessionmaker[Session]:
        """SQLite: a second engine for directory reads without ``BEGIN IMMEDIATE``.

        WAL readers never wait for the writer, so RCPT lookups do not queue behind
        queue commits (and SQLite's busy handler, which sleeps up to 100 ms, is not
        involved). PostgreSQL: the same engine.
        """
        assert self.engine is not None
        if self.engine.dialect.name != "sqlite":
            return session_factory(self.engine)
        self._read_engine = create_engine(self.engine.url, connect_args={"timeout": 30})

        @event.listens_for(self._read_engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA busy_timeout=30000")
            dbapi_connection.execute("PRAGMA query_only=ON")

        return session_factory(self._read_engine)

    async def _bind(self, name: str, where: tuple[str, int], coro: Awaitable[asyncio.Server]) -> asyncio.Server:
        try:
            server = await coro
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise GatewayStartError(f"listen.{name}: cannot listen on {where[0]}:{where[1]}: {reason}") from None
        host, port = server.sockets[0].getsockname()[:2]
        self.addresses[name] = (str(host), int(port))
        log.info("listening name=%s address=%s:%d", name, host, port)
        return server

    async def _listen(self, name: str, handler: EdgeHandler, tls: ssl.SSLContext, *, implicit_tls: bool,
                      auth: bool = True) -> None:
        where = self.settings.listen(name)
        if where is None:
            return
        coro = start_listener(handler, where[0], where[1], tls_context=tls, implicit_tls=implicit_tls,
                              registry=self._connections, auth=auth)  # fmt: skip
        self._servers.append(await self._bind(name, where, coro))

    async def _start_api(self, tls: ssl.SSLContext) -> None:
        """The HTTPS API for software (``gateway.api``) on ``listen.api``, with the listeners' TLS context."""
        where = self.settings.listen("api")
        if where is None:
            return
        from gateway.api.edge import ApiEdge
        from gateway.api.server import ApiServer

        assert self.sessions is not None and self.store is not None and self.audit is not None
        assert self.authenticator is not None
        edge = ApiEdge(self.settings, self.sessions, self.intake, self.store, self.audit, self.metrics,
                       self.authenticator, readers=self.readers)  # fmt: skip
        server = ApiServer(edge, tls)
        try:
            host, port = await server.start(*where)
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise GatewayStartError(f"listen.api: cannot listen on {where[0]}:{where[1]}: {reason}") from None
        self.api = server
        self.addresses["api"] = (host, port)
        log.info("listening name=api address=%s:%d", host, port)

    # --- hook points for the other services ----------------------------------------------------

    async def _start_workers(self) -> None:
        """Queue workers (``gateway.queue.worker.Workers``), when that module is present."""
        try:
            from gateway.queue.worker import Workers
        except ImportError:
            log.info("queue workers not available in this build: messages stay queued")
            return
        assert self.sessions is not None and self.store is not None
        if self.settings.queue.workers <= 0:  # an accept-only node: other nodes deliver
            log.info("queue workers off (queue.workers = 0): messages wait for another node's workers")
            return
        self.workers = Workers(self.settings, self.sessions, self.store)
        await self.workers.start()
        self._services.append(("workers", self.workers.stop))
        log.info("queue workers started count=%s", self.settings.queue.workers)

    def _wake(self, queue_id: str) -> None:
        if self.workers is not None:
            self.workers.wake()

    async def _start_imap(self) -> None:
        """IMAP (``gateway.imap.server.start_imap``) when listen.imap/imaps are set."""
        if self.settings.listen("imap") is None and self.settings.listen("imaps") is None:
            return
        try:
            from gateway.imap.server import start_imap
        except ImportError:
            log.info("IMAP service not available in this build")
            return
        assert self.sessions is not None and self.authenticator is not None
        try:
            service = await start_imap(self.settings, self.sessions, self.authenticator)
        except OSError as exc:
            await self.stop()
            raise GatewayStartError(f"listen.imap/imaps: cannot listen: {exc.strerror or exc}") from None
        for name, (host, port) in service.addresses.items():
            self.addresses[name] = (host, port)
            log.info("listening name=%s address=%s:%d", name, host, port)
        self._services.append(("imap", service.close))

    # --- live reload of trust and TLS ----------------------------------------------------------

    def _anchors(self) -> list[bytes]:
        from certs.service import anchor_pems

        assert self.readers is not None
        with self.readers() as session:
            return anchor_pems(session)

    def _trust_state(self) -> tuple[tuple[object, ...], tuple[float, ...]]:
        """Cheap: two aggregate reads and three stats (every ``RELOAD_INTERVAL``)."""
        from directory.facts import trust_counter

        assert self.readers is not None
        with self.readers() as session:
            counter = trust_counter(session)
        files = server_files(self.settings)
        stamps = tuple(p.stat().st_mtime if p.is_file() else -1.0 for p in (files.cert, files.key, files.client_ca))
        return counter, stamps

    def _trust_digest_now(self) -> dict[str, str]:
        """Per-domain digests (reads every domain and certificate row): only when the counter moved."""
        from directory.facts import trust_signature

        assert self.readers is not None
        with self.readers() as session:
            return trust_signature(session)

    async def _watch_trust(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            try:
                await self.reload_trust()
            except Exception as exc:  # a locked database or a half-written file: the next look retries
                log.warning("trust reload failed error=%s", type(exc).__name__)

    async def reload_trust(self, *, force: bool = False) -> bool:
        """Apply what admins changed since the last look; returns whether anything changed."""
        async with self._trust_lock:
            return await self._reload_trust(force)

    async def _reload_trust(self, force: bool) -> bool:
        seen = await asyncio.to_thread(self._trust_state)
        before = self._trust_seen
        if before == seen and not force:
            return False
        stamps = seen[1]
        old_stamps = before[1] if before is not None else ()
        digest, old_digest = await asyncio.to_thread(self._trust_digest_now), self._trust_digest
        changed = {k for k in digest.keys() | old_digest.keys() if digest.get(k) != old_digest.get(k)}
        from directory.facts import ANCHORS_KEY

        anchors = await asyncio.to_thread(self._anchors)
        if self.tls is not None and (force or ANCHORS_KEY in changed or stamps != old_stamps):
            try:
                self.tls.replace(server_context(self.settings, anchors))
                if self.tls_people is not None:
                    self.tls_people.replace(server_context(self.settings, anchors, request_client_cert=False))
            except TlsConfigError as exc:  # keep serving with the last good context
                log.warning("trust reload: TLS context kept error=%s", exc)
        relay = getattr(getattr(self.workers, "ctx", None), "relay", None)
        keys = getattr(self.workers, "keys", None)
        if keys is not None:
            keys.invalidate()
        if relay is not None and hasattr(relay, "reload") and keys is not None:
            # Read in a thread, applied on the loop: the relay's pooled connections live here.
            trust = await asyncio.to_thread(lambda: (keys.trust().anchors, keys.trust_store()))
            relay.reload(*trust)
        for handler in self.handlers:
            store = getattr(handler, "_keystore", None)
            if store is not None:
                store.invalidate()
        domains = None if (ANCHORS_KEY in changed or stamps != old_stamps) else changed
        retried = await asyncio.to_thread(self._retry_deferred, domains)
        self._trust_seen, self._trust_digest = seen, digest
        if retried:
            self._wake("")
        generation = self.tls.generation if self.tls is not None else 0
        log.info("trust reloaded generation=%d anchors=%d changed=%s retried=%d", generation, len(anchors),
                 ",".join(sorted(changed)) or "-", retried)  # fmt: skip
        return True

    def _retry_deferred(self, domains: set[str] | None) -> int:
        """Make deferred messages to ``domains`` (None: any domain) due now; returns how many."""
        if self.store is None:
            return 0
        retried = 0
        for row in self.store.list(state="deferred", limit=1000):
            info = self.store.get(row["id"])
            waiting = [r["address"] for r in info["recipient_states"] if r["state"] == "deferred"]
            if domains is not None and not any(a.rpartition("@")[2] in domains for a in waiting):
                continue
            try:
                self.store.retry(row["id"])
            except QueueError:  # delivered or bounced meanwhile: nothing to retry
                log.debug("trust reload: %s no longer waiting", row["id"])
                continue
            retried += 1
        return retried

    async def _purge_daily(self) -> None:
        assert self.sessions is not None
        while True:
            try:
                removed = await asyncio.to_thread(purge_audit, self.sessions, self.settings)
                if removed:
                    log.info("audit purge removed=%d", removed)
            except Exception as exc:  # a busy database: try again tomorrow
                log.warning("audit purge failed error=%s", type(exc).__name__)
            await asyncio.sleep(PURGE_INTERVAL)

    async def _trim_memory(self) -> None:
        """Give the allocator's free pages back to the system now and then (``gateway.core.memory``)."""
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            await asyncio.to_thread(release_free_memory)

    # --- stop ----------------------------------------------------------------------------------

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        for server in self._servers:
            server.close()
        if self.api is not None:  # stops accepting; submissions already in flight commit first
            await self.api.close()
            self.api = None
        busy = [h.wait_idle() for h in self.handlers]
        if busy:
            try:
                await asyncio.wait_for(asyncio.gather(*busy), timeout=grace)
            except TimeoutError:
                log.warning("shutdown: transactions still committing after %.0fs", grace)
        for conn in list(self._connections):
            await conn.close_for_shutdown()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=5)
        self._servers.clear()
        for name, close in reversed(self._services):
            try:
                await close()
            except Exception as exc:
                log.warning("shutdown: %s did not stop cleanly error=%s", name, type(exc).__name__)
        self._services.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.audit is not None:
            self.audit.submit(AuditEvent("stop", "info", actor=self.settings.hostname))
            await self.audit.close()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._read_engine is not None:
            self._read_engine.dispose()
            self._read_engine = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        set_operator_key_source(self.settings.home, None)

    # --- mssgw serve ---------------------------------------------------------------------------

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        # Directory lookups and logins run in threads: enough of them for many sessions.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="mssgw-io"))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        log.info("gateway started hostname=%s domains=%s", self.settings.hostname, ",".join(self.settings.domains))
        await stop.wait()
        log.info("shutting down")
        await self.stop()
        log.info("stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, on uvloop unless ``runtime.event_loop = "asyncio"``.

        uvloop does the sockets and TLS of every SMTP and IMAP session in C; with asyncio's own
        loop, TLS records go through pure-Python protocol code, the largest share of a
        gateway's CPU per message after the crypto.
        """
        limit_malloc_arenas()  # before the pools start their threads
        factory = None
        if self.settings.runtime.event_loop == "uvloop":
            try:
                import uvloop
            except ImportError:  # a platform without uvloop wheels: asyncio's loop works the same, slower
                log.warning("uvloop is not installed: running on asyncio's event loop")
            else:
                factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self.serve())
