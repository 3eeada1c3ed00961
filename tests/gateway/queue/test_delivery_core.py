"""The queue's delivery core on both databases: quarantine parked, spool purge, the state table,
claim fencing, lease renewal, per-recipient dedupe, and private file modes.

Workers are the real ones (pipelines, group commit); local delivery is an in-memory Maildir
double that sets an event, so nothing waits on time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli.main import cli
from directory import admin
from directory.db import make_engine, session_factory, transaction
from gateway.audit.models import AuditRecord
from gateway.config import load_settings
from gateway.delivery.relay import Attempt, DsnRequest, Route
from gateway.queue.models import QueuedMessage, RecipientState
from gateway.queue.outcomes import Outcome, Pending, Verdict, commit_many
from gateway.queue.store import QueueError, QueueStore
from gateway.queue.worker import Workers

SENDER = "dr.martin@a.mssante.test"
LOCAL = "secretariat@a.mssante.test"
OTHER = "accueil@a.mssante.test"
REMOTE = "ph@b.mssante.test"
PEER = "lab@b.mssante.test"
MESSAGE = (f"From: {SENDER}\r\nTo: {LOCAL}\r\nSubject: s\r\nMessage-ID: <c1@a.mssante.test>\r\n\r\nbody\r\n").encode()


class Recorder:
    """In-memory Maildir double: ``arrived`` is set once ``expect`` deliveries happened."""

    def __init__(self, expect: int = 1) -> None:
        self.loop = asyncio.get_running_loop()
        self.expect = expect
        self.delivered: list[tuple[str, str]] = []
        self.arrived = asyncio.Event()

    def deliver(self, address: str, data: bytes, *, folder: str = "INBOX", flags: str = "") -> str:
        self.delivered.append((address, folder))
        if len(self.delivered) >= self.expect:
            self.loop.call_soon_threadsafe(self.arrived.set)
        return "x"


class DeferringRelay:
    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:
        return [Attempt(r, 451, "4.4.1", "451 4.4.1 try later") for r in recipients]


class BlockingRelay:
    """Holds the attempt until ``go`` is set: a long delivery."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:
        self.started.set()
        await self.go.wait()
        return [Attempt(r, 250, "2.0.0", "250 2.0.0 ok") for r in recipients]


@pytest.fixture
def operator(operator_home: Path) -> Iterator[tuple[object, object, QueueStore]]:
    settings = load_settings(operator_home)
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    with transaction(factory) as s:
        admin.trust_domain(s, "b.mssante.test", relay="127.0.0.1:9", operator_dn="CN=mx.b,O=B,C=FR")
        for addr in (SENDER, LOCAL, OTHER):
            admin.add_mailbox(s, addr, type="ORG")
    store = QueueStore(factory, settings.spool_dir, lease=timedelta(seconds=300))
    yield settings, factory, store
    engine.dispose()


def _quarantined(store: QueueStore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        q = store.enqueue(MESSAGE, sender=REMOTE, recipients=[LOCAL], origin="inbound", dedupe_key=f"b|{i}").queue_id
        store.set_recipient_state(q, LOCAL, RecipientState.QUARANTINED)
        ids.append(q)
    return ids


# --- item 2: quarantine is parked ------------------------------------------------------------------


async def test_hundred_quarantined_never_stall_a_deliverable_message(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    held = _quarantined(store, 100)
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
    local = Recorder()
    workers = Workers(settings, factory, store, local=local, relay=DeferringRelay(), crypto_executor="inline",
                      concurrency=16)  # fmt: skip
    try:
        assert await workers.run_once() == 1  # the deliverable one, at once
        assert await workers.run_once() == 0  # quarantine is never claimed
    finally:
        await workers.stop()
    assert store.get(qid)["recipient_states"][0]["state"] == "delivered"
    assert all(store.get(q)["parked"] for q in held[:3])
    assert len(store.quarantined(limit=1000)) == 100


async def test_worker_quarantine_parks_and_release_unparks(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    qid = store.enqueue(MESSAGE, sender=REMOTE, recipients=[LOCAL], origin="inbound", dedupe_key="b|x").queue_id
    workers = Workers(settings, factory, store, local=Recorder(), crypto_executor="inline")
    try:
        assert await workers.run_once() == 1  # not signed: quarantined by the inbound pipeline
        info = store.get(qid)
        assert info["recipient_states"][0]["state"] == "quarantined" and info["parked"]
        assert info["bytes"] == "kept" and store.spool_path(qid).exists()
        later = dt.datetime.now(dt.UTC) + timedelta(days=1)
        assert qid not in store.claim("other", now=later)  # parked: never claimed (its DSN may be)
        store.release_quarantine(qid)
        assert not store.get(qid)["parked"]
        assert await workers.run_once() == 1
    finally:
        await workers.stop()
    info = store.get(qid)
    assert info["recipient_states"][0]["state"] == "delivered"
    assert info["recipient_states"][0]["protection"] == "released-by-admin"
    with pytest.raises(QueueError, match="not in quarantine"):
        store.release_quarantine(qid)


# --- item 9: the bytes go when every recipient is final ----------------------------------------------


async def test_bytes_removed_once_final_kept_while_a_retry_needs_them(operator, operator_home: Path) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    done_id = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
    retry_id = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    workers = Workers(settings, factory, store, local=Recorder(), relay=DeferringRelay(), crypto_executor="inline")
    try:
        assert await workers.run_once() == 2
    finally:
        await workers.stop()
    assert not store.spool_path(done_id).exists()
    assert store.get(done_id)["bytes"] == "removed" and store.get(done_id)["bytes_removed_at"]
    with pytest.raises(QueueError, match="removed"):
        store.read(done_id)
    assert store.get(retry_id)["recipient_states"][0]["state"] == "deferred"
    assert store.spool_path(retry_id).exists() and store.read(retry_id) == MESSAGE

    runner = CliRunner()
    out = runner.invoke(cli, ["--data-dir", str(operator_home), "queue", "show", done_id, "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["bytes"] == "removed"
    out = runner.invoke(cli, ["--data-dir", str(operator_home), "queue", "list", "--all", "--json"])
    assert {m["id"]: m["bytes"] for m in json.loads(out.output)} == {done_id: "removed", retry_id: "kept"}
    out = runner.invoke(cli, ["--data-dir", str(operator_home), "queue", "delete", retry_id, "--reason", "test"])
    assert out.exit_code == 0 and not store.spool_path(retry_id).exists()
    assert store.get(retry_id)["bytes"] == "removed"


async def test_crash_between_final_commit_and_purge_is_never_claimable(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
    [row] = store.claim_rows("w1")
    batch = Verdict([Outcome(LOCAL, RecipientState.DELIVERED, "250 2.0.0 ok")])
    assert commit_many(factory, [Pending(qid, "w1", batch, None, row["claim_gen"])]) == [True]  # no purge: "crashed"
    assert store.spool_path(qid).exists()  # the row says done and removed; the file lingers
    assert store.claim("w2", now=dt.datetime.now(dt.UTC) + timedelta(days=9)) == []
    workers = Workers(settings, factory, store, local=Recorder(), crypto_executor="inline", poll_interval=30)
    await workers.start()  # the restart after the crash sweeps: finished, so removed whatever its age
    await workers.stop()
    assert not store.spool_path(qid).exists()


def test_concurrent_copies_on_two_nodes_store_each_recipient_once(operator) -> None:  # type: ignore[no-untyped-def]
    """Nodes with their own engines race to accept the same (key, recipient): exactly one stores it."""
    import threading

    settings, _factory, _store = operator
    nodes = [make_engine(settings.database_url) for _ in range(4)]
    stores = [QueueStore(session_factory(e), settings.spool_dir) for e in nodes]
    start = threading.Barrier(len(stores))
    results: list[bool] = []

    def accept(store: QueueStore) -> None:
        start.wait()
        results.append(store.enqueue(MESSAGE, sender=REMOTE, recipients=[LOCAL, OTHER], origin="inbound",
                                     dedupe_key="b|<race>").duplicate)  # fmt: skip

    threads = [threading.Thread(target=accept, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = stores[0].list(limit=100)
    for e in nodes:
        e.dispose()
    assert sorted(results) == [False, True, True, True]
    assert len(held) == 1


# --- item 5: lease renewal (the state table and fencing: test_outcomes.py) -----------------------------


async def test_lease_renewed_while_a_long_attempt_runs(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, _store = operator
    store = QueueStore(factory, settings.spool_dir, lease=timedelta(seconds=0.6))
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    relay = BlockingRelay()
    renewed = asyncio.Event()
    renew = store.renew
    loop = asyncio.get_running_loop()
    leases: list[dt.datetime] = []

    def watching(*args, **kwargs):  # type: ignore[no-untyped-def]
        before = _lease(factory, qid)
        held = renew(*args, **kwargs)
        leases.append(before)
        loop.call_soon_threadsafe(renewed.set)
        return held

    store.renew = watching  # type: ignore[method-assign]
    workers = Workers(settings, factory, store, local=Recorder(), relay=relay, crypto_executor="inline")
    run = asyncio.create_task(workers.run_once())
    try:
        await asyncio.wait_for(relay.started.wait(), 20)
        await asyncio.wait_for(renewed.wait(), 20)
        assert _lease(factory, qid) > leases[0]
        assert store.claim("intruder", now=leases[0] + timedelta(milliseconds=1)) == []  # would have expired
        relay.go.set()
        assert await run == 1
    finally:
        relay.go.set()
        await workers.stop()
    assert store.get(qid)["recipient_states"][0]["state"] == "delivered"


def _lease(factory, qid: str) -> dt.datetime:  # type: ignore[no-untyped-def]
    with factory() as s:
        value = s.get(QueuedMessage, qid).lease_until
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# --- item 1: dedupe per recipient --------------------------------------------------------------------


def test_dedupe_is_per_recipient(operator) -> None:  # type: ignore[no-untyped-def]
    _settings, _factory, store = operator
    first = store.enqueue(MESSAGE, sender=REMOTE, recipients=[LOCAL], origin="inbound", dedupe_key="b|<m>")
    second = store.enqueue(MESSAGE, sender=REMOTE, recipients=[OTHER], origin="inbound", dedupe_key="b|<m>")
    assert not first.duplicate and not second.duplicate and second.queue_id != first.queue_id
    again = store.enqueue(MESSAGE, sender=REMOTE, recipients=[LOCAL.upper()], origin="inbound", dedupe_key="b|<m>")
    assert again.duplicate and again.queue_id == first.queue_id
    assert not store.spool_path(again.queue_id).name.startswith(".")  # nothing new on disk
    mixed = store.enqueue(MESSAGE, sender=REMOTE, recipients=[LOCAL, PEER], origin="inbound", dedupe_key="b|<m>")
    assert not mixed.duplicate
    assert [r["address"] for r in store.get(mixed.queue_id)["recipient_states"]] == [PEER]
    assert len(store.list(limit=100)) == 3


# --- item 13: private files --------------------------------------------------------------------------


def test_database_and_spool_are_private(operator, operator_home: Path) -> None:  # type: ignore[no-untyped-def]
    settings, _factory, store = operator
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
    if settings.database_url.startswith("sqlite"):
        db = Path(settings.database_url.split("///", 1)[1])
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    spool = store.spool_path(qid)
    assert stat.S_IMODE(spool.stat().st_mode) == 0o600
    for folder in (spool.parent, settings.spool_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


# --- items 7 and 8: a long reply fits the audit, one log line per attempt -------------------------------


class LongReplyRelay:
    """A peer whose 250 reply is long (queue ids, greetings): more than the audit's 64 characters."""

    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:
        text = "2.0.0 Ok: queued as " + "Q" * 200 + " thanks"
        return [Attempt(r, 250, "2.0.0", f"250 {text}", "mx.b.mssante.test:25") for r in recipients]


async def test_long_peer_reply_is_recorded_once_and_logged_postfix_style(operator, caplog) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    workers = Workers(settings, factory, store, local=Recorder(), relay=LongReplyRelay(), crypto_executor="inline")
    caplog.set_level("INFO", logger="mssgw.delivery")
    try:
        assert await workers.run_once() == 1
        assert await workers.run_once(now=dt.datetime.now(dt.UTC) + timedelta(hours=1)) == 0  # not resent
    finally:
        await workers.stop()
    info = store.get(qid)
    assert info["recipient_states"][0]["state"] == "delivered"
    assert info["recipient_states"][0]["last_reply"].endswith("thanks")  # the whole reply, in a Text column
    with factory() as s:
        replies = list(s.scalars(select(AuditRecord.reply).where(AuditRecord.queue_id == qid,
                                                                 AuditRecord.event == "relayed")))  # fmt: skip
    assert replies == ["250 2.0.0"]  # what the String(64) column is for, written as such by the caller
    lines = [r.getMessage() for r in caplog.records if r.name == "mssgw.delivery"]
    assert len(lines) == 1
    assert lines[0].startswith(f"queue_id={qid} to=<{REMOTE}> relay=mx.b.mssante.test:25 delay=")
    assert lines[0].endswith("status=sent (250 2.0.0)") and "QQQ" not in lines[0]


async def test_deferred_and_local_attempts_are_logged(operator, caplog) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE, LOCAL], origin="submission")
    workers = Workers(settings, factory, store, local=Recorder(), relay=DeferringRelay(), crypto_executor="inline")
    caplog.set_level("INFO", logger="mssgw.delivery")
    try:
        await workers.run_once()
    finally:
        await workers.stop()
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "mssgw.delivery")
    assert any(f"to=<{REMOTE}>" in ln and "status=deferred (451 4.4.1)" in ln for ln in lines), lines
    assert any(f"to=<{LOCAL}> relay=local" in ln and "status=sent (250 2.0.0)" in ln for ln in lines), lines
    assert all("Subject" not in ln and "body" not in ln for ln in lines)
