"""The ``Spool`` contract, the same tests for both implementations on both databases.

Spool files and ``queue_spool`` rows must behave alike where the queue can tell: accepted bytes
are readable by a claim, a failed acceptance leaves no bytes, receipts are stored with the
verdict that asks for them, and the bytes go when the message is final.  Where they differ
(when the bytes go relative to the commit), each test says what each must do.  Real SQLite and
PostgreSQL; the only fault injected is a database error raised inside the transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from directory.db import make_engine, session_factory
from gateway.audit.trail import AuditEvent, verify
from gateway.config import load_settings
from gateway.process.verdict import Outcome, Receipt, Verdict
from gateway.queue import admission, outcomes
from gateway.queue.models import QueuedBytes, RecipientState
from gateway.queue.spool import DatabaseSpool, FileSpool, Spool, spool_for
from gateway.queue.store import QueueError, QueueStore

DATA = b"From: a@a.mssante.test\r\nSubject: x\r\n\r\n" + bytes(range(256)) * 40  # every byte value
SENDER, RCPT = "a@a.mssante.test", "b@a.mssante.test"


@pytest.fixture(params=["files", "database"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def factory(operator_home: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(load_settings(operator_home).database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def store(operator_home: Path, factory: sessionmaker[Session], kind: str) -> QueueStore:
    spool_dir = load_settings(operator_home).spool_dir
    spool: Spool = FileSpool(spool_dir) if kind == "files" else DatabaseSpool(factory)
    return QueueStore(factory, spool_dir, spool=spool)


def rows_in_database(factory: sessionmaker[Session]) -> int:
    with factory() as db:
        return int(db.scalar(select(func.count()).select_from(QueuedBytes)) or 0)


def test_accepted_bytes_are_read_back_and_claimed_with_their_row(store: QueueStore,
                                                                factory: sessionmaker[Session]) -> None:
    qid = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission").queue_id
    assert store.spool.holds(qid) and store.read(qid) == DATA
    [(row, data)] = store.claim_with_bytes("w1")
    assert row["id"] == qid and data == DATA
    # Where the bytes are: a row of the database, or a file and no row.
    assert rows_in_database(factory) == (1 if store.spool.in_database else 0)


def test_a_failed_acceptance_leaves_no_bytes(store: QueueStore, factory: sessionmaker[Session],
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def database_hiccup(conn, events):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT INTO audit_records", {}, Exception("disk I/O error"))

    monkeypatch.setattr(admission, "append", database_hiccup)
    chosen = "ab" * 16
    with pytest.raises(QueueError):
        store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission", queue_id=chosen,
                      audit_events=[AuditEvent("accept", "accept")])  # fmt: skip
    assert not store.spool.holds(chosen) and rows_in_database(factory) == 0
    assert store.list() == []


def test_a_duplicate_stores_no_second_copy(store: QueueStore, factory: sessionmaker[Session]) -> None:
    first = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="inbound", dedupe_key="peer|<m1>")
    again = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="inbound", dedupe_key="peer|<m1>")
    assert again.duplicate and again.queue_id == first.queue_id
    assert rows_in_database(factory) == (1 if store.spool.in_database else 0)
    if isinstance(store.spool, FileSpool):
        assert [p.name for p in store.spool.files()] == [first.queue_id]


def test_the_final_verdict_removes_the_bytes_and_stores_its_receipt(store: QueueStore,
                                                                  factory: sessionmaker[Session]) -> None:
    qid = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission").queue_id
    [row] = store.claim_rows("w1")
    dsn = Receipt(b"From: MAILER-DAEMON\r\n\r\nbounced\r\n", "dsn", "", SENDER, qid)
    verdict = Verdict([Outcome(RCPT, RecipientState.BOUNCED, "550 5.1.1 no")], receipts=[dsn])
    assert outcomes.commit_many(factory, [outcomes.Pending(qid, "w1", verdict, None, row["claim_gen"])],
                                spool=store.spool) == [True]  # fmt: skip
    assert not store.spool.holds(qid)  # bytes of a final message go (files right after the commit)
    assert store.get(qid)["bytes"] == "removed"
    [(receipt_row, data)] = store.claim_with_bytes("w2")
    assert receipt_row["kind"] == "dsn" and receipt_row["related_id"] == qid and data == dsn.data
    with factory() as db:
        assert verify(db).ok


def test_a_failed_verdict_commit_keeps_the_bytes_and_stores_no_receipt(store: QueueStore,
                                                                       factory: sessionmaker[Session],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    qid = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission").queue_id
    [row] = store.claim_rows("w1")
    dsn = Receipt(b"From: MAILER-DAEMON\r\n\r\nbounced\r\n", "dsn", "", SENDER, qid)
    verdict = Verdict([Outcome(RCPT, RecipientState.BOUNCED, "550 5.1.1 no")], receipts=[dsn])

    def database_hiccup(conn, events):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT INTO audit_records", {}, Exception("disk I/O error"))

    monkeypatch.setattr(outcomes, "append", database_hiccup)
    with pytest.raises(OperationalError):
        outcomes.commit_many(factory, [outcomes.Pending(qid, "w1", verdict, None, row["claim_gen"])],
                             spool=store.spool)  # fmt: skip
    monkeypatch.undo()
    assert store.read(qid) == DATA and store.get(qid)["recipient_states"][0]["state"] == "queued"
    assert [m["id"] for m in store.list(include_done=True)] == [qid]  # no receipt row
    assert rows_in_database(factory) == (1 if store.spool.in_database else 0)
    if isinstance(store.spool, FileSpool):
        assert [p.name for p in store.spool.files()] == [qid]  # no orphan receipt file


def test_an_admin_delete_removes_the_bytes(store: QueueStore) -> None:
    qid = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission").queue_id
    assert store.delete(qid, reason="test") == 1
    assert not store.spool.holds(qid) and store.get(qid)["bytes"] == "removed"
    with pytest.raises(QueueError, match="removed"):
        store.read(qid)


def test_missing_bytes_are_reported_with_the_claim(store: QueueStore, factory: sessionmaker[Session]) -> None:
    qid = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission").queue_id
    if isinstance(store.spool, FileSpool):
        store.spool.path(qid).unlink()  # lost outside the gateway
    else:
        with factory() as db, db.begin():
            store.spool.drop(db.connection(), [qid])
    [(row, data)] = store.claim_with_bytes("w1")
    assert row["id"] == qid and isinstance(data, QueueError) and qid in str(data)
    with pytest.raises(QueueError, match="cannot be read"):
        store.read(qid)


def test_the_sweep_removes_bytes_of_finished_messages_only(store: QueueStore, factory: sessionmaker[Session]) -> None:
    done = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission").queue_id
    waiting = store.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission").queue_id
    [row] = store.claim_rows("w1", limit=1)
    verdict = Verdict([Outcome(RCPT, RecipientState.DELIVERED, "250 2.0.0 ok")])
    # A crash between the final commit and the removal of files: committed without the spool.
    assert outcomes.commit_many(factory, [outcomes.Pending(row["id"], "w1", verdict, None, row["claim_gen"])])
    finished = row["id"]
    assert store.spool.holds(finished)
    assert store.sweep_orphans(older_than=3600) == 1
    assert not store.spool.holds(finished) and store.spool.holds(waiting if finished == done else done)


def test_spool_for_follows_the_database(factory: sessionmaker[Session], tmp_path: Path) -> None:
    spool = spool_for(factory, tmp_path / "spool")
    bind = factory.kw["bind"]
    assert isinstance(spool, DatabaseSpool if bind.dialect.name == "postgresql" else FileSpool)
    store = QueueStore.for_database(factory, tmp_path / "spool", lifetime=dt.timedelta(hours=1))
    assert type(store.spool) is type(spool)


def test_files_queued_before_the_switch_to_the_database_are_read_and_removed(operator_home: Path,
                                                                            factory: sessionmaker[Session]) -> None:
    """An install that queued spool files, then opens the database spool (the upgrade): nothing strands."""
    spool_dir = load_settings(operator_home).spool_dir
    before = QueueStore(factory, spool_dir, spool=FileSpool(spool_dir))
    qid = before.enqueue(DATA, sender=SENDER, recipients=[RCPT], origin="submission").queue_id
    after = QueueStore(factory, spool_dir, spool=DatabaseSpool(factory, FileSpool(spool_dir)))
    assert after.spool.holds(qid) and rows_in_database(factory) == 0
    [(row, data)] = after.claim_with_bytes("w1")
    assert data == DATA
    verdict = Verdict([Outcome(RCPT, RecipientState.DELIVERED, "250 2.0.0 ok")])
    assert outcomes.commit_many(factory, [outcomes.Pending(qid, "w1", verdict, None, row["claim_gen"])],
                                spool=after.spool) == [True]  # fmt: skip
    assert not FileSpool(spool_dir).holds(qid) and not after.spool.holds(qid)
