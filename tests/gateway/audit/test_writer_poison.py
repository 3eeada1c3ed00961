"""One bad audit record never wedges the writer (issue 10, item 2), on SQLite and PostgreSQL.

The records are the ones an SMTP client can cause: a path with a non-UTF-8 byte
(``surrogateescape`` leaves a lone surrogate), NUL, values longer than their
column (PostgreSQL raises where SQLite stores anything). A record the database
refuses anyway (a real trigger or CHECK constraint here) is replaced by an
``audit-unwritable`` record and the writer goes on; ``close`` ends even when the
database cannot be written at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from directory.db import make_engine, session_factory
from gateway.audit.storable import LENGTHS, storable
from gateway.audit.trail import AuditEvent, AuditWriter, append, query, verify
from gateway.config import load_settings
from gateway.queue.store import QueueError, QueueStore

BAD_PATH = b"\xff@x.example".decode("utf-8", "surrogateescape")  # what aiosmtpd hands over for the bytes


@pytest.fixture
def engine(operator_home: Path) -> Iterator[Engine]:
    engine = make_engine(load_settings(operator_home).database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def poison_events() -> list[AuditEvent]:
    return [
        AuditEvent("mail", "accept", sender=BAD_PATH, client="127.0.0.1"),
        AuditEvent("rcpt", "refuse", recipient="r@a.mssante.test\x00x", rule="r" * 300, reply="5" * 300),
        AuditEvent("auth", "refuse", actor="u" * 400, client="c" * 100, queue_id="q" * 40,
                   detail={BAD_PATH: [BAD_PATH, "\x00", datetime(2026, 1, 1, tzinfo=UTC)], "n": 1}),
        AuditEvent("e" * 50, "o" * 30),
        AuditEvent("data", "refuse", detail={"big": "x" * 100_000}),
    ]


def test_storable_escapes_and_cuts_to_the_column_lengths() -> None:
    ev = storable(AuditEvent("mail", "accept", sender=BAD_PATH, rule="r" * 300))
    assert ev.sender == "\\udcff@x.example" and ev.rule == "r" * LENGTHS["rule"]
    assert ev.detail == {"truncated": ["rule"]}
    assert LENGTHS["sender"] == 320 and LENGTHS["client"] == 64 and LENGTHS["outcome"] == 16
    clean = AuditEvent("rcpt", "accept", sender="a@a.mssante.test")
    assert storable(clean) is clean  # nothing to change: no copy on the hot path


@pytest.mark.parametrize("via_sink", [False, True], ids=["session", "queue-sink"])
async def test_poison_records_are_written_and_the_writer_goes_on(factory: sessionmaker[Session], tmp_path: Path,
                                                                  via_sink: bool) -> None:
    sink = QueueStore(factory, tmp_path / "spool").append_audit if via_sink else None
    writer = AuditWriter(factory, sink=sink, linger=0)
    writer.start()
    writer.submit(*poison_events())
    writer.submit(AuditEvent("connect", "info", client="127.0.0.2"))
    await writer.flush()
    await writer.close()
    with factory() as db:
        rows = query(db, limit=100)
        assert verify(db).ok
    assert [r["event"] for r in rows] == ["mail", "rcpt", "auth", "e" * 32, "data", "connect"]
    assert rows[0]["sender"] == "\\udcff@x.example"
    assert rows[1]["recipient"] == "r@a.mssante.test\\u0000x" and len(rows[1]["rule"]) == 64
    assert rows[1]["detail"] == {"truncated": ["rule", "reply"]}
    assert rows[2]["detail"]["\\udcff@x.example"][:2] == ["\\udcff@x.example", "\\u0000"]
    assert rows[4]["detail"] == {"detail_too_long": 100_011}
    assert writer.replaced == 0


def test_append_makes_riders_storable_in_the_message_transaction(factory: sessionmaker[Session],
                                                                  tmp_path: Path) -> None:
    """The original wedge: the bad MAIL record rode in an accepted message's transaction."""
    store = QueueStore(factory, tmp_path / "spool")
    for _ in range(2):
        store.enqueue(b"Subject: x\r\n\r\nx\r\n", sender="a@a.mssante.test", recipients=["b@a.mssante.test"],
                      origin="submission", riders=poison_events())
    with factory() as db, db.begin():
        append(db, poison_events())
        assert verify(db).ok and verify(db).records == 15


def _refuse_sender(engine: Engine, sender: str) -> None:
    """A real refusal by the database for one storable value (a trigger, a CHECK constraint)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text(
                "CREATE TRIGGER refuse_one BEFORE INSERT ON audit_records WHEN NEW.sender = :s "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END".replace(":s", f"'{sender}'")))
        else:
            conn.execute(text(f"ALTER TABLE audit_records ADD CONSTRAINT refuse_one CHECK (sender <> '{sender}')"))


@pytest.mark.parametrize("via_sink", [False, True], ids=["session", "queue-sink"])
async def test_a_refused_record_is_replaced_and_the_others_are_kept(engine: Engine, factory: sessionmaker[Session],
                                                                     tmp_path: Path, via_sink: bool) -> None:
    _refuse_sender(engine, "refused@x.example")
    sink = QueueStore(factory, tmp_path / "spool").append_audit if via_sink else None
    writer = AuditWriter(factory, sink=sink, linger=0)
    writer.start()
    writer.submit(AuditEvent("connect", "info", client="127.0.0.1"),
                  AuditEvent("mail", "accept", sender="refused@x.example", client="127.0.0.1"),
                  AuditEvent("rcpt", "accept", recipient="b@a.mssante.test"))
    await writer.flush()
    writer.submit(AuditEvent("connect", "info", client="127.0.0.3"))  # later records still go through
    await writer.close()
    with factory() as db:
        rows = query(db, limit=100)
        assert verify(db).ok
    assert [(r["event"], r["rule"]) for r in rows] == [
        ("connect", None), ("audit", "audit-unwritable"), ("rcpt", None), ("connect", None)]
    lost = rows[1]
    assert lost["sender"] is None and lost["detail"]["lost_event"] == "mail" and lost["outcome"] == "fail"
    assert writer.replaced == 1


async def test_close_finishes_when_nothing_can_be_written(engine: Engine, factory: sessionmaker[Session]) -> None:
    """A database that refuses everything (the table is gone): events kept, then close gives up in time."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_records"))
    writer = AuditWriter(factory, linger=0, retry_delay=0.05, close_timeout=0.5)
    writer.start()
    writer.submit(AuditEvent("connect", "info", client="127.0.0.1"))
    started = time.monotonic()
    await writer.close()
    assert time.monotonic() - started < 5 and writer.replaced == 0


def test_every_text_column_has_a_known_length() -> None:
    """A new ``String`` column without a length would escape the cut: PostgreSQL VARCHAR(n) raises."""
    assert all(length > 0 for length in LENGTHS.values())


async def test_a_refused_rider_fails_one_message_only(engine: Engine, factory: sessionmaker[Session],
                                                       tmp_path: Path) -> None:
    """The SMTP edge's way: MAIL/RCPT records ride in the accepted message's transaction and are
    given back when it fails. A given-back record is written by the writer alone, never lent again."""
    _refuse_sender(engine, "refused@x.example")
    store = QueueStore(factory, tmp_path / "spool")
    writer = AuditWriter(factory, sink=store.append_audit, linger=3600)  # nothing written unless flushed

    def accept(riders: list[AuditEvent]) -> bool:
        try:
            store.enqueue(b"Subject: x\r\n\r\nx\r\n", sender="a@a.mssante.test", recipients=["b@a.mssante.test"],
                          origin="submission", riders=riders)
        except QueueError:
            writer.submit(*riders)  # as gateway.smtp.server gives them back
            return False
        return True

    writer.start()
    writer.submit(AuditEvent("mail", "accept", sender="refused@x.example"), AuditEvent("rcpt", "accept"))
    assert not accept(writer.take_pending())  # the refused record fails this message...
    writer.submit(AuditEvent("mail", "accept", sender="c@a.mssante.test"))
    riders = writer.take_pending()
    assert [ev.sender for ev in riders] == ["c@a.mssante.test"] and accept(riders)  # ...and not the next
    await writer.close()
    with factory() as db:
        rows = query(db, limit=100)
        assert verify(db).ok
    assert sorted((r["event"], r["rule"]) for r in rows) == [
        ("audit", "audit-unwritable"), ("mail", None), ("rcpt", None)]
    assert writer.replaced == 1
