"""``mssgw queue`` and ``mssgw audit`` through click's runner, on an initialised operator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import update

from cli.audit import parse_since
from cli.main import cli
from directory.db import make_engine, session_factory
from gateway.audit.models import AuditRecord
from gateway.audit.trail import AuditEvent
from gateway.config import load_settings
from gateway.queue.models import RecipientState
from gateway.queue.store import QueueStore

DATA = b"From: a@a.mssante.test\r\nSubject: secret subject\r\n\r\nsecret body\r\n"


def run(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    return result.exit_code, result.output


def seed(home: Path) -> tuple[str, str]:
    settings = load_settings(home)
    engine = make_engine(settings.database_url)
    try:
        store = QueueStore(session_factory(engine), settings.spool_dir)
        ev = [AuditEvent("accept", "accept", sender="a@a.mssante.test", recipient="b@a.mssante.test")]
        waiting = store.enqueue(DATA, sender="a@a.mssante.test", recipients=["b@a.mssante.test"],
                                origin="submission", audit_events=ev).queue_id
        held = store.enqueue(DATA, sender="d@b.mssante.test", recipients=["c@a.mssante.test"], origin="inbound").queue_id
        store.set_recipient_state(held, "c@a.mssante.test", RecipientState.QUARANTINED)
        return waiting, held
    finally:
        engine.dispose()


def test_queue_commands(operator_home: Path) -> None:
    waiting, held = seed(operator_home)
    code, out = run(operator_home, "queue", "list", "--json")
    assert code == 0 and {m["id"] for m in json.loads(out)} == {waiting, held}
    code, out = run(operator_home, "queue", "show", waiting, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["sender"] == "a@a.mssante.test" and "secret" not in out
    assert run(operator_home, "queue", "show", "0" * 32)[0] == 2
    code, out = run(operator_home, "queue", "list", "--state", "quarantined")
    assert code == 0 and held in out and waiting not in out
    assert run(operator_home, "queue", "retry", waiting) == (0, f"{waiting}: 1 recipient(s) due now\n")
    code, out = run(operator_home, "queue", "quarantine", "delete", waiting, "--reason", "x")
    assert code == 2 and "not in quarantine" in out
    assert run(operator_home, "queue", "quarantine", "release", held)[0] == 0
    code, out = run(operator_home, "queue", "delete", waiting)
    assert code == 2 and "--reason" in out
    assert run(operator_home, "queue", "delete", waiting, "--reason", "duplicate")[0] == 0
    code, out = run(operator_home, "queue", "list", "--all", "--json")
    assert {m["id"]: m["state"] for m in json.loads(out)}[waiting] == "done"


def test_retry_of_a_message_being_attempted_says_so_and_keeps_the_lease(operator_home: Path) -> None:
    waiting, _ = seed(operator_home)
    settings = load_settings(operator_home)
    engine = make_engine(settings.database_url)
    try:
        store = QueueStore(session_factory(engine), settings.spool_dir)
        assert store.claim("node-1", now=datetime.now(UTC)) == [waiting]
        code, out = run(operator_home, "queue", "retry", waiting)
        assert code == 0 and "due when the attempt under way by node-1 ends" in out and "lease runs out" in out
        assert store.claim("node-2") == []  # still node-1's
        # node-1 was killed: the admin takes its message back instead of waiting for the lease
        code, out = run(operator_home, "queue", "retry", waiting, "--force")
        assert (code, out) == (0, f"{waiting}: 1 recipient(s) due now\n")
        assert store.claim("node-2") == [waiting]
    finally:
        engine.dispose()


def test_a_reader_that_goes_away_ends_the_command_quietly(operator_home: Path) -> None:
    """``mssgw queue list | head``: no "unexpected BrokenPipeError", no traceback at exit."""
    seed(operator_home)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "cli.main", "--data-dir", str(operator_home), "queue", "list"],
                              stdout=write_end, stderr=subprocess.PIPE, timeout=120, check=False)  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, b"")


def test_audit_commands(operator_home: Path) -> None:
    seed(operator_home)
    code, out = run(operator_home, "audit", "list", "--since", "2h", "--address", "b@a.mssante.test", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["event"] for r in rows] == ["accept"] and "secret" not in out
    code, out = run(operator_home, "audit", "list", "--event", "queue-retry")
    assert code == 0 and "(none)" in out
    assert run(operator_home, "audit", "list", "--since", "yesterday")[0] == 2
    code, out = run(operator_home, "audit", "verify")
    assert code == 0 and "intact" in out
    code, out = run(operator_home, "audit", "purge")
    assert code == 0 and out.startswith("0 record(s) older than 183 days")
    engine = make_engine(load_settings(operator_home).database_url)
    try:
        with session_factory(engine)() as db, db.begin():
            db.execute(update(AuditRecord).where(AuditRecord.seq == 1).values(reply="250 2.0.0"))
    finally:
        engine.dispose()
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "BROKEN at seq 1" in out


def test_parse_since() -> None:
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    assert parse_since("2h", now=now) == now - timedelta(hours=2)
    assert parse_since("7d", now=now) == now - timedelta(days=7)
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
