"""The original report, end to end: after ``MAIL FROM:<\\xff@x.example>`` the gateway still accepts mail,
stops on request, and leaves a sealed trail that verifies (SQLite and PostgreSQL).

Before the fix the MAIL record (a lone surrogate) rode in every accepted message's
transaction: each DATA answered 451 until restart and stopping hung. The SMTP edge
now refuses such a path before recording it (553 5.1.7), so the same records are
also handed to the running gateway's writer directly, as the edge once did: the
writer must not be wedged by them, whoever submits them.
"""

from __future__ import annotations

import asyncio
import ssl
import tomllib
from pathlib import Path

import aiosmtplib
from click.testing import CliRunner

from cli.main import cli
from directory import admin
from directory.db import make_engine, session_factory, transaction
from gateway.app import Gateway
from gateway.audit.trail import AuditEvent, query
from gateway.config import load_settings, render_toml
from tests.ports import free_port

PASSWORD = "correct horse battery staple"
BAD_PATH = b"\xff@x.example".decode("utf-8", "surrogateescape")
MESSAGE = (b"From: sec@a.mssante.test\r\nTo: bob@a.mssante.test\r\nSubject: x\r\n"
           b"Message-ID: <p1@a.mssante.test>\r\n\r\nBonjour.\r\n")


def _prepare(home: Path) -> None:
    raw = tomllib.loads((home / "mssgw.toml").read_text())
    raw["listen"].update({"submission": f"127.0.0.1:{free_port()}", "submissions": "", "inbound": f"127.0.0.1:{free_port()}",
                          "imap": "", "imaps": "", "metrics": "", "api": ""})
    (home / "mssgw.toml").write_text(render_toml(raw))
    engine = make_engine(load_settings(home).database_url)
    try:
        with transaction(session_factory(engine)) as db:
            admin.add_mailbox(db, "sec@a.mssante.test", type="ORG", display_name="Secretariat", password=PASSWORD)
            admin.add_mailbox(db, "bob@a.mssante.test", type="ORG", display_name="Bob")
    finally:
        engine.dispose()


async def test_a_non_utf8_path_does_not_wedge_the_gateway(operator_home: Path) -> None:
    _prepare(operator_home)
    gateway = Gateway(load_settings(operator_home), workers=False, imap=False)
    await gateway.start()
    try:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.addresses["submission"][1], start_tls=False,
                               tls_context=ssl.create_default_context(cafile=str(operator_home / "pki" / "ca.pem")),
                               timeout=10)
        await smtp.connect()
        await smtp.starttls(server_hostname="localhost")
        await smtp.login("sec@a.mssante.test", PASSWORD)
        reply = await smtp.execute_command(b"MAIL", b"FROM:<\xff@x.example>")
        assert reply.code in (250, 501, 553)  # recorded or refused: either way never a wedge
        await smtp.rset()
        assert gateway.audit is not None
        gateway.audit.submit(AuditEvent("mail", "accept", actor="sec@a.mssante.test", sender=BAD_PATH),
                             AuditEvent("rcpt", "accept", recipient="b" * 400, rule="r" * 100))
        for _ in range(2):  # each DATA answered 451 before the fix
            errors, _ = await smtp.sendmail("sec@a.mssante.test", ["bob@a.mssante.test"], MESSAGE)  # raises on 451
            assert errors == {}
        await smtp.quit()
    finally:
        await asyncio.wait_for(gateway.stop(grace=5), timeout=30)  # SIGTERM's path; hung before the fix
    result = CliRunner().invoke(cli, ["--data-dir", str(operator_home), "audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "seals: 1 checked, all hold" in result.output and "unsealed" not in result.output
    engine = make_engine(load_settings(operator_home).database_url)
    try:
        with session_factory(engine)() as db:
            senders = [r["sender"] for r in query(db, event="mail", limit=100)]
    finally:
        engine.dispose()
    assert "\\udcff@x.example" in senders
