"""``mssgw peers`` against running gateways: changes apply to real ``mssgw serve`` processes without a restart.

Each operator is a home made by ``mssgw init`` (SQLite) and a ``mssgw serve`` subprocess on
free loopback ports (``MSSGW_LISTEN_*`` environment overrides). The tests wait on events,
not on time: a reader thread hands over each log line of the gateway, and a test waits for
the line that says the thing happened (``trust reloaded generation=N``, ``processed
queue_id=...``, ``listener=inbound outcome=queued``). Peer TLS is checked from outside with
the standard library's ssl module, presenting A's operator certificate on B's inbound port.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from e2e_support import free_port

from cli.main import cli

MSSGW = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0  # seconds before a missing event fails the test (the retry it stands for is an hour away)
ANNE, ANNE_PASSWORD = "anne.martin@a.mssante.test", "anne passphrase 2026"
PAUL = "paul.durand@b.mssante.test"


@dataclass
class Operator:
    name: str
    domain: str
    home: Path
    ports: dict[str, int]
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSSGW_")}
        env.update({
            "MSSGW_LISTEN_SUBMISSION": f"127.0.0.1:{self.ports['submission']}",
            "MSSGW_LISTEN_INBOUND": f"127.0.0.1:{self.ports['inbound']}",
            "MSSGW_LISTEN_SUBMISSIONS": "", "MSSGW_LISTEN_IMAP": "", "MSSGW_LISTEN_IMAPS": "",
            "MSSGW_LISTEN_METRICS": "", "MSSGW_LISTEN_API": "", "PYTHONPATH": str(ROOT),
        })  # fmt: skip
        env.update(self.extra_env)
        return env

    def run(self, *args: str, stdin: str | None = None) -> Result:
        """The real CLI in this process (CliRunner): admin commands against the running gateway's home."""
        overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MSSGW_")}
        overrides.update({k: v for k, v in self.env.items() if k.startswith("MSSGW_")})
        done = CliRunner().invoke(cli, ["--data-dir", str(self.home), *args], input=stdin, env=overrides)
        assert done.exit_code == 0, (args, done.output)
        return done

    def start(self) -> None:
        self.proc = subprocess.Popen([*MSSGW, "--data-dir", str(self.home), "serve", "--log-level", "debug"],
                                     env=self.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     cwd=ROOT)  # fmt: skip
        stream = self.proc.stderr
        assert stream is not None
        self.reader = threading.Thread(target=lambda: [self.lines.put(line) for line in stream], daemon=True)
        self.reader.start()
        self.wait_for("gateway started")

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first log line, from now on, matching ``pattern`` (a regular expression)."""
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no log line {pattern!r} within {WAIT}s; log:\n"
                                     + "".join(self.seen[-40:])) from None  # fmt: skip
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            if self.reader is not None:
                self.reader.join(timeout=10)  # EOF once the gateway has exited
            self.proc.stderr.close()


def _make(tmp_path: Path, name: str, domain: str, rpps: str, who: tuple[str, str], address: str,
          password: str) -> Operator:  # fmt: skip
    op = Operator(name, domain, tmp_path / name, {"submission": free_port(), "inbound": free_port()})
    op.run("init", "--domain", domain, "--hostname", f"mx.{domain}")
    op.run("directory", "add-practitioner", "--rpps", rpps, "--last-name", who[0], "--first-name", who[1])
    op.run("directory", "add-mailbox", address, "--type", "PER", "--rpps", rpps, "--password-stdin", stdin=password)
    op.run("peers", "export", "-o", str(tmp_path / f"{name}.peer.json"))
    return op


@pytest.fixture
def operators(tmp_path: Path) -> Iterator[tuple[Operator, Operator]]:
    a = _make(tmp_path, "a", "a.mssante.test", "10000000009", ("Martin", "Anne"), ANNE, ANNE_PASSWORD)
    b = _make(tmp_path, "b", "b.mssante.test", "10000000025", ("Durand", "Paul"), PAUL, "paul passphrase 2026")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def _client_tls(a: Operator, b: Operator) -> ssl.SSLContext:
    """A's relay as seen from outside: A's operator certificate, B's CA to check B's server."""
    ctx = ssl.create_default_context(cafile=str(b.home / "pki" / "ca.pem"))
    ctx.load_cert_chain(a.home / "pki" / "operator.pem", a.home / "pki" / "operator.key")
    return ctx


def _peer_session(a: Operator, b: Operator) -> str:
    """STARTTLS to B's inbound port with A's certificate, then MAIL and RCPT; the replies, or why it failed."""
    try:
        with smtplib.SMTP("127.0.0.1", b.ports["inbound"], local_hostname="mx.a.mssante.test", timeout=10) as smtp:
            smtp.starttls(context=_client_tls(a, b))
            smtp.ehlo("mx.a.mssante.test")
            mail = smtp.mail(ANNE)
            rcpt = smtp.rcpt(PAUL)
            smtp.rset()
            return f"{mail[0]} {rcpt[0]}"
    except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError) as exc:
        return f"refused: {type(exc).__name__}"


def test_peer_added_while_running_is_accepted_on_inbound_and_removed_is_refused(
        operators: tuple[Operator, Operator], tmp_path: Path) -> None:  # fmt: skip
    a, b = operators
    b.start()
    assert _peer_session(a, b).startswith("refused")  # A's CA is nobody's anchor at B yet

    b.run("peers", "add", "--from", str(tmp_path / "a.peer.json"))
    b.wait_for(r"trust reloaded generation=1 .*changed=.*a\.mssante\.test")
    assert _peer_session(a, b) == "250 250"  # same process, no restart: A's certificate is accepted

    b.run("peers", "remove", "a.mssante.test")
    b.wait_for(r"trust reloaded generation=2 ")
    # Refused in the handshake itself: the CA left the inbound port's client-CA set.
    assert _peer_session(a, b).startswith("refused")
    assert b.proc is not None and b.proc.poll() is None


def test_deferred_mail_to_a_domain_is_retried_as_soon_as_the_peer_is_added(
        operators: tuple[Operator, Operator], tmp_path: Path) -> None:  # fmt: skip
    a, b = operators
    a.extra_env["MSSGW_QUEUE_RETRY_BASE_SECONDS"] = "3600"  # without the reload's retry: an hour's wait
    a.extra_env["MSSGW_QUEUE_RETRY_MAX_SECONDS"] = "3600"
    b.run("peers", "add", "--from", str(tmp_path / "a.peer.json"))
    bundle = json.loads((tmp_path / "b.peer.json").read_text())
    # A knows B's route and operator identity, but not B's CA: the relay cannot verify B's server.
    a.run("domains", "trust", "b.mssante.test", "--relay", bundle["inbound"], "--operator-dn", bundle["operator_dn"])
    a.run("directory", "add-practitioner", "--rpps", "10000000025", "--last-name", "Durand", "--first-name", "Paul")
    a.run("directory", "add-mailbox", PAUL, "--type", "PER", "--rpps", "10000000025")
    a.start()
    b.start()

    ctx = ssl.create_default_context(cafile=str(a.home / "pki" / "ca.pem"))
    with smtplib.SMTP("127.0.0.1", a.ports["submission"], timeout=30) as smtp:
        smtp.starttls(context=ctx)
        smtp.login(ANNE, ANNE_PASSWORD)
        smtp.sendmail(ANNE, [PAUL], f"From: {ANNE}\r\nTo: {PAUL}\r\nSubject: Ordonnance\r\n\r\nAmoxicilline\r\n")
    qid = a.wait_for(r"outcome=queued queue_id=(\w+)").group(1)
    a.wait_for(rf"processed queue_id={qid} ")  # the first attempt's outcome is committed
    info = json.loads(a.run("queue", "show", qid, "--json").stdout)
    state = {r["address"]: r for r in info["recipient_states"]}[PAUL]
    assert state["state"] == "deferred", state
    assert "certificate" in (state["last_reply"] or "").lower(), state

    a.run("peers", "add", "--from", str(tmp_path / "b.peer.json"))
    a.wait_for(r"trust reloaded generation=\d+ .*changed=.*b\.mssante\.test.* retried=1")
    b.wait_for(rf"listener=inbound outcome=queued queue_id=\w+ sender={re.escape(ANNE)}")
    a.wait_for(rf"processed queue_id={qid} ")
    info = json.loads(a.run("queue", "show", qid, "--json").stdout)
    assert {r["address"]: r["state"] for r in info["recipient_states"]} == {PAUL: "delivered"}
