"""Finding 203 end to end: a SQLite trigger deletes the records of failed logins as they are
inserted, while the running gateway records three wrong-password attempts and one good login.

Before the fix the gateway chained the next record onto the shortened head and sealed it at
stop: ``mssgw audit verify`` said intact. Now its read-back sees its records gone, writes an
``audit-chain-break`` record, and the seal made at stop names the break: verify exits 1.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiosmtplib
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text

from cli.main import cli
from directory.db import make_engine, session_factory, transaction
from gateway.app import Gateway
from gateway.audit.models import AuditRecord
from gateway.config import load_settings
from tests.gateway.audit.test_poison_gateway import _prepare


async def test_a_trigger_hiding_failed_logins_is_reported(sqlite_home: Path) -> None:
    _prepare(sqlite_home)
    owner = make_engine(load_settings(sqlite_home).database_url)
    try:
        with transaction(session_factory(owner)) as db:
            db.execute(text("CREATE TRIGGER hide_attacker AFTER INSERT ON audit_records "
                            "WHEN new.event = 'auth' AND new.outcome = 'refuse' "
                            "BEGIN DELETE FROM audit_records WHERE seq = new.seq; END"))
        gateway = Gateway(load_settings(sqlite_home), workers=False, imap=False)
        await gateway.start()
        try:
            tls = ssl.create_default_context(cafile=str(sqlite_home / "pki" / "ca.pem"))
            for i in range(3):
                smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.addresses["submission"][1],
                                       start_tls=False, tls_context=tls, timeout=10)
                await smtp.connect()
                await smtp.starttls(server_hostname="localhost")
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await smtp.login("sec@a.mssante.test", f"guess-{i}")
                smtp.close()
            assert gateway.audit is not None
            await gateway.audit.flush()
        finally:
            await asyncio.wait_for(gateway.stop(grace=5), timeout=30)
        with transaction(session_factory(owner)) as db:
            db.execute(text("DROP TRIGGER hide_attacker"))
            assert db.scalar(select(func.count()).select_from(AuditRecord)
                             .where(AuditRecord.event == "auth", AuditRecord.outcome == "refuse")) == 0
    finally:
        owner.dispose()
    result = CliRunner().invoke(cli, ["--data-dir", str(sqlite_home), "audit", "verify"])
    assert result.exit_code == 1, result.output
    assert "BROKEN (break): record" in result.output and "written by the gateway was" in result.output
