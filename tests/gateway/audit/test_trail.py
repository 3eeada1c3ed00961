"""The hash-chained audit trail on SQLite and PostgreSQL: tampering is found and located; purge keeps proof."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from directory.db import make_engine, session_factory
from gateway.audit.models import AuditRecord
from gateway.audit.trail import AuditEvent, AuditWriter, append, purge, query, verify
from gateway.config import load_settings


@pytest.fixture
def factory(operator_home: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(load_settings(operator_home).database_url)
    yield session_factory(engine)
    engine.dispose()


def fill(factory: sessionmaker[Session], n: int = 5, ts: datetime | None = None) -> None:
    with factory() as db, db.begin():
        append(db, [AuditEvent("rcpt", "accept", sender="a@a.mssante.test", recipient=f"r{i}@a.mssante.test",
                               rule="known-recipient", ts=ts) for i in range(n)])


def test_intact_chain_verifies(factory: sessionmaker[Session]) -> None:
    fill(factory)
    with factory() as db:
        result = verify(db)
    assert result.ok and result.records == 5 and result.summary().startswith("audit trail intact: 5 records")


def test_edited_record_is_located(factory: sessionmaker[Session]) -> None:
    fill(factory)
    with factory() as db, db.begin():
        db.execute(update(AuditRecord).where(AuditRecord.seq == 3).values(recipient="someone@else.test"))
    with factory() as db:
        result = verify(db)
    assert not result.ok and result.broken_at == 3 and "edited" in (result.problem or "")


def test_deleted_record_is_located(factory: sessionmaker[Session]) -> None:
    fill(factory)
    with factory() as db, db.begin():
        db.execute(delete(AuditRecord).where(AuditRecord.seq == 2))
    with factory() as db:
        result = verify(db)
    assert not result.ok and result.broken_at == 2 and "missing" in (result.problem or "")


def test_purge_keeps_the_chain_verifiable(factory: sessionmaker[Session]) -> None:
    fill(factory, 3, ts=datetime.now(UTC) - timedelta(days=400))
    fill(factory, 2)
    with factory() as db, db.begin():
        assert purge(db, older_than=timedelta(days=183)) == 3
    with factory() as db:
        assert verify(db).ok
        assert [r["event"] for r in query(db)] == ["rcpt", "rcpt", "retention"]


async def test_writer_batches_and_flushes(factory: sessionmaker[Session]) -> None:
    writer = AuditWriter(factory)
    writer.start()
    for i in range(50):
        writer.submit(AuditEvent("connect", "info", client=f"127.0.0.{i}"))
    await writer.close()
    with factory() as db:
        assert len(query(db, event="connect", limit=100)) == 50 and verify(db).ok
    await asyncio.sleep(0)


def test_purging_every_record_keeps_the_numbering(factory: sessionmaker[Session]) -> None:
    """The retention record continues the sequence: seals of the removed records still place them."""
    fill(factory, 3, ts=datetime.now(UTC) - timedelta(days=400))
    with factory() as db, db.begin():
        assert purge(db, older_than=timedelta(days=183)) == 3
    with factory() as db:
        result = verify(db)
        assert result.ok and (result.first_seq, result.last_seq) == (4, 4)
