"""The writer notices a tampered head (issue 10, item 8 follow-up; tester's finding 203).

The database owner deletes records of the unsealed tail (by hand between two writes, or
with a SQLite trigger that deletes rows as they are inserted). The running writer must not
chain over the gap nor seal it cleanly: it writes an ``audit-chain-break`` record, its next
seal names the break, and ``mssgw audit verify`` exits 1 naming the lost seqs. Other writers
(a second engine standing for another node, the CLI) appending after it, a rolled-back
append and a legitimate purge are not breaks. Real SQLite and PostgreSQL, real operator
key, the CLI through click's runner; the database owner works through its own engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from cli.main import cli
from directory.db import make_engine, session_factory, write_connection
from gateway.audit.models import AuditRecord
from gateway.audit.seal import Sealer, seals_path
from gateway.audit.trail import AuditEvent, AuditWriter, append, purge
from gateway.audit.watch import BREAK_EVENT
from gateway.config import load_settings


@pytest.fixture
def engine(operator_home: Path) -> Iterator[Engine]:
    engine = make_engine(load_settings(operator_home).database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def owner(operator_home: Path) -> Iterator[sessionmaker[Session]]:
    """The database owner (or another node): its own engine, so none of the writer's memory."""
    engine = make_engine(load_settings(operator_home).database_url)
    yield session_factory(engine)
    engine.dispose()


def run(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    return result.exit_code, result.output


def guess(i: int, client: str = "127.0.0.5") -> AuditEvent:
    return AuditEvent("auth", "refuse", actor="dave@a.mssante.test", client=client, rule="bad-credentials",
                      reply="535 5.7.8", detail={"attempt": i})


def writer_for(home: Path, engine: Engine) -> AuditWriter:
    factory = session_factory(engine)
    sealer = Sealer.for_settings(load_settings(home), factory, every_seconds=3600, poll=3600)
    return AuditWriter(factory, linger=0, sealer=sealer)


def breaks(factory: sessionmaker[Session]) -> list[dict[str, object]]:
    with factory() as db:
        return [json.loads(d) for d in db.scalars(select(AuditRecord.detail).where(AuditRecord.event == BREAK_EVENT)
                                                  .order_by(AuditRecord.seq))]


def last_seal(home: Path) -> dict[str, object]:
    return dict(json.loads(seals_path(home).read_text().splitlines()[-1]))


async def test_deleting_the_unsealed_tail_between_two_writes_is_reported(
        operator_home: Path, engine: Engine, owner: sessionmaker[Session], caplog: pytest.LogCaptureFixture) -> None:
    writer = writer_for(operator_home, engine)
    writer.start()
    writer.submit(AuditEvent("start", "info", actor="localhost"))
    await writer.flush()
    assert run(operator_home, "audit", "seal")[0] == 0  # seq 1 sealed
    writer.submit(*(guess(i) for i in range(3)))  # seqs 2..4: the unsealed tail
    await writer.flush()
    with owner() as db, db.begin():
        db.execute(delete(AuditRecord).where(AuditRecord.seq >= 2))
    with caplog.at_level(logging.ERROR, logger="mssgw.audit"):
        writer.submit(AuditEvent("connect", "accept", client="127.0.0.9"))  # the next write sees the head at 1
        await writer.flush()
        await writer.close()  # seals
    found = breaks(owner)
    assert found == [{"expected_seq": 4, "expected_hash": found[0]["expected_hash"], "found": "head-below",
                      "head_seq": 1, "lost_from": 2, "lost_through": 4}]
    assert [r.message for r in caplog.records] == [
        "audit chain break: records seq 2..4 written by the gateway were deleted (the head went back to seq 1)"]
    seal = last_seal(operator_home)
    assert seal["head_seq"] == 3 and seal["breaks"] == found  # break record at 2, the new record at 3
    code, out = run(operator_home, "audit", "verify")
    assert code == 1, out
    assert "audit trail intact: 3 records" in out  # the chain alone cannot see it
    assert "seal #2 BROKEN (break): records seq 2..4 written by the gateway were deleted" in out
    report = json.loads(run(operator_home, "audit", "verify", "--json")[1])
    assert [p["kind"] for p in report["seals"]["problems"]] == ["break"]  # named once, not per source


async def test_a_tail_deleted_after_the_last_write_is_caught_before_the_seal(
        operator_home: Path, engine: Engine, owner: sessionmaker[Session]) -> None:
    writer = writer_for(operator_home, engine)
    writer.start()
    writer.submit(*(guess(i) for i in range(3)))
    await writer.flush()
    with owner() as db, db.begin():
        db.execute(delete(AuditRecord).where(AuditRecord.seq == 3))
    await writer.close()  # no write after the deletion: the sealer's own check finds it
    assert [(b["found"], b["lost_from"], b["lost_through"]) for b in breaks(owner)] == [("head-below", 3, 3)]
    assert last_seal(operator_home)["head_seq"] == 3
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "seal #1 BROKEN (break): record seq 3 written by the gateway was deleted" in out


async def test_an_edited_tail_record_is_a_break(operator_home: Path, engine: Engine,
                                                owner: sessionmaker[Session]) -> None:
    writer = writer_for(operator_home, engine)
    writer.start()
    writer.submit(guess(0))
    await writer.flush()
    with owner() as db, db.begin():  # the owner rewrites the record with a hash of its own choosing
        db.execute(text("UPDATE audit_records SET hash = :h WHERE seq = 1"), {"h": "f" * 64})
    writer.submit(guess(1))
    await writer.flush()
    await writer.close()
    assert [(b["found"], b["lost_from"]) for b in breaks(owner)] == [("changed", 1)]
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "(break): record seq 1 written by the gateway was changed in the database" in out


async def test_a_delete_on_insert_trigger_is_caught_by_the_read_back(
        sqlite_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine(load_settings(sqlite_home).database_url)
    owner_engine = make_engine(load_settings(sqlite_home).database_url)
    try:
        owner = session_factory(owner_engine)
        with owner() as db, db.begin():
            db.execute(text("CREATE TRIGGER hide_attacker AFTER INSERT ON audit_records "
                            "WHEN new.client = '127.0.0.5' BEGIN DELETE FROM audit_records WHERE seq = new.seq; END"))
        writer = writer_for(sqlite_home, engine)
        writer.start()
        writer.submit(AuditEvent("start", "info", actor="localhost"))
        await writer.flush()
        with caplog.at_level(logging.ERROR, logger="mssgw.audit"):
            writer.submit(*(guess(i) for i in range(3)))
            await writer.flush()
            # Nothing else written yet: the read-back after the commit found the records gone.
            assert [(b["found"], b["lost_from"], b["lost_through"]) for b in breaks(owner)] == [("head-below", 2, 4)]
            assert len(caplog.records) == 1
            writer.submit(guess(3))  # hidden again: caught again
            await writer.flush()
            await writer.close()
        with owner() as db, db.begin():
            db.execute(text("DROP TRIGGER hide_attacker"))
            assert db.scalar(select(AuditRecord.seq).where(AuditRecord.client == "127.0.0.5")) is None
        assert len(breaks(owner)) == 2
        code, out = run(sqlite_home, "audit", "verify")
        assert code == 1
        assert "(break): records seq 2..4 written by the gateway were deleted (the head went back to seq 1)" in out
        assert "(break): record seq 3 written by the gateway was deleted (the head went back to seq 2)" in out
    finally:
        engine.dispose()
        owner_engine.dispose()


async def test_other_writers_rollbacks_and_purges_are_no_break(
        operator_home: Path, engine: Engine, owner: sessionmaker[Session]) -> None:
    writer = writer_for(operator_home, engine)
    other = AuditWriter(owner, linger=0)  # another node on the same database
    writer.start()
    other.start()
    for round_ in range(20):  # interleaved and concurrent appends
        writer.submit(*(guess(i, client="127.0.0.1") for i in range(3)))
        other.submit(AuditEvent("connect", "accept", client="127.0.0.2", detail={"round": round_}))
        if round_ % 5 == 0:
            assert run(operator_home, "audit", "seal")[0] == 0  # the CLI seals (and reads) meanwhile
        await writer.flush()
    await other.close()
    await writer.close()
    assert breaks(owner) == []
    code, out = run(operator_home, "audit", "verify")
    assert code == 0 and "all hold" in out, out


async def test_a_rollback_or_a_purge_is_no_break(operator_home: Path, engine: Engine,
                                                 owner: sessionmaker[Session]) -> None:
    writer = writer_for(operator_home, engine)
    writer.start()
    writer.submit(guess(0))
    await writer.flush()
    factory = session_factory(engine)
    with pytest.raises(RuntimeError), factory() as db, db.begin():  # this process's append, rolled back
        append(db, [guess(99)])
        raise RuntimeError("the caller's transaction fails")
    writer.submit(AuditEvent("old", "info", ts=datetime.now(UTC) - timedelta(days=4000)))
    await writer.flush()
    with owner() as db, db.begin():  # a legitimate purge removes this process's last record too
        assert purge(db, older_than=timedelta(days=365)) == 2
    writer.submit(guess(1))
    await writer.flush()
    await writer.close()
    assert breaks(owner) == []
    code, out = run(operator_home, "audit", "verify")
    assert code == 0, out


def test_the_queue_path_on_a_bare_connection_is_watched_too(operator_home: Path, engine: Engine,
                                                             owner: sessionmaker[Session]) -> None:
    """The gateway's records ride in the queue's group commits (``append`` on a Core connection)."""
    factory = session_factory(engine)
    with write_connection(factory) as conn:
        append(conn, [guess(i) for i in range(2)])
    with pytest.raises(RuntimeError), write_connection(factory) as conn:  # rolled back: not remembered
        append(conn, [guess(9)])
        raise RuntimeError("the group commit fails")
    with owner() as db, db.begin():
        db.execute(delete(AuditRecord).where(AuditRecord.seq == 2))
    with write_connection(factory) as conn:
        assert append(conn, [guess(3)]) == [2, 3]  # the break record first, then the event
    assert [(b["found"], b["lost_from"], b["lost_through"]) for b in breaks(owner)] == [("head-below", 2, 2)]
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "trail BROKEN (break): record seq 2 written by the gateway was deleted" in out
