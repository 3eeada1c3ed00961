"""The durable queue on SQLite and PostgreSQL: enqueue, read back, dedupe, admin actions, audit atomicity."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from directory.db import make_engine, session_factory
from gateway.audit.trail import AuditEvent, query, verify
from gateway.config import load_settings
from gateway.queue.models import RecipientState
from gateway.queue.store import QueueError, QueueStore, new_queue_id, now_utc

DATA = b"From: a@a.mssante.test\r\nSubject: x\r\n\r\nbody\r\n"


@pytest.fixture
def factory(operator_home: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(load_settings(operator_home).database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def store(operator_home: Path, factory: sessionmaker[Session]) -> QueueStore:
    return QueueStore(factory, load_settings(operator_home).spool_dir)


def test_enqueue_is_durable_and_audited_in_one_transaction(store: QueueStore,
                                                           factory: sessionmaker[Session]) -> None:
    chosen = new_queue_id()
    event = AuditEvent("accept", "accept", sender="a@a.mssante.test", recipient="b@a.mssante.test")
    result = store.enqueue(DATA, sender="a@a.mssante.test", recipients=["b@a.mssante.test", "b@a.mssante.test"],
                           origin="submission", queue_id=chosen, audit_events=[event])
    assert result.queue_id == chosen and not result.duplicate
    assert store.read(chosen) == DATA
    row = store.get(chosen)
    assert row["sha256"] == hashlib.sha256(DATA).hexdigest() and row["recipients"] == 1
    assert store.spool_path(chosen).stat().st_mode & 0o777 == 0o600
    with factory() as db:
        records = query(db, event="accept")
        assert [r["queue_id"] for r in records] == [chosen] and verify(db).ok


def test_failed_commit_leaves_neither_row_nor_file_nor_audit(store: QueueStore,
                                                             factory: sessionmaker[Session]) -> None:
    first = store.enqueue(DATA, sender="a@a.mssante.test", recipients=["b@a.mssante.test"], origin="submission")
    with pytest.raises(QueueError):  # the same id again: the commit fails
        store.enqueue(DATA, sender="a@a.mssante.test", recipients=["b@a.mssante.test"], origin="submission",
                      queue_id=first.queue_id, audit_events=[AuditEvent("accept", "accept")])
    assert [r["id"] for r in store.list()] == [first.queue_id]
    assert store.read(first.queue_id) == DATA  # the first message's bytes were not touched
    with factory() as db:
        assert query(db, event="accept") == []


def test_dedupe_key_acknowledges_without_storing_twice(store: QueueStore) -> None:
    kwargs = {"sender": "d@b.mssante.test", "recipients": ["b@a.mssante.test"], "origin": "inbound",
              "peer_operator": "b.mssante.test", "dedupe_key": "b.mssante.test|<m@b>"}
    first = store.enqueue(DATA, **kwargs)  # type: ignore[arg-type]
    again = store.enqueue(DATA, **kwargs)  # type: ignore[arg-type]
    assert again.duplicate and again.queue_id == first.queue_id
    assert len(store.list()) == 1
    assert len(list(store.spool_dir.glob("*/*"))) == 1


def test_admin_actions(store: QueueStore) -> None:
    q = store.enqueue(DATA, sender="a@a.mssante.test", recipients=["b@a.mssante.test"], origin="inbound").queue_id
    with pytest.raises(QueueError, match="no recipient waiting"):
        store.set_recipient_state(q, "b@a.mssante.test", RecipientState.DELIVERED)
        store.retry(q)
    q2 = store.enqueue(DATA, sender="a@a.mssante.test", recipients=["c@a.mssante.test"], origin="inbound").queue_id
    store.set_recipient_state(q2, "c@a.mssante.test", RecipientState.QUARANTINED)
    assert [m["id"] for m in store.quarantined()] == [q2]
    assert store.release_quarantine(q2) == 1
    assert store.retry(q2) == 1
    assert store.delete(q2, reason="sent by mistake") == 1
    assert not store.spool_path(q2).exists()
    assert store.list() == []
    assert {m["id"] for m in store.list(include_done=True)} == {q, q2}


def test_retry_keeps_the_lease_of_an_attempt_under_way(store: QueueStore) -> None:
    """A retry (``mssgw queue retry``, or the trust watcher when a peer's entry changes) while a
    worker relays the message must not let a second worker take it: the peer would get it twice."""
    q = store.enqueue(DATA, sender="a@a.mssante.test", recipients=["b@b.mssante.test"], origin="submission").queue_id
    t0 = now_utc()
    assert store.claim("w1", now=t0) == [q]
    assert store.retry(q, now=t0 + timedelta(seconds=1)) == 1
    assert store.claim("w2", now=t0 + timedelta(seconds=2)) == []  # another node, or the next poll
    held = store.get(q)
    assert held["claimed_by"] == "w1" and held["lease_until"] == (t0 + store.lease).isoformat(timespec="seconds")
    # w1 died: the message is due the moment its lease runs out (the retry made it due)
    assert store.claim("w2", now=t0 + store.lease + timedelta(seconds=1)) == [q]
    # a retry after a holder's lease ran out frees the message at once
    late = t0 + 3 * store.lease
    assert store.retry(q, now=late) == 1
    assert store.get(q)["claimed_by"] is None
    assert store.claim("w3", now=late) == [q]


def test_releasing_a_quarantined_recipient_keeps_the_lease_of_an_attempt_under_way(store: QueueStore) -> None:
    """One recipient held in quarantine, another being relayed: the release must not let a second
    worker take the message while the first still relays it to the other recipient."""
    q = store.enqueue(DATA, sender="d@b.mssante.test", recipients=["x@a.mssante.test", "y@c.mssante.test"],
                      origin="inbound").queue_id  # fmt: skip
    store.set_recipient_state(q, "x@a.mssante.test", RecipientState.QUARANTINED)
    t0 = now_utc()
    assert store.claim("w1", now=t0) == [q]  # for y
    assert store.release_quarantine(q) == 1
    assert store.claim("w2", now=t0 + timedelta(seconds=2)) == []
    assert store.get(q)["claimed_by"] == "w1"


def test_group_commit_of_concurrent_messages_each_with_its_own_outcome(store: QueueStore,
                                                                       factory: sessionmaker[Session]) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    taken = store.enqueue(DATA, sender="a@a.mssante.test", recipients=["b@a.mssante.test"], origin="submission")
    store.spool_path(taken.queue_id).unlink()  # so that reusing its id fails in the database, inside a group
    gate = threading.Event()
    real_run = store.group.run

    def slow_first(item):  # type: ignore[no-untyped-def]
        gate.wait(5)  # hold the callers so they pile up behind one commit
        real_run(item)

    store.group.run = slow_first  # type: ignore[method-assign]

    def one(n: int) -> str:
        # member 3 reuses a stored id: only it fails; members 5 and 6 carry one dedupe key: one is a duplicate
        try:
            result = store.enqueue(DATA, sender="a@a.mssante.test", recipients=["b@a.mssante.test"],
                                   origin="submission", queue_id=taken.queue_id if n == 3 else None,
                                   dedupe_key="b.mssante.test|<same@b>" if n in (5, 6) else None,
                                   audit_events=[AuditEvent("accept", "accept", detail={"n": n})])
        except QueueError:
            return "error"
        return "duplicate" if result.duplicate else result.queue_id

    commits_before = store.group.commits
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, n) for n in range(12)]
        gate.set()
        results = [f.result() for f in futures]
    assert results.count("error") == 1 and results[3] == "error"
    assert results.count("duplicate") == 1 and "duplicate" in (results[5], results[6])
    stored = [r for r in results if r not in ("error", "duplicate")]
    assert len(set(stored)) == 10 and all(store.read(q) == DATA for q in stored)
    assert store.group.commits - commits_before < 12  # several messages per transaction
    assert {r["id"] for r in store.list()} == {taken.queue_id, *stored}
    assert len(list(store.spool_dir.glob("*/*"))) == 10  # no file left by the failed or duplicate member
    with factory() as db:
        assert len(query(db, event="accept")) == 10 and verify(db).ok


def test_audit_batches_ride_in_the_group_commit(store: QueueStore, factory: sessionmaker[Session]) -> None:
    store.append_audit([AuditEvent("connect", "info", client="192.0.2.1")])
    store.append_audit([])
    with factory() as db:
        assert [r["client"] for r in query(db, event="connect")] == ["192.0.2.1"] and verify(db).ok
