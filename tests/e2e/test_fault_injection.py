"""The delivery core under faults: exactly once per (message, recipient) with drops and SIGKILLs, SQLite and PostgreSQL.

A bounded run of ``fault_harness`` (issue 11, "Tests"): two real ``mssgw serve`` operators,
80 messages over SMTP submission with random recipient sets (S/MIME, OpenPGP, A-local, a
recipient B refuses, a few made to be quarantined at B), a proxy between A and B that drops
about one connection in five at seeded SMTP points, three SIGKILLs of each operator.  The
checker then proves every (message, recipient) delivered exactly once, bounced with exactly one
DSN, or held once in B's quarantine, and nothing left pending or claimed.  A failure prints
the checker's counts and every offending pair.  ``bench/fault_run.py`` is the long run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_harness import B_DELIVERED, WARD, Report, check, run_fault_injection

MESSAGES = 80
KILLS = 3  # of each operator
DROP_PROBABILITY = 0.2
#: Bound of each wait (a start, the drain) on a slow shared machine: a hang fails, slowness does not.
WAIT = 420.0


def _assert_run(report: Report) -> None:
    assert report.ok, report.summary()
    c = report.counts
    # The run did what it claims: every kind of fault and every kind of end happened.
    assert (c["kills_a"], c["kills_b"]) == (KILLS, KILLS), report.summary()
    assert c["drops"] > 0, report.summary()
    assert c["submitted"] == MESSAGES and c["lost"] == 0 and c["duplicates"] == 0, report.summary()
    assert c["delivered"] > 0 and c["bounced"] > 0 and c["quarantined"] > 0, report.summary()
    assert c["delivered"] + c["bounced"] + c["quarantined"] == c["pairs"], report.summary()
    for protection in ("smime", "openpgp", "mtls-signed", "local"):
        assert c.get(f"protection_{protection}", 0) > 0, f"no {protection} recipient: {report.summary()}"


def _check_the_checker(report: Report) -> None:
    """One copy more at B and one copy less at A: the checker names both (it is not vacuous)."""
    assert report.operators is not None
    a, b = report.operators
    clean = [
        p for p in report.submitted if not any(x.startswith(f"({p.message_id},") for x in report.problems)
    ]
    twice = next(p for p in clean if set(p.recipients) & set(B_DELIVERED))
    box = next(r for r in twice.recipients if r in B_DELIVERED)
    copy = next(f for f in b.mailbox(box) if twice.token.encode() in f.read_bytes())
    (copy.parent / f"{copy.name}.again").write_bytes(copy.read_bytes())
    gone = next(p for p in clean if WARD in p.recipients)
    for f in a.mailbox(WARD):
        if gone.token.encode() in f.read_bytes():
            f.unlink()
    try:
        again = check(a, b, report.submitted)
    finally:
        for node in (a, b):
            if node.engine is not None:
                node.engine.dispose()
    before = (report.counts["duplicates"], report.counts["lost"])
    assert (again.counts["duplicates"], again.counts["lost"]) == (before[0] + 1, before[1] + 1), (
        again.summary()
    )
    assert any(p.startswith(f"({twice.message_id}, {box}): 2 times (duplicate)") for p in again.problems)
    assert f"({gone.message_id}, {WARD}): lost (no copy, DSN or quarantine)" in again.problems


@pytest.mark.timeout(900)
async def test_fault_injection_sqlite(tmp_path: Path) -> None:
    report = await run_fault_injection(tmp_path, messages=MESSAGES, kills=KILLS, seed=1101,
                                       drop_probability=DROP_PROBABILITY, timeout=WAIT)  # fmt: skip
    print(report.summary())
    _check_the_checker(report)  # on the run's own data, whatever its outcome
    _assert_run(report)


@pytest.fixture
def operator_databases() -> Iterator[dict[str, str]]:
    """One fresh PostgreSQL database per operator on the suite's server (``MSSGW_TEST_PG_URL``)."""
    server = os.environ.get("MSSGW_TEST_PG_URL")
    if not server:
        if os.environ.get("MSSGW_TEST_NO_PG") == "1":
            pytest.skip("PostgreSQL disabled with MSSGW_TEST_NO_PG=1")
        raise RuntimeError(
            "MSSGW_TEST_PG_URL is not set: run the suite with scripts/test (or MSSGW_TEST_NO_PG=1)"
        )
    from sqlalchemy import create_engine, text

    names = {op: f"mssgw_fault_{op}_{uuid.uuid4().hex[:10]}" for op in ("a", "b")}
    driver = server.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = create_engine(driver, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = driver.rsplit("/", 1)[0]
    try:
        yield {op: f"{base}/{name}" for op, name in names.items()}
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(900)
async def test_fault_injection_postgresql(tmp_path: Path, operator_databases: dict[str, str]) -> None:
    report = await run_fault_injection(tmp_path, messages=MESSAGES, kills=KILLS, seed=1102,
                                       drop_probability=DROP_PROBABILITY, database_urls=operator_databases,
                                       timeout=WAIT)  # fmt: skip
    print(report.summary())  # the figures, for the log of a passing run too
    _assert_run(report)
