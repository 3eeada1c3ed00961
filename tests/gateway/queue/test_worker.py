"""Queue workers: backoff schedule, the running loop, crypto in worker processes, errors never drop mail."""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import os
import random
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from datetime import timedelta

from directory import admin
from directory.db import transaction
from gateway.delivery.relay import Attempt, DsnRequest, Route
from gateway.process.common import POOL_RENEWALS
from gateway.queue.worker import Workers, backoff_delay

SENDER = "dr.martin@a.mssante.test"
LOCAL = "secretariat@a.mssante.test"
REMOTE = "ph@b.mssante.test"
MESSAGE = (f"From: {SENDER}\r\nTo: {LOCAL}\r\nSubject: test\r\nMessage-ID: <w1@a.mssante.test>\r\n\r\nbody\r\n").encode()


def test_backoff_doubles_is_jittered_and_capped() -> None:
    rng = random.Random(7)
    for attempts in range(1, 12):
        nominal = min(3600.0, 60.0 * 2 ** (attempts - 1))
        delays = [backoff_delay(attempts, 60.0, 3600.0, rng) for _ in range(50)]
        assert all(0.75 * nominal <= d <= min(3600.0, 1.25 * nominal) for d in delays)
        assert len(set(delays)) > 1  # jitter spreads retries
    assert backoff_delay(1, 60, 3600, random.Random(1)) < backoff_delay(4, 60, 3600, random.Random(1))
    assert backoff_delay(50, 60, 3600) <= 3600


class Recorder:
    """In-memory Maildir double; ``arrived`` is set (thread-safely) on each delivery."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expect: int = 1) -> None:
        self.loop = loop
        self.expect = expect
        self.delivered: list[tuple[str, str, bytes]] = []
        self.arrived = asyncio.Event()
        self.lock = threading.Lock()

    def deliver(self, address: str, data: bytes, *, folder: str = "INBOX", flags: str = "") -> str:
        with self.lock:
            self.delivered.append((address, folder, data))
            if len(self.delivered) >= self.expect:
                self.loop.call_soon_threadsafe(self.arrived.set)
        return "x"


class FailingRelay:
    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:
        raise RuntimeError("boom")


async def test_running_loop_delivers_after_wake(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    local = Recorder(asyncio.get_running_loop(), expect=1)  # INBOX (an ORG sender's client keeps its Sent copy)
    workers = Workers(settings, factory, store, local=local, crypto_executor="thread", poll_interval=30)
    await workers.start()
    try:
        qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
        workers.wake()  # without it the 30 s poll would make the wait below time out
        await asyncio.wait_for(local.arrived.wait(), 20)
    finally:
        await workers.stop()  # waits for the in-flight message to record its outcome
    info = store.get(qid)
    assert info["recipient_states"][0]["state"] == "delivered"
    assert [(a, f) for a, f, _ in local.delivered] == [(LOCAL, "INBOX")]
    # Delivered like a peer's mail: the original (no signature wrapper), its trace and the verification.
    delivered = local.delivered[0][2]
    assert b"multipart/signed" not in delivered and delivered.endswith(b"\r\n\r\nbody\r\n")
    assert delivered.startswith(f"Return-Path: <{SENDER}>\r\nAuthentication-Results: ".encode())
    assert b"smime=pass" in delivered and b"\r\nSubject: test\r\n" in delivered


async def test_sent_copy_only_for_software_and_the_api_unless_the_mailbox_says(operator) -> None:  # type: ignore[no-untyped-def]
    """People's clients save their own Sent copy; software (APP mailboxes, the HTTP API) does not."""
    settings, factory, store = operator
    local = Recorder(asyncio.get_running_loop())
    workers = Workers(settings, factory, store, local=local, crypto_executor="inline", poll_interval=30)

    async def sent_copies(origin: str) -> list[str]:
        local.delivered.clear()
        store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin=origin)
        assert await workers.run_once() == 1
        return [f for a, f, _ in local.delivered if a == SENDER]

    try:
        assert await sent_copies("submission") == []  # ORG, over SMTP: the client keeps its copy
        assert await sent_copies("api") == ["Sent"]  # the API: no client, the gateway keeps one
        with transaction(factory) as s:
            admin.set_sent_copy(s, SENDER, True)
        workers.ctx.plans.clear()  # the directory's answer is cached for PLAN_TTL seconds
        assert await sent_copies("submission") == ["Sent"]
        with transaction(factory) as s:
            admin.set_sent_copy(s, SENDER, None)
            admin.add_mailbox(s, SENDER, type="APP")
        workers.ctx.plans.clear()
        assert await sent_copies("submission") == ["Sent"]  # mailboxes.server_sent_copy = ["APP"]
        with transaction(factory) as s:
            admin.set_sent_copy(s, SENDER, False)
        workers.ctx.plans.clear()
        assert await sent_copies("api") == []
    finally:
        await workers.stop()


async def test_no_claim_after_a_completion_when_nothing_else_is_queued(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    local = Recorder(asyncio.get_running_loop(), expect=1)
    workers = Workers(settings, factory, store, local=local, crypto_executor="inline", poll_interval=30)
    claims: list[int] = []
    claim_rows = store.claim_rows

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        rows = claim_rows(*args, **kwargs)
        claims.append(len(rows))
        return rows

    store.claim_rows = counting
    await workers.start()
    try:
        store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission")
        workers.wake()
        await asyncio.wait_for(local.arrived.wait(), 20)
        await asyncio.gather(*list(workers._inflight))  # the outcome is committed, the loop kicked
        for _ in range(5):  # let the loop take the kick and, if it would, hand a claim to its thread
            await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(workers._db, lambda: None)  # after that claim
    finally:
        await workers.stop()
    # The claim that found the message is the last one: its completion claimed nothing more.
    assert claims[-1] == 1 and claims.count(1) == 1 and len(claims) <= 2


async def test_crypto_in_worker_processes(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    local = Recorder(asyncio.get_running_loop())
    workers = Workers(settings, factory, store, local=local, crypto_executor="process", crypto_workers=1)
    try:
        qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
        assert await workers.run_once() == 1
    finally:
        await workers.stop()
    assert store.get(qid)["recipient_states"][0]["state"] == "delivered"
    assert b"smime=pass" in local.delivered[0][2]  # signed and verified in the worker process


async def test_a_crypto_process_killed_is_replaced_and_mail_still_flows(operator) -> None:  # type: ignore[no-untyped-def]
    """A dead crypto process (SIGKILL, the out-of-memory killer) breaks its pool for good: without
    a new pool every later message would be deferred until the gateway restarts."""
    settings, factory, store = operator
    local = Recorder(asyncio.get_running_loop(), expect=2)
    workers = Workers(settings, factory, store, local=local, crypto_executor="process", crypto_workers=1)
    try:
        first = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
        assert await workers.run_once() == 1  # the pool's process is started and used
        children = multiprocessing.active_children()
        assert children
        for child in children:
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join()
        second = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
        assert await workers.run_once() == 1
    finally:
        await workers.stop()
    for qid in (first, second):
        info = store.get(qid)
        assert info["recipient_states"][0]["state"] == "delivered", info
    assert b"smime=pass" in local.delivered[1][2]  # signed and verified by the new pool


class AlwaysBroken(Executor):
    """A pool whose processes keep dying: every call breaks."""

    def __init__(self) -> None:
        self.calls = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.calls += 1
        raise BrokenProcessPool("a child process terminated abruptly")


async def test_a_pool_that_keeps_breaking_defers_with_a_sentence_and_no_traceback(operator, caplog) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    pools = [AlwaysBroken() for _ in range(POOL_RENEWALS + 1)]
    workers = Workers(settings, factory, store, local=Recorder(asyncio.get_running_loop()), crypto_executor=pools[0])
    fresh = iter(pools[1:])
    workers.ctx.renew_executor = lambda broken: next(fresh)  # each renewal dies too
    try:
        qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
        assert await workers.run_once() == 1
    finally:
        await workers.stop()
    (state,) = store.get(qid)["recipient_states"]
    assert state["state"] == "deferred"
    assert state["last_reply"] == "451 4.3.0 a crypto worker process stopped; will retry"  # no class name
    assert [p.calls for p in pools] == [1] * (POOL_RENEWALS + 1)
    assert not [r for r in caplog.records if r.exc_info]  # one line, no traceback


class StalledPeer:
    """A peer that never answers the final "." (within the 10 minutes RFC 5321 allows it)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:  # fmt: skip
        self.entered.set()
        await asyncio.Event().wait()  # no answer
        raise AssertionError("unreachable")


async def test_stop_cuts_an_attempt_that_outlives_its_grace_and_the_message_keeps_its_lease(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    peer = StalledPeer()
    workers = Workers(settings, factory, store, relay=peer, crypto_executor="thread", poll_interval=30)
    await workers.start()
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    workers.wake()
    await asyncio.wait_for(peer.entered.wait(), 20)
    await asyncio.wait_for(workers.stop(grace=0.2), 10)  # bounded, not the peer's 10 minutes
    info = store.get(qid)
    # not lost, not marked: redone when the lease runs out (the peer may still have taken it)
    assert info["recipient_states"][0]["state"] == "queued" and info["claimed_by"] == workers.worker_id


async def test_unexpected_error_defers_and_is_audited(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    from sqlalchemy import select

    from gateway.audit.models import AuditRecord

    workers = Workers(settings, factory, store, local=Recorder(asyncio.get_running_loop()), relay=FailingRelay(),
                      crypto_executor="inline")  # fmt: skip
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    now = dt.datetime.now(dt.UTC) + timedelta(seconds=1)
    assert await workers.run_once(now=now) == 1
    info = store.get(qid)
    rcpt = info["recipient_states"][0]
    assert rcpt["state"] == "deferred" and "internal error" in rcpt["last_reply"]
    assert dt.datetime.fromisoformat(info["next_attempt_at"]) > now
    assert info["claimed_by"] is None
    with factory() as s:
        assert s.scalar(select(AuditRecord).where(AuditRecord.event == "worker-error")) is not None


async def test_unreadable_spool_file_defers_and_is_audited(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    from sqlalchemy import select

    from gateway.audit.models import AuditRecord

    local = Recorder(asyncio.get_running_loop())
    workers = Workers(settings, factory, store, local=local, crypto_executor="inline")
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
    store.spool_path(qid).unlink()  # the bytes vanished (disk trouble, a careless admin)
    assert await workers.run_once() == 1
    info = store.get(qid)
    rcpt = info["recipient_states"][0]
    assert rcpt["state"] == "deferred" and "QueueError" in rcpt["last_reply"]
    assert info["claimed_by"] is None and not local.delivered
    with factory() as s:
        assert s.scalar(select(AuditRecord).where(AuditRecord.event == "worker-error",
                                                  AuditRecord.queue_id == qid)) is not None  # fmt: skip


async def test_next_attempt_never_after_expiry(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    workers = Workers(settings, factory, store, local=Recorder(asyncio.get_running_loop()), relay=FailingRelay(),
                      crypto_executor="inline")  # fmt: skip
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    expires = dt.datetime.fromisoformat(store.get(qid)["expires_at"])
    await workers.run_once(now=expires - timedelta(seconds=10))
    assert dt.datetime.fromisoformat(store.get(qid)["next_attempt_at"]) <= expires


def test_outcomes_of_several_messages_in_one_transaction(operator) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import event, select

    from gateway.audit.models import AuditRecord
    from gateway.audit.trail import AuditEvent
    from gateway.queue.models import RecipientState
    from gateway.queue.outcomes import Outcome, Pending, Verdict, commit_many

    _settings, factory, store = operator
    first = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL, REMOTE], origin="submission").queue_id
    second = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    assert sorted(store.claim("w1", limit=10)) == sorted([first, second])
    later = dt.datetime.now(dt.UTC) + timedelta(minutes=7)
    done_one = Verdict()
    done_one.add(Outcome(LOCAL, RecipientState.DELIVERED, "250 2.0.0 ok", "local"),
                 [AuditEvent("delivered-local", "accept", queue_id=first, recipient=LOCAL)])  # fmt: skip
    done_one.add(Outcome(REMOTE, RecipientState.DEFERRED, "451 4.4.1 later", "smime"))
    done_two = Verdict()
    done_two.add(Outcome(REMOTE, RecipientState.DELIVERED, "250 2.0.0 ok", "smime"),
                 [AuditEvent("relayed", "accept", queue_id=second, recipient=REMOTE)])  # fmt: skip
    commits: list[object] = []

    def on_commit(conn: object) -> None:
        commits.append(conn)

    engine = factory.kw["bind"]
    event.listen(engine, "commit", on_commit)
    try:
        done = commit_many(factory, [Pending(first, "w1", done_one, lambda attempts: later),
                                     Pending(second, "other-worker", done_two)])  # fmt: skip
    finally:
        event.remove(engine, "commit", on_commit)
    assert done == [False, True]
    assert len(commits) == 1  # one transaction for both messages
    one, two = store.get(first), store.get(second)
    assert {r["address"]: r["state"] for r in one["recipient_states"]} == {LOCAL: "delivered", REMOTE: "deferred"}
    assert one["claimed_by"] is None and dt.datetime.fromisoformat(one["next_attempt_at"]) == later.replace(microsecond=0)
    assert two["recipient_states"][0]["state"] == "delivered" and two["state"] == "done"
    assert two["claimed_by"] == "w1"  # not released: the claim is not other-worker's
    with factory() as s:
        assert {r.event for r in s.scalars(select(AuditRecord))} >= {"delivered-local", "relayed"}
