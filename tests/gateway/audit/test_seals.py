"""Seals make the trail tamper-evident against the database owner (issue 10, item 8).

Each tampering a database owner can do without breaking the hash chain (delete
the last records or all of them, edit one and recompute every later hash,
renumber) and each tampering of the seal file (forged line, removed line) makes
``mssgw audit verify`` exit 1 naming the seal and how it broke; a clean trail, a
purged one and one with an unsealed tail exit 0. Real SQLite and PostgreSQL, the
real operator key from the development PKI, the CLI through click's runner.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from cli.main import cli
from directory.db import make_engine, session_factory
from gateway.audit.models import AuditRecord
from gateway.audit.seal import Sealer, seals_path
from gateway.audit.trail import AuditEvent, AuditWriter, _fields, append, purge, record_hash
from gateway.config import load_settings


@pytest.fixture
def engine(operator_home: Path) -> Iterator[Engine]:
    engine = make_engine(load_settings(operator_home).database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def run(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    return result.exit_code, result.output


def fill(factory: sessionmaker[Session], n: int, ts: datetime | None = None) -> None:
    with factory() as db, db.begin():
        append(db, [AuditEvent("rcpt", "accept", sender="a@a.mssante.test", recipient=f"r{i}@a.mssante.test",
                               rule="known-recipient", ts=ts and ts + timedelta(seconds=i)) for i in range(n)])


def rechain(factory: sessionmaker[Session]) -> None:
    """What a database owner does after editing: recompute every link and hash from the start."""
    with factory() as db, db.begin():
        prev = None
        for row in db.scalars(select(AuditRecord).order_by(AuditRecord.seq)):
            row.prev_hash = prev if prev is not None else row.prev_hash
            row.hash = record_hash(row.seq, row.ts, _fields(row), row.prev_hash)
            prev = row.hash


def sealed_home(home: Path, factory: sessionmaker[Session], n: int = 10) -> None:
    fill(factory, n)
    code, out = run(home, "audit", "seal")
    assert code == 0 and out.startswith(f"sealed seq {n} ({n} records")


def test_clean_trail_passes_and_reports_its_unsealed_tail(operator_home: Path, factory: sessionmaker[Session]) -> None:
    code, out = run(operator_home, "audit", "verify")
    assert code == 0 and "seals: none yet" in out
    sealed_home(operator_home, factory)
    assert run(operator_home, "audit", "seal") == (0, "nothing new to seal\n")
    code, out = run(operator_home, "audit", "verify")
    assert code == 0 and "seals: 1 checked, all hold (sealed through seq 10)" in out and "unsealed" not in out
    fill(factory, 2)
    code, out = run(operator_home, "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["seals"]["unsealed_tail"] == 2
    assert "unsealed tail (2 records)" in run(operator_home, "audit", "verify")[1]
    path = seals_path(operator_home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_deleting_the_last_records_is_detected(operator_home: Path, factory: sessionmaker[Session]) -> None:
    sealed_home(operator_home, factory)
    with factory() as db, db.begin():
        db.execute(delete(AuditRecord).where(AuditRecord.seq >= 9))
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "intact: 8 records" in out  # the chain alone cannot see it
    assert "seal #1 BROKEN (truncated): the trail ends at seq 8, below the sealed seq 10" in out


def test_deleting_all_records_is_detected(operator_home: Path, factory: sessionmaker[Session]) -> None:
    sealed_home(operator_home, factory)
    with factory() as db, db.begin():
        db.execute(delete(AuditRecord))
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "seal #1 BROKEN (deleted-all)" in out and "10 records through seq 10" in out


def test_edit_with_recomputed_hashes_is_detected(operator_home: Path, factory: sessionmaker[Session]) -> None:
    sealed_home(operator_home, factory, 5)
    fill(factory, 5)
    assert run(operator_home, "audit", "seal")[0] == 0
    with factory() as db, db.begin():
        db.execute(update(AuditRecord).where(AuditRecord.seq == 7).values(recipient="someone@else.test"))
    rechain(factory)
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "audit trail intact: 10 records" in out
    assert "seal #2 BROKEN (rewritten): record seq 10 does not have the sealed hash" in out
    assert "seal #1" not in out  # records 1..5 were not touched: the first broken seal locates it


def test_renumbering_is_detected(operator_home: Path, factory: sessionmaker[Session]) -> None:
    sealed_home(operator_home, factory)
    with factory() as db, db.begin():
        db.execute(delete(AuditRecord).where(AuditRecord.seq == 5))
        for seq in range(6, 11):
            db.execute(update(AuditRecord).where(AuditRecord.seq == seq).values(seq=seq - 1))
    rechain(factory)
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "audit trail intact: 9 records" in out
    assert "seal #1 BROKEN (renumbered): the record sealed as seq 10 is now seq 9" in out


def test_forged_and_removed_seal_lines_are_detected(operator_home: Path, factory: sessionmaker[Session]) -> None:
    sealed_home(operator_home, factory, 3)
    fill(factory, 3)
    assert run(operator_home, "audit", "seal")[0] == 0
    path = seals_path(operator_home)
    first, second = path.read_text().splitlines()
    forged = {**json.loads(second), "head_seq": 5}  # claims less than was sealed
    path.write_text(f"{first}\n{json.dumps(forged)}\n")
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "seal #2 BROKEN (signature): bad signature on the seal of seq 5" in out
    path.write_text(f"{second}\n")  # the first seal removed
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "seal #1 BROKEN (unlinked)" in out
    path.write_text(f"{first}\nnot a seal\n")
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "seal #2 BROKEN (unreadable)" in out


def test_purge_keeps_sealed_trails_verifiable(operator_home: Path, factory: sessionmaker[Session]) -> None:
    fill(factory, 4, ts=datetime.now(UTC) - timedelta(days=400))
    assert run(operator_home, "audit", "seal")[0] == 0
    fill(factory, 2)
    assert run(operator_home, "audit", "seal")[0] == 0
    with factory() as db, db.begin():
        assert purge(db, older_than=timedelta(days=183)) == 4
    code, out = run(operator_home, "audit", "verify")
    assert code == 0 and "seals: 2 checked, all hold" in out and "unsealed tail (1 records)" in out
    fill(factory, 1)
    code, out = run(operator_home, "audit", "seal")
    assert code == 0 and out.startswith("sealed seq 8 (4 records")  # counted again after the purge: 5..8
    assert run(operator_home, "audit", "verify")[0] == 0


def test_a_fake_purge_of_young_records_is_detected(operator_home: Path, factory: sessionmaker[Session]) -> None:
    """Deleting a sealed prefix and forging the retention record: young records cannot have been purged."""
    sealed_home(operator_home, factory, 4)
    fill(factory, 2)
    with factory() as db, db.begin():
        assert purge(db, older_than=timedelta(days=-1)) == 6  # a purge as if the retention period were over
    code, out = run(operator_home, "audit", "verify")
    assert code == 1 and "seal #1 BROKEN (purged-early): sealed seq 4 is gone but younger than the retention" in out


async def test_the_writer_seals_when_due_and_at_close(operator_home: Path, factory: sessionmaker[Session]) -> None:
    settings = load_settings(operator_home)
    sealer = Sealer.for_settings(settings, factory, every_records=5, every_seconds=3600, poll=3600)
    fill(factory, 4)
    assert sealer.seal(force=False) is not None  # the first seal is always due
    fill(factory, 4)
    assert sealer.seal(force=False) is None  # 4 new records, the hour not over
    fill(factory, 1)
    assert sealer.seal(force=False)["head_seq"] == 9
    writer = AuditWriter(factory, linger=0, sealer=sealer)
    writer.start()
    writer.submit(AuditEvent("stop", "info", actor="localhost"))
    await writer.close()
    lines = seals_path(operator_home).read_text().splitlines()
    assert [(json.loads(x)["head_seq"], json.loads(x)["count"]) for x in lines] == [(4, 4), (9, 9), (10, 10)]
    code, out = run(operator_home, "audit", "verify")
    assert code == 0 and "seals: 3 checked, all hold (sealed through seq 10)" in out
    assert os.listdir(seals_path(operator_home).parent / "signers")


def test_seals_are_signed_with_the_operator_key_sealed_in_the_database(operator_home: Path,
                                                                       factory: sessionmaker[Session]) -> None:
    """A node without ``pki/operator.key`` (a second node) seals with the key from the database,
    and the seal verifies against the operator certificate; with another KEK it says so."""
    (operator_home / "pki" / "operator.key").unlink()
    sealed_home(operator_home, factory)
    code, out = run(operator_home, "audit", "verify")
    assert code == 0 and "seals: 1 checked, all hold" in out
    fill(factory, 1)
    kek = operator_home / "kek"
    kek.write_bytes(os.urandom(32))
    code, out = run(operator_home, "audit", "seal")
    assert code != 0 and "give every node the same kek" in out and "Traceback" not in out


def _openssl_verifies(seal: dict[str, object], cert_pem: Path, tmp: Path) -> bool:
    """``openssl pkeyutl`` checks the seal's RSA-PSS signature over its canonical fields."""
    import base64
    import subprocess

    from gateway.audit.seal import canonical

    (tmp / "data").write_bytes(canonical(seal))
    (tmp / "sig").write_bytes(base64.b64decode(str(seal["sig"])))
    public = subprocess.run(["openssl", "x509", "-in", str(cert_pem), "-pubkey", "-noout"], capture_output=True,
                            check=True).stdout  # fmt: skip
    (tmp / "pub.pem").write_bytes(public)
    done = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp / "pub.pem"), "-sigopt",
                           "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32", "-signature", str(tmp / "sig"),
                           str(tmp / "data")], capture_output=True, check=False)  # fmt: skip
    return done.returncode == 0 and b"Verified OK" in done.stdout


def test_a_home_operator_key_that_is_not_the_operators_never_signs_a_seal(
        operator_home: Path, factory: sessionmaker[Session], tmp_path: Path) -> None:
    """A ``pki/operator.pem`` + ``operator.key`` pair that is not this operator's (another CA's, as a
    wrongly initialised node had) is refused in one sentence; ``mssgw init`` rewrites the
    certificate from the database and the seal, signed with the sealed key, verifies with
    ``openssl`` against the operator certificate of the directory."""
    from certs.pki import create_dev_pki

    pki = operator_home / "pki"
    genuine = (pki / "operator.pem").read_bytes()
    other = create_dev_pki(tmp_path / "other", "a.mssante.test", "localhost")
    for name in ("operator.pem", "operator.key"):
        (pki / name).write_bytes((other.directory / name).read_bytes())
    fill(factory, 3)
    code, out = run(operator_home, "audit", "seal")
    assert code != 0 and "not this operator's certificate" in out and "Traceback" not in out, out
    assert not seals_path(operator_home).exists()

    code, out = run(operator_home, "init")
    assert code == 0 and "joined operator a.mssante.test" in out, out
    assert (pki / "operator.pem").read_bytes() == genuine
    code, out = run(operator_home, "audit", "seal")
    assert code == 0, out
    seal = json.loads(seals_path(operator_home).read_text().splitlines()[-1])
    assert _openssl_verifies(seal, pki / "operator.pem", tmp_path)
    assert not _openssl_verifies(seal, other.operator_cert, tmp_path)  # the oracle does refuse a wrong key
