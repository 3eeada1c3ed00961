"""Queue workers: claim ready messages, run their pipeline, schedule retries, give the claim back.

The job: the after-queue half of "accept means durable".  A loop claims ready messages with a
lease (``QueueStore.claim``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several nodes share one
queue), runs the outbound or inbound pipeline for each (up to ``concurrency`` at once), then
releases the claim with the next attempt time of whatever is still deferred:
exponential backoff from ``queue.retry_base_seconds`` doubling per attempt up to
``queue.retry_max_seconds``, with +/-25 % jitter so retries of many messages spread out, never
later than the message's expiry (when it bounces with a DSN, RFC 3464).

Database work stays small: lookups use deferred-BEGIN sessions (on SQLite they never take the
write lock submissions need), claims are made for several messages at once (a quarter of the
slots) and return the rows with the spool bytes, and each message's outcomes, audit records and
release are one transaction shared with whatever other messages finished meanwhile
(``gateway.queue.outcomes``, group commit).  The worker's own writes go through one thread, one
at a time.  A message this process accepts while a slot is free skips the claim altogether: the
SMTP edge stores it already leased to us (``reserve``) and hands it over from memory (``take``).

Delivery is at least once: a worker that dies holding a lease loses it after
``queue.lease_seconds`` and another worker redoes the message; the peer's inbound listener
drops the duplicate by its dedupe key.  CPU-bound crypto runs in a process pool
(``crypto_executor="process"``, ARCHITECTURE rule 6; spawned processes that exit with the
gateway), or in threads or inline for tests.

``run_once(now=...)`` does one claim-and-process round at an injected time: tests drive
retries and expiry with it instead of sleeping.

Errors: a pipeline that raises is logged and audited (``worker-error``) and its pending
recipients deferred: nothing is dropped.  ``stop`` waits for in-flight messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import functools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from directory.db import read_session_factory
from gateway.config import Settings
from gateway.crypto.keystore import KeyStore
from gateway.delivery.maildir import DELIVERY_RUN
from gateway.process import pipeline
from gateway.process.common import Context, LocalDelivery, RelayTransport
from gateway.process.verdict import Job, Verdict
from gateway.queue.outcomes import Pending, commit_many
from gateway.queue.store import QueueError, QueueStore

__all__ = ["Workers", "backoff_delay"]

log = logging.getLogger("mssgw.worker")

JITTER = 0.25

Claimed = tuple[Job, bytes | QueueError]  # a claimed message and its bytes (or why they cannot be read)


#: Seconds ``stop`` waits for the attempts under way (below the usual 90 s a service manager allows).
STOP_GRACE = 60.0


def backoff_delay(attempts: int, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after ``attempts`` failed tries: base * 2**(attempts-1), capped, jittered."""
    attempts = max(1, attempts)
    delay = min(maximum, base * (2 ** min(attempts - 1, 30)))
    factor = 1.0 + (rng or random).uniform(-JITTER, JITTER)
    return float(max(1.0, min(maximum, delay * factor)))


def exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """Pool initializer: this crypto process exits within ``interval`` seconds of its gateway.

    A gateway killed with SIGKILL cannot shut its pool down, and a pool worker blocked on its
    call queue never sees EOF (it holds the queue's write end too): without this watch it
    would outlive the gateway forever.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)  # a daemon thread polling the parent: no signal reaches us otherwise
        os._exit(0)

    threading.Thread(target=watch, name="mssgw-parent-watch", daemon=True).start()


def _make_executor(kind: str | Executor | None, size: int) -> tuple[Executor | None, bool]:
    """(executor, owned): ``process`` (spawned workers), ``thread``, ``inline`` or a given one."""
    if kind is None or kind == "inline":
        return None, False
    if isinstance(kind, Executor):
        return kind, False
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=size, thread_name_prefix="mssgw-crypto"), True
    if kind == "process":
        # spawn: never fork a process that runs an event loop and database threads, and the
        # workers are our own children, so ``exit_with_parent`` sees us go.
        return ProcessPoolExecutor(max_workers=size, mp_context=get_context("spawn"),
                                   initializer=exit_with_parent, initargs=(os.getpid(),)), True  # fmt: skip
    raise ValueError(f"unknown crypto executor {kind!r} (process, thread or inline)")


class Workers:
    """Claims and processes queued messages until stopped."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        store: QueueStore,
        audit: Any = None,  # gateway.audit AuditWriter (unused: outcomes are audited in the queue transaction)
        *,
        keys: KeyStore | None = None,
        relay: RelayTransport | None = None,
        local: LocalDelivery | None = None,
        crypto_executor: str | Executor | None = "process",
        crypto_workers: int | None = None,
        concurrency: int | None = None,
        worker_id: str | None = None,
        clock: Callable[[], _dt.datetime] | None = None,
        poll_interval: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.store = store
        bind = factory.kw.get("bind")
        # Lookups go through a deferred-BEGIN session: on SQLite they never take the write lock
        # that submissions need to commit.
        self.readers = read_session_factory(bind) if bind is not None else factory
        self.keys = keys or KeyStore(settings, self.readers)
        if relay is None:
            from gateway.delivery.relay import Relay

            relay = Relay(settings, anchors_pem=self.keys.trust().anchors, trust=self.keys.trust_store())
        if local is None:
            from gateway.delivery.maildir import MaildirDelivery

            local = MaildirDelivery(settings.mail_dir)
        workers = settings.queue.workers
        self._executor_kind = crypto_executor
        self._crypto_workers = crypto_workers or max(1, min(workers, os.cpu_count() or 1))
        self.concurrency = concurrency or max(8, 4 * workers)
        self.claim_batch = max(1, self.concurrency // 4)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock or (lambda: _dt.datetime.now(_dt.UTC))
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()
        self._now_override: _dt.datetime | None = None
        self.ctx = Context(settings=settings, readers=self.readers, keys=self.keys, relay=relay, local=local,
                           actor=self.worker_id, now=self.now)  # fmt: skip
        self.ctx.renew_executor = self._renew_executor
        self._executor_owned = False
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._kick = asyncio.Event()
        self._stopping = False
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        # The worker's own writes (claims, outcomes) go one at a time through one thread: they
        # never fight each other for SQLite's write lock, and outcomes are committed in groups.
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mssgw-queue-db")
        self._to_commit: list[tuple[Pending, asyncio.Future[bool]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._reserved = 0  # slots promised to messages being enqueued by this process (hand-off)
        # Whether the queue may hold ready messages we have not claimed: set by ``wake`` and by a
        # claim that filled every slot asked for; a completion then claims again.  Otherwise a
        # completion does not (each would be an empty claim transaction) and only the poll does.
        self._backlog = True

    def now(self) -> _dt.datetime:
        return self._now_override or self.clock()

    # --- lifecycle -----------------------------------------------------------------------

    def _ensure_executor(self) -> None:
        if self.ctx.executor is None and self._executor_kind not in (None, "inline"):
            self.ctx.executor, self._executor_owned = _make_executor(self._executor_kind, self._crypto_workers)

    def _renew_executor(self, broken: Executor) -> Executor | None:
        """A new crypto pool in place of ``broken`` (``Context.crypto``); the calls that saw the
        same break share the one replacement.  None for a pool we did not make (given by the caller)."""
        current = self.ctx.executor
        if current is not None and current is not broken:
            return current  # already replaced by a call that saw the same break
        if not self._executor_owned or self._stopping:
            return None
        log.warning("a crypto worker process died: its pool is replaced")
        broken.shutdown(wait=False, cancel_futures=True)
        self.ctx.executor, self._executor_owned = _make_executor(self._executor_kind, self._crypto_workers)
        return self.ctx.executor

    async def start(self) -> None:
        self._ensure_executor()
        self._stopping = False
        self._loop_ref = asyncio.get_running_loop()
        try:  # after a crash: spool files of finished messages (purge interrupted) or never committed
            removed = await self._loop_ref.run_in_executor(self._db, self.store.sweep_orphans)
        except Exception:  # the database is not answering: the next start sweeps
            log.exception("sweeping the spool failed")
        else:
            if removed:
                log.info("spool sweep removed %d file(s) of finished or never-accepted messages", removed)
        self._task = asyncio.create_task(self._loop(), name=f"mssgw-workers-{self.worker_id}")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Claim nothing more; let the attempts under way finish for ``grace`` seconds, then cut
        them (a peer may take 10 minutes to answer a final "."): a cut attempt keeps its lease
        and is redone by the next start or another node once the lease runs out, like a kill."""
        self._stopping = True
        self._kick.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._inflight:
            _, late = await asyncio.wait(set(self._inflight), timeout=grace)
            if late:
                log.warning("shutdown: %d attempt(s) still running after %.0fs are cut; each is redone "
                            "when its lease runs out", len(late), grace)  # fmt: skip
                for task in late:
                    task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
            self._committer = None
        self._db.shutdown(wait=True)
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mssgw-queue-db")  # threads start on use
        close = getattr(self.ctx.relay, "close", None)
        if close is not None:
            await close()
        if self._executor_owned and self.ctx.executor is not None:
            self.ctx.executor.shutdown(wait=True, cancel_futures=True)
            self.ctx.executor = None
            self._executor_owned = False

    def wake(self) -> None:
        """Something was enqueued: look for work now rather than at the next poll (thread-safe)."""
        loop = self._loop_ref
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: called from a thread
            if asyncio.get_running_loop() is loop:
                self._wake_now()
                return
        loop.call_soon_threadsafe(self._wake_now)

    def _wake_now(self) -> None:
        self._backlog = True
        self._kick.set()

    # --- hand-off: a message enqueued by this process, processed without a claim -----------------

    def reserve(self) -> str | None:
        """A slot for a message this process is about to enqueue: our worker id (store it as
        ``claimed_by``), or None when the workers are busy or not running (then it is
        claimed from the queue as usual).  On the event loop."""
        if self._stopping or self._task is None:
            return None
        if len(self._inflight) + self._reserved >= self.concurrency:
            return None
        self._reserved += 1
        return self.worker_id

    def cancel(self) -> None:
        """The reserved message was not stored (an error, a duplicate): give the slot back."""
        self._reserved = max(0, self._reserved - 1)
        self._kick.set()

    def take(self, row: dict[str, Any], data: bytes) -> None:
        """Process a message just stored with ``claimed_by=reserve()``, from memory.

        Saves the claim transaction and the spool read of every message this process
        accepts while a slot is free; its lease protects it like a claimed one.
        """
        self._reserved = max(0, self._reserved - 1)
        job = Job.from_columns(row)
        if self._stopping:  # stopping meanwhile: give the lease back so that the next start takes it
            self._db.submit(self.store.release, job.id, self.worker_id)
            return
        task = asyncio.create_task(self._handle((job, data)))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    async def _loop(self) -> None:
        polled = True
        while not self._stopping:
            free = self.concurrency - len(self._inflight) - self._reserved
            claimed: list[Claimed] = []
            # Claim in batches: with work in flight, wait until a quarter of the slots are free
            # (one claim transaction per several messages, not one per completion).
            if (self._backlog or polled) and free > 0 and (not self._inflight or free >= self.claim_batch):
                try:
                    claimed = await self._claim(free)
                    self._backlog = len(claimed) >= free
                except Exception:  # database outage: keep the loop alive, try again at the next poll
                    log.exception("claiming from the queue failed")
            for item in claimed:
                task = asyncio.create_task(self._handle(item))
                self._inflight.add(task)
                task.add_done_callback(self._done)
            # Fewer than asked: nothing else is ready. As many as asked: wait for a free slot.
            # Either way the next event (enqueue, completion) or the poll interval wakes us; the
            # poll also finds retries that came due and messages other nodes queued.
            polled = False
            try:
                await asyncio.wait_for(self._kick.wait(), self.poll_interval)
            except TimeoutError:
                polled = True
            self._kick.clear()

    async def _claim(self, limit: int) -> list[Claimed]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, self._claim_and_read, limit, self.now())

    def _claim_and_read(self, limit: int, now: _dt.datetime) -> list[Claimed]:
        """Claim up to ``limit`` messages and read their bytes, in the worker's database thread
        (in the claim's transaction when the spool is in the database: any node reads any message).

        One thread hop and one transaction for the whole batch: the rows come back with the claim.
        A spool file that cannot be read is reported with the job, which is then deferred.
        """
        return [(Job.from_columns(row), data)
                for row, data in self.store.claim_with_bytes(self.worker_id, limit=limit, now=now)]  # fmt: skip

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task failed: %r", task.exception())
        self._kick.set()

    # --- one round (tests, CLI "queue flush") -------------------------------------------------

    async def run_once(self, *, now: _dt.datetime | None = None, limit: int | None = None) -> int:
        """Claim what is ready at ``now`` and process it; returns how many messages were handled."""
        self._ensure_executor()
        self._now_override = now
        try:
            claimed = await self._claim(limit or self.concurrency)
            if claimed:
                await asyncio.gather(*(self._handle(item) for item in claimed))
            return len(claimed)
        finally:
            self._now_override = None

    async def drain(self, *, now: _dt.datetime | None = None, rounds: int = 20) -> int:
        """``run_once`` until nothing is ready (receipts created by a round are handled too)."""
        total = 0
        for _ in range(rounds):
            n = await self.run_once(now=now)
            if n == 0:
                break
            total += n
        return total

    # --- one message ------------------------------------------------------------------------------

    async def _handle(self, item: Claimed) -> None:
        job, data = item
        if isinstance(data, QueueError):
            log.error("processing %s failed: %s", job.id, data)
            await self._commit(job, Verdict().defer_rest(job, data, actor=self.worker_id))
            return
        t_start = time.perf_counter()
        renewer = asyncio.create_task(self._renew(job), name=f"mssgw-renew-{job.id}")
        # A claimed message may have been half done by a worker that died (a node SIGKILLed after
        # a local delivery, before its outcome committed): local delivery then writes it once.
        run = DELIVERY_RUN.set((job.id, job.claim_gen >= 1))
        try:
            verdict = await pipeline.run(self.ctx, job, data)
        finally:
            DELIVERY_RUN.reset(run)
            renewer.cancel()
        t_processed = time.perf_counter()
        done = await self._commit(job, verdict)
        t_end = time.perf_counter()
        log.debug("processed queue_id=%s origin=%s outcomes=%d done=%s ms=%.1f pipeline_ms=%.1f commit_ms=%.1f",
                  job.id, job.origin, len(verdict.outcomes), done, 1000 * (t_end - t_start),
                  1000 * (t_processed - t_start), 1000 * (t_end - t_processed))  # fmt: skip

    async def _renew(self, job: Job) -> None:
        """Extend the lease while a long attempt runs (a third of the lease each time), so that no
        other worker takes over a message we are still delivering; stops once the lease is lost."""
        period = max(0.05, self.store.lease.total_seconds() / 3)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)  # a timer, not a wait for an event: the lease is time-based
            try:
                held = await loop.run_in_executor(self._db, self.store.renew, job.id, self.worker_id,
                                                  job.claim_gen, self.now())  # fmt: skip
            except Exception:  # database outage: the lease may run out and the message be redone
                log.warning("renewing the lease of %s failed", job.id)
                continue
            if not held:
                return

    async def _commit(self, job: Job, batch: Verdict) -> bool:
        """The run's outcomes and the release, in one transaction shared with the messages that
        finished meanwhile (``gateway.queue.outcomes.commit_many``); returns whether it is done."""
        base = self.settings.queue.retry_base_seconds
        cap = self.settings.queue.retry_max_seconds
        now = self.now()

        def schedule(attempts: int) -> _dt.datetime:
            delay = backoff_delay(attempts, base, cap, self.rng)
            return min(now + _dt.timedelta(seconds=delay), job.expires_at)

        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._to_commit.append((Pending(job.id, self.worker_id, batch, schedule, job.claim_gen), done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._group_commit(), name=f"mssgw-commit-{self.worker_id}")
        return await done

    async def _group_commit(self) -> None:
        loop = asyncio.get_running_loop()
        while self._to_commit:
            items, self._to_commit = self._to_commit, []
            try:
                results = await loop.run_in_executor(
                    self._db, functools.partial(commit_many, self.factory, [p for p, _ in items],
                                                spool=self.store.spool, lifetime=self.store.lifetime))  # fmt: skip
            except Exception as exc:  # the lease expires and the messages are redone
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(items, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
            if any(p.batch.receipts for p, _ in items):
                self._wake_now()  # receipts were queued with these verdicts

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Workers({self.worker_id!r}, concurrency={self.concurrency})"
