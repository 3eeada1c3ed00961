"""``mssgw serve`` as an admin runs it: refusal to start, SIGKILL durability, clean SIGTERM."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import signal
import socket
import sys
from pathlib import Path

import aiosmtplib
from click.testing import CliRunner
from smtp_world import DOMAIN, PASSWORD, message, write_settings
from sqlalchemy import Engine, select

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from cli.main import cli
from directory.db import make_engine, session_factory
from gateway.config import Settings, load_settings
from gateway.queue.models import QueuedMessage
from gateway.queue.store import QueueStore

ROOT = Path(__file__).resolve().parents[3]


def test_refuses_to_start_when_a_port_is_taken(gateway_home: Path) -> None:
    settings = load_settings(gateway_home)
    host, port = settings.listen("inbound")  # type: ignore[misc]
    with socket.socket() as taken:
        taken.bind((host, port))
        taken.listen()
        result = CliRunner().invoke(cli, ["--data-dir", str(gateway_home), "serve", "--no-workers"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"error: listen.inbound: cannot listen on {host}:{port}: address already in use")


def test_refuses_to_start_with_expired_or_missing_certificate(gateway_home: Path) -> None:
    pki = load_dev_pki(gateway_home / "pki")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert, key = issue_certificate(pki, kind="server", dns_names=["localhost"], not_before=past - dt.timedelta(days=60),
                                  not_after=past)
    save_certificate_and_key(cert, key, gateway_home / "old.pem", gateway_home / "old.key")
    write_settings(gateway_home, {"tls": {"cert": "old.pem", "key": "old.key"}})
    result = CliRunner().invoke(cli, ["--data-dir", str(gateway_home), "serve"])
    assert result.exit_code == 2 and "tls.cert" in result.output and "expired on" in result.output
    write_settings(gateway_home, {"tls": {"cert": "missing.pem", "key": "old.key"}})
    result = CliRunner().invoke(cli, ["--data-dir", str(gateway_home), "serve"])
    assert result.exit_code == 2 and "cannot read certificate" in result.output


async def start_serve(home: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "--data-dir", str(home), "serve", "--no-workers",
        cwd=ROOT, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stderr is not None
    while True:  # wait for the announcement, not for a time
        line = (await asyncio.wait_for(proc.stderr.readline(), timeout=30)).decode()
        assert line, "serve exited before starting"
        if "gateway started" in line:
            return proc


async def test_sigkill_loses_no_acknowledged_message(gateway_home: Path) -> None:
    settings = load_settings(gateway_home)
    port = settings.listen("submission")[1]  # type: ignore[index]
    ca = gateway_home / "pki" / "ca.pem"
    acked: dict[str, str] = {}  # queue id -> sha256 of the bytes we sent
    enough = asyncio.Event()
    proc = await start_serve(gateway_home)

    async def client(n: int) -> None:
        import ssl

        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                               tls_context=ssl.create_default_context(cafile=str(ca)), timeout=10)
        await smtp.connect()
        await smtp.starttls(server_hostname="localhost")
        await smtp.login(f"sec@{DOMAIN}", PASSWORD)
        for i in range(1000):
            data = message(body=f"client {n} message {i}\r\n" + ("z" * 76 + "\r\n") * 30,
                           message_id=f"<{n}.{i}@a.mssante.test>")
            _, reply = await smtp.sendmail(f"sec@{DOMAIN}", [f"bob@{DOMAIN}"], data)
            acked[reply.rsplit(" ", 1)[1]] = hashlib.sha256(data).hexdigest()
            if len(acked) >= 40:
                enough.set()

    tasks = [asyncio.create_task(client(n)) for n in range(6)]
    waiter = asyncio.create_task(enough.wait())
    await asyncio.wait([waiter, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    proc.send_signal(signal.SIGKILL)  # right after the 40th acknowledgement, with transactions in flight
    await proc.wait()
    assert enough.is_set(), [t.exception() for t in tasks if t.done()]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, aiosmtplib.SMTPException | ConnectionError) for r in results), results
    assert len(acked) >= 40

    proc = await start_serve(gateway_home)  # the queue is intact after a restart
    engine = make_engine(settings.database_url)
    try:
        check_queue(settings, engine, acked)
    finally:
        engine.dispose()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), timeout=30) == 0


def check_queue(settings: Settings, engine: Engine, acked: dict[str, str]) -> None:
    """Every acknowledged id is queued exactly once, with the bytes we sent after our trace field."""
    store = QueueStore(session_factory(engine), settings.spool_dir)
    with session_factory(engine)() as db:
        ids = list(db.scalars(select(QueuedMessage.id)))
    assert len(ids) == len(set(ids))
    missing = set(acked) - set(ids)
    assert not missing, f"acknowledged but lost: {missing}"
    for queue_id, digest in acked.items():
        stored = store.read(queue_id)
        assert store.get(queue_id)["sha256"] == hashlib.sha256(stored).hexdigest()
        assert hashlib.sha256(stored[stored.index(b"From: "):]).hexdigest() == digest
