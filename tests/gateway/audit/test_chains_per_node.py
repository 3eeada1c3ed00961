"""One audit chain per node: nodes sharing a database never wait for each other's records.

Two "nodes" are two engines on the same database, each bound to its chain (``bind_node``), as
two ``mssgw serve`` processes with ``audit.node = n1`` / ``n2`` are.  On PostgreSQL a node
holding its chain's lock in an open transaction does not stop the other node from appending
and committing (the old single chain took one cluster-wide lock); each chain verifies alone,
a record moved to another chain or edited breaks its chain, and a node's seals name the other
chain's head so that cutting that chain back is seen from this node's home.  ``mssgw audit
verify`` (the real CLI) checks every chain and this home's seals.  Real SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from cli.main import cli
from directory.db import make_engine, session_factory
from gateway.audit.models import AuditRecord
from gateway.audit.seal import Sealer
from gateway.audit.sealcheck import check_home
from gateway.audit.trail import AuditEvent, append, bind_node, chains, verify
from gateway.config import load_settings


@pytest.fixture
def nodes(operator_home: Path) -> Iterator[tuple[Engine, Engine]]:
    url = load_settings(operator_home).database_url
    one, two = make_engine(url), make_engine(url)
    bind_node(one, "n1")
    bind_node(two, "n2")
    yield one, two
    one.dispose()
    two.dispose()


def _fill(factory: sessionmaker[Session], n: int, tag: str) -> None:
    with factory() as db, db.begin():
        append(db, [AuditEvent("rcpt", "accept", recipient=f"{tag}{i}@a.mssante.test") for i in range(n)])


def _verify(engine: Engine) -> tuple[bool, str]:
    with session_factory(engine)() as db:
        result = verify(db)
        return result.ok, result.summary()


def test_each_node_appends_to_its_own_chain_and_each_verifies_alone(nodes: tuple[Engine, Engine]) -> None:
    one, two = nodes
    _fill(session_factory(one), 3, "a")
    _fill(session_factory(two), 2, "b")
    _fill(session_factory(one), 1, "c")
    with session_factory(one)() as db:
        assert chains(db) == ["n1", "n2"]
        seqs = dict(db.execute(select(AuditRecord.node, func.max(AuditRecord.seq)).group_by(AuditRecord.node)).all())
        assert seqs == {"n1": 4, "n2": 2}  # numbered within each chain
        result = verify(db)
        assert result.ok and result.records == 6 and result.chains == {"n1": (4, 1, 4), "n2": (2, 1, 2)}
        assert verify(db, node="n2").records == 2


def test_a_record_moved_to_another_chain_or_edited_breaks_it(nodes: tuple[Engine, Engine]) -> None:
    one, two = nodes
    _fill(session_factory(one), 3, "a")
    _fill(session_factory(two), 3, "b")
    with session_factory(one)() as db, db.begin():  # n2's record 3 relabelled as n1's record 4
        db.execute(update(AuditRecord).where(AuditRecord.node == "n2", AuditRecord.seq == 3)
                   .values(node="n1", seq=4))  # fmt: skip
    ok, summary = _verify(one)
    assert not ok and "chain 'n1'" in summary and "seq 4" in summary
    with session_factory(one)() as db, db.begin():
        db.execute(update(AuditRecord).where(AuditRecord.node == "n1", AuditRecord.seq == 4).values(node="n2", seq=3))
        db.execute(update(AuditRecord).where(AuditRecord.node == "n2", AuditRecord.seq == 2)
                   .values(recipient="someone@else.test"))  # fmt: skip
    ok, summary = _verify(one)
    assert not ok and "chain 'n2'" in summary and "seq 2" in summary and "edited" in summary


def test_a_node_holding_its_chain_does_not_stop_the_other(nodes: tuple[Engine, Engine], database_url: str) -> None:
    one, two = nodes
    _fill(session_factory(two), 1, "warm")  # both chains exist
    if not database_url.startswith("postgresql"):
        # SQLite has one writer at a time whatever the chains: the point below is PostgreSQL's.
        _fill(session_factory(one), 1, "x")
        assert _verify(one)[0]
        return
    done = threading.Event()
    errors: list[BaseException] = []
    with session_factory(one)() as held, held.begin():
        append(held, [AuditEvent("rcpt", "accept", recipient="held@a.mssante.test")])  # n1's lock, held

        def other_node() -> None:
            try:
                _fill(session_factory(two), 5, "free")
            except BaseException as exc:  # reported below
                errors.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=other_node)
        worker.start()
        # Node 2 commits while node 1's transaction is still open (a bound for the failure case:
        # with one lock for every chain it would wait until node 1 commits, i.e. forever here).
        assert done.wait(60), "node 2 waited for node 1's audit lock"
        worker.join()
    assert errors == []
    ok, summary = _verify(one)
    assert ok, summary
    with session_factory(one)() as db:
        assert db.scalar(select(func.count()).select_from(AuditRecord).where(AuditRecord.node == "n2")) == 6


def test_a_node_seals_name_the_other_chains_and_catch_one_cut_back(operator_home: Path,
                                                                   nodes: tuple[Engine, Engine]) -> None:
    one, two = nodes
    settings = load_settings(operator_home)
    _fill(session_factory(one), 2, "a")
    _fill(session_factory(two), 4, "b")
    seal = Sealer.for_settings(settings, session_factory(one)).seal()
    assert seal is not None and seal["node"] == "n1" and seal["chains"]["n2"][0] == 4
    with session_factory(one)() as db:
        assert check_home(db, _as_node(settings, "n1")).ok
    # n2's tail cut back while its node is down: its chain still verifies alone...
    with session_factory(two)() as db, db.begin():
        db.execute(delete(AuditRecord).where(AuditRecord.node == "n2", AuditRecord.seq >= 3))
    assert _verify(one)[0]
    # ...but n1's seal saw record 4 of n2.
    with session_factory(one)() as db:
        report = check_home(db, _as_node(settings, "n1"))
    assert not report.ok and [p.kind for p in report.problems] == ["other-chain"]
    assert "chain 'n2'" in report.problems[0].message


def test_the_cli_verifies_every_chain_and_this_nodes_seals(operator_home: Path, nodes: tuple[Engine, Engine],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    one, two = nodes
    _fill(session_factory(one), 2, "a")
    _fill(session_factory(two), 3, "b")
    monkeypatch.setenv("MSSGW_AUDIT_NODE", "n1")
    runner = CliRunner()
    sealed = runner.invoke(cli, ["--data-dir", str(operator_home), "audit", "seal"])
    assert sealed.exit_code == 0, sealed.output
    out = runner.invoke(cli, ["--data-dir", str(operator_home), "audit", "verify"])
    assert out.exit_code == 0, out.output
    assert "2 chains" in out.output and "n1: 2" in out.output and "n2: 3" in out.output
    with session_factory(two)() as db, db.begin():
        db.execute(update(AuditRecord).where(AuditRecord.node == "n2", AuditRecord.seq == 3)
                   .values(recipient="someone@else.test"))  # fmt: skip
    out = runner.invoke(cli, ["--data-dir", str(operator_home), "audit", "verify"])
    assert out.exit_code == 1 and "chain 'n2'" in out.output


def _as_node(settings, node: str):  # type: ignore[no-untyped-def]
    """The settings of this home as node ``node`` (``audit.node``)."""
    from gateway.config import validate

    return validate({}, settings.home, environ={"MSSGW_AUDIT_NODE": node, "MSSGW_DATABASE_URL": settings.database_url})


def test_nodes_sharing_one_home_each_seal_their_own_chain_in_one_file(operator_home: Path,
                                                                      nodes: tuple[Engine, Engine]) -> None:
    one, two = nodes
    settings = load_settings(operator_home)
    for round_ in range(2):  # interleaved seals of both nodes in the same seal file
        _fill(session_factory(one), 2, f"a{round_}")
        _fill(session_factory(two), 3, f"b{round_}")
        assert Sealer.for_settings(settings, session_factory(one)).seal() is not None
        assert Sealer.for_settings(settings, session_factory(two)).seal() is not None
    for node in ("n1", "n2"):
        with session_factory(one)() as db:
            report = check_home(db, _as_node(settings, node))
        assert report.ok and report.good == 4, (node, report.lines())
    with session_factory(two)() as db, db.begin():  # n2's sealed head cut off
        db.execute(delete(AuditRecord).where(AuditRecord.node == "n2", AuditRecord.seq == 6))
    with session_factory(one)() as db:
        report = check_home(db, _as_node(settings, "n1"))
    assert not report.ok and {p.kind for p in report.problems} >= {"truncated"}
