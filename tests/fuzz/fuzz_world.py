"""The gateway the fuzzer attacks: an initialised home, a real ``mssgw serve`` process, and its checks.

``prepare_home`` makes an operator a.mssante.test (dev PKI), writes random loopback
ports for every listener, and fills the directory: ``fuzz@`` (the fuzzer's account,
SMTP AUTH and IMAP), ``sec@`` (the legitimate client checked after the run, never
used by the fuzzer), ``bob@`` (a recipient), ``old@`` (deactivated), and the trusted
peer b.mssante.test whose operator certificate the inbound sessions present. Login
throttling is kept but its lockout threshold is raised: the fuzzer mutates
passwords on purpose and must not lock its own account for the rest of the run.

``GatewayProcess`` runs ``python -m cli.main serve`` with stderr copied line by line
to a log file (the start is awaited on the "gateway started" line, not on a timer)
and samples the process's VmRSS. ``legitimate_client`` is a real submission
(aiosmtplib: STARTTLS, AUTH, one message) and a real IMAP LOGIN/SELECT (imaplib).
``queue_ids`` asks ``mssgw queue list --all --json``, the admin's own view.
"""

from __future__ import annotations

import asyncio
import imaplib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fuzz_harness import Target
from fuzz_inputs import Credentials

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "a.mssante.test"
PASSWORD = "fuzz account passphrase"
LEGIT = f"sec@{DOMAIN}"
LEGIT_PASSWORD = "legitimate client passphrase"
CREDS = Credentials(user=f"fuzz@{DOMAIN}", password=PASSWORD, local_rcpts=(f"bob@{DOMAIN}", f"fuzz@{DOMAIN}"),
                    peer_sender="doc@b.mssante.test", imap_user=f"fuzz@{DOMAIN}", imap_password=PASSWORD)


@dataclass(frozen=True)
class Prepared:
    home: Path
    target: Target


def prepare_home(home: Path, pki_template: Path | None = None) -> Prepared:
    """An initialised, populated operator home in ``home`` (which must not exist)."""
    import tomllib

    from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
    from directory import admin
    from directory.db import make_engine, session_factory, transaction
    from gateway.config import load_settings, render_toml
    from gateway.operator import init_operator

    home.mkdir(parents=True)
    if pki_template is not None:  # else init_operator makes one (RSA keys: a few seconds)
        shutil.copytree(pki_template, home / "pki")
    init_operator(home, domain=DOMAIN, hostname="localhost")
    ports = {name: free_port() for name in ("submission", "submissions", "inbound", "imap", "imaps")}
    raw = tomllib.loads((home / "mssgw.toml").read_text())
    raw["listen"].update({name: f"127.0.0.1:{port}" for name, port in ports.items()})
    raw["listen"]["metrics"] = ""
    raw["listen"]["api"] = ""
    raw["database"]["url"] = ""
    raw["auth"].update({"base_delay": 0.01, "max_delay": 0.05, "max_failures": 1_000_000})
    raw["limits"].update({"max_message_size": 1_000_000, "max_recipients": 5, "session_timeout": 30})
    (home / "mssgw.toml").write_text(render_toml(raw))

    pki = load_dev_pki(home / "pki")
    cert, key = issue_certificate(pki, kind="operator", dns_names=["mx.b.mssante.test", "b.mssante.test"],
                                  organization="Operateur B")
    peer_cert, peer_key = home / "peer-b.pem", home / "peer-b.key"
    save_certificate_and_key(cert, key, peer_cert, peer_key)
    settings = load_settings(home)
    engine = make_engine(settings.database_url)
    try:
        with transaction(session_factory(engine)) as db:
            admin.trust_domain(db, "b.mssante.test", relay="127.0.0.1:1",
                               operator_dn=cert.subject.rfc4514_string())
            admin.add_mailbox(db, CREDS.user, type="ORG", display_name="Fuzz", password=PASSWORD)
            admin.add_mailbox(db, LEGIT, type="ORG", display_name="Secretariat", password=LEGIT_PASSWORD)
            admin.add_mailbox(db, f"bob@{DOMAIN}", type="ORG", display_name="Bob")
            admin.add_mailbox(db, f"old@{DOMAIN}", type="ORG", display_name="Old")
            admin.set_active(db, f"old@{DOMAIN}", False)
            admin.add_mailbox(db, "doc@b.mssante.test", type="ORG", source="whitelist")
    finally:
        engine.dispose()
    target = Target("127.0.0.1", ports["submission"], ports["submissions"], ports["inbound"], ports["imap"],
                    ports["imaps"], home / "pki" / "ca.pem", peer_cert, peer_key)
    return Prepared(home, target)


def read_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class GatewayProcess:
    """``mssgw serve`` in a subprocess; its stderr goes to ``log`` line by line."""

    def __init__(self, home: Path, log: Path, *, workers: bool = True) -> None:
        self.home, self.log, self.workers = home, log, workers
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 60.0) -> None:
        args = [sys.executable, "-m", "cli.main", "--data-dir", str(self.home), "serve"]
        if not self.workers:
            args.append("--no-workers")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MSSGW_DATABASE_URL", None)
        self.proc = await asyncio.create_subprocess_exec(*args, cwd=ROOT, stderr=asyncio.subprocess.PIPE,
                                                         stdin=asyncio.subprocess.DEVNULL, env=env)
        self._pump = asyncio.create_task(self._copy_log())
        waiter = asyncio.create_task(self._started.wait())
        await asyncio.wait([waiter, self._pump], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not self._started.is_set():
            waiter.cancel()
            raise RuntimeError(f"gateway did not start; log:\n{self.log.read_text()[-3000:]}")

    async def _copy_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log.open("ab") as out:
            while line := await self.proc.stderr.readline():
                out.write(line)
                out.flush()
                if b"gateway started" in line:
                    self._started.set()

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:
            await self._pump
        return self.proc.returncode


async def rss_sampler(pid: int, into: dict[str, int], interval: float = 0.25) -> None:
    """Keep ``into["max"]`` up to date until cancelled (a periodic sample, not a wait for an event)."""
    while True:
        into["max"] = max(into.get("max", 0), read_rss_kib(pid))
        await asyncio.sleep(interval)


async def warm_fuzz_account(target: Target) -> None:
    """One AUTH of the fuzz account before the run, so its verified credentials are cached.

    Without it, the first 40 concurrent sessions all miss the cache and pay Argon2
    together (a finding of its own, reported by the bench): the run would measure that
    herd instead of the fuzzing.
    """
    import aiosmtplib

    ctx = ssl.create_default_context(cafile=str(target.ca))
    smtp = aiosmtplib.SMTP(hostname=target.host, port=target.submission, start_tls=False, tls_context=ctx,
                           timeout=30)
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.login(CREDS.user, CREDS.password)
    await smtp.quit()


async def legitimate_client(target: Target) -> str:
    """A real submission with AUTH and a real IMAP LOGIN + SELECT; returns the submission's queue id."""
    import aiosmtplib

    ctx = ssl.create_default_context(cafile=str(target.ca))
    smtp = aiosmtplib.SMTP(hostname=target.host, port=target.submission, start_tls=False, tls_context=ctx,
                           timeout=5)
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.login(LEGIT, LEGIT_PASSWORD)
    data = (f"From: {LEGIT}\r\nTo: bob@{DOMAIN}\r\nSubject: after the fuzz\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMessage-ID: <legit@{DOMAIN}>\r\n\r\nBonjour.\r\n").encode()
    _, reply = await smtp.sendmail(LEGIT, [f"bob@{DOMAIN}"], data)
    await smtp.quit()

    def imap() -> tuple[str, list[bytes | None]]:
        client = imaplib.IMAP4(target.host, target.imap, timeout=5)
        try:
            client.starttls(ctx)
            client.login(LEGIT, LEGIT_PASSWORD)
            return client.select("INBOX")
        finally:
            client.logout()

    typ, _ = await asyncio.to_thread(imap)
    assert typ == "OK", typ
    return reply.rsplit(" ", 1)[1]


def queue_ids(home: Path) -> set[str]:
    """Every message id the queue knows (finished ones included), as the admin CLI lists them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MSSGW_DATABASE_URL", None)
    out = subprocess.run([sys.executable, "-m", "cli.main", "--data-dir", str(home), "queue", "list", "--all",
                          "--json", "--limit", "10000000"], cwd=ROOT, env=env, capture_output=True, check=True,
                         timeout=120).stdout
    rows = json.loads(out)
    return {str(r.get("id") or r.get("queue_id")) for r in rows}
