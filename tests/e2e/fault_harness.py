"""Fault-injection run of the delivery core: two real ``mssgw serve`` operators, a dropping proxy, SIGKILLs, a checker.

Operator A (a.mssante.test) and operator B (b.mssante.test) run as real processes, each with its
own home and database (SQLite, or one PostgreSQL database each).  A's trust-list route to B points
at a ``FaultProxy`` in front of B's inbound listener, which cuts connections at seeded random
points of the SMTP exchange; B relays its reports to A directly.  A's two clinicians submit
messages over SMTP submission (STARTTLS + AUTH) with random recipient sets spanning every
protection group:

========================  =============================================  ==============================
recipient                 how A protects it / what B does                expected end
========================  =============================================  ==============================
``ph.durand@b``           S/MIME (certificate)                           one copy in B's Maildir
``infirmiere@b``          S/MIME, same transaction as ph.durand           one copy in B's Maildir
``laboratoire@b``         OpenPGP only (PGP/MIME transaction of its own)  one copy in B's Maildir
``cardiologie@a``         A-local (signed, A's Maildir)                   one copy in A's Maildir
``ghost@b``               S/MIME; B has no such mailbox: 550 5.1.1         one DSN from A to the sender
``accueil@b``             no key known to A: signed only (mtls-signed)    quarantined once at B, one DSN
                          -- the messages "made to fail"                  from B to the sender, one notice
========================  =============================================  ==============================

While messages flow, A and B are SIGKILLed at seeded random points of the submission and
restarted on the same home.  A submission cut by a kill is resubmitted only if A's database
does not hold it (the 250 after DATA is sent only once the message is committed), so the run
itself never creates duplicates.  The run then waits, polling both databases, until neither
queue has anything left to do, stops both gateways and ``check`` proves from A's and B's
databases and Maildirs that each (message, recipient) ended exactly once as expected.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

from e2e_support import A_DOMAIN, B_DOMAIN, CLINICIAN, COLLEAGUE, GHOST, PRACTITIONER, _issue_user, free_port
from faultproxy import FaultProxy
from sqlalchemy import Engine, func, select

from certs import service as certs
from directory import admin
from directory.certificates import register_certificate
from directory.db import make_engine, read_session_factory, session_factory, transaction
from gateway.config import CONFIG_NAME, load_settings, render_toml
from gateway.delivery.maildir import MaildirDelivery
from gateway.operator import init_operator
from gateway.queue.models import QueuedMessage, QueuedRecipient

NURSE = f"infirmiere@{B_DOMAIN}"  # a second S/MIME recipient at B
LAB = f"laboratoire@{B_DOMAIN}"  # OpenPGP key only
FRONT = f"accueil@{B_DOMAIN}"  # A knows no key: signed-only relay, which B quarantines
WARD = f"cardiologie@{A_DOMAIN}"  # A-local recipient
SENDERS = (CLINICIAN, COLLEAGUE)
PASSWORD = "fault-harness-9f2c"  # a throwaway test account's

B_DELIVERED = (PRACTITIONER, NURSE, LAB)
#: Each recipient's chance to be in a message (not one made to fail); at least one is drawn.
WEIGHTS = {PRACTITIONER: 0.55, NURSE: 0.45, LAB: 0.4, WARD: 0.3, GHOST: 0.12}
FAIL_SHARE = 0.06  # share of the messages made to be quarantined at B (they include FRONT)

#: Short lease and retry delays so that the claims of a killed worker are taken back quickly.
QUEUE_SETTINGS = {"lease_seconds": 3.0, "retry_base_seconds": 0.5, "retry_max_seconds": 2.0}
TOKEN = re.compile(rb"fi\.\d+\.\d+@a\.mssante\.test")


class HarnessError(Exception):
    """The run could not be carried out (a gateway did not start, a deadline passed)."""


# --- the two operators -------------------------------------------------------------------------


@dataclass
class Node:
    """One operator's home and its ``mssgw serve`` process (restarted on the same home)."""

    name: str
    domain: str
    home: Path
    ports: dict[str, int]
    operator_dn: str
    database_url: str
    proc: subprocess.Popen[bytes] | None = None
    generation: int = 0  # bumped by every start
    kills: int = 0
    engine: Engine | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSSGW_")}
        env["MSSGW_HOME"] = str(self.home)
        with (self.home / "serve.log").open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "mssgw"), "serve"], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        self.generation += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.ports["submission"])) == 0 and self.alive()

    def db(self) -> Engine:
        if self.engine is None:
            self.engine = make_engine(self.database_url)
        return self.engine

    def open_messages(self) -> tuple[int, int]:
        """(messages a worker still has to do something for, all messages): the quiescence test."""
        with read_session_factory(self.db())() as s:
            total = s.scalar(select(func.count()).select_from(QueuedMessage)) or 0
            open_ = s.scalar(select(func.count()).select_from(QueuedMessage)
                             .where(QueuedMessage.done.is_(False), QueuedMessage.parked.is_(False))) or 0  # fmt: skip
        return int(open_), int(total)

    def holds(self, message_id: str) -> bool:
        """Whether a submission with this Message-ID is in the queue (committed before its 250)."""
        with read_session_factory(self.db())() as s:
            n = s.scalar(select(func.count()).select_from(QueuedMessage).where(
                QueuedMessage.origin == "submission",
                QueuedMessage.message_id.in_([message_id, message_id.strip("<>")])))  # fmt: skip
        return bool(n)

    def mailbox(self, address: str, folder: str = "INBOX") -> list[Path]:
        base = MaildirDelivery(load_settings(self.home).mail_dir).folder_path(address, folder)
        return [*base.glob("new/*"), *base.glob("cur/*")]


def _populate(node: Node, peer: Node, issued: dict[str, tuple[bytes, Path]]) -> None:
    """Mailboxes, certificates and the trust list of one operator (the peer's users too)."""
    settings = load_settings(node.home)
    engine = make_engine(settings.database_url)
    ca = (peer.home / "pki" / "ca.pem").read_bytes()
    with transaction(session_factory(engine)) as s:
        admin.trust_domain(s, peer.domain, relay="127.0.0.1:1", operator_dn=peer.operator_dn)
        register_certificate(s, ca, address=None, purpose="anchor")
        if node.name == "a":
            admin.add_practitioner(s, identifier="10000000009", last_name="Martin", first_name="Anne",
                                   profession_code="10")  # fmt: skip
            admin.add_mailbox(s, CLINICIAN, type="PER", rpps="10000000009", password=PASSWORD)
            admin.add_mailbox(s, COLLEAGUE, type="ORG", display_name="secretariat", password=PASSWORD)
            admin.add_mailbox(s, WARD, type="ORG", display_name="cardiologie")
            for addr in (PRACTITIONER, NURSE, LAB, FRONT, GHOST):
                admin.add_mailbox(s, addr, type="ORG")
            mine, theirs = (CLINICIAN, COLLEAGUE, WARD), (PRACTITIONER, NURSE, GHOST)
        else:
            for addr in (PRACTITIONER, NURSE, LAB, FRONT):  # no GHOST: B refuses it (550 5.1.1)
                admin.add_mailbox(s, addr, type="ORG", display_name=addr.split("@")[0])
            for addr in (CLINICIAN, COLLEAGUE):
                admin.add_mailbox(s, addr, type="ORG")
            mine, theirs = (PRACTITIONER, NURSE, FRONT), (CLINICIAN, COLLEAGUE)
        for addr in mine:
            pem, key_path = issued[addr]
            register_certificate(s, pem, address=addr, purpose="smime", key_path=str(key_path))
        for addr in theirs:
            register_certificate(s, issued[addr][0], address=addr, purpose="smime")
    engine.dispose()


def _pgp(a: Node, b: Node) -> None:
    """OpenPGP: LAB's key pair at B (A imports the public half), the senders' at A (B imports them)."""
    from gateway.crypto.openpgp import OpenPgp

    def export(node: Node, fpr: str) -> bytes:
        ring = OpenPgp(load_settings(node.home).gnupg_dir)
        try:
            return ring.export_public(fpr).encode()
        finally:
            ring.close()

    def run(node: Node, fn: Any, *args: Any) -> Any:
        settings = load_settings(node.home)
        engine = make_engine(settings.database_url)
        try:
            with transaction(session_factory(engine)) as s:
                return fn(s, settings, *args)
        finally:
            engine.dispose()

    lab = run(b, certs.pgp_generate, LAB)
    run(a, certs.pgp_import, LAB, export(b, lab))
    for sender in SENDERS:
        fpr = run(a, certs.pgp_generate, sender)
        run(b, certs.pgp_import, sender, export(a, fpr))


def build_operators(root: Path, database_urls: dict[str, str] | None, proxy_port: int) -> tuple[Node, Node]:
    """Both homes, configured and populated; A's route to B goes through ``proxy_port``."""
    from cryptography import x509

    nodes: dict[str, Node] = {}
    for name, domain in (("a", A_DOMAIN), ("b", B_DOMAIN)):
        home = root / name
        home.mkdir(parents=True)
        url = (database_urls or {}).get(name, "")
        first = {"operator": {"domains": [domain], "hostname": f"mx.{domain}"}, "database": {"url": url}}
        (home / CONFIG_NAME).write_text(render_toml(first), encoding="utf-8")
        init_operator(home)
        op = x509.load_pem_x509_certificate((home / "pki" / "operator.pem").read_bytes())
        ports = {"submission": free_port(), "inbound": free_port()}
        nodes[name] = Node(
            name, domain, home, ports, op.subject.rfc4514_string(), load_settings(home).database_url
        )
    a, b = nodes["a"], nodes["b"]
    for node, peer in ((a, b), (b, a)):
        pki = node.home / "pki"
        (pki / "clients.pem").write_bytes(
            (pki / "ca.pem").read_bytes() + (peer.home / "pki" / "ca.pem").read_bytes()
        )
        config = {
            "operator": {"domains": [node.domain], "hostname": f"mx.{node.domain}",
                         "organisation": f"Operateur {node.domain}"},
            "listen": {"submission": f"127.0.0.1:{node.ports['submission']}", "submissions": "",
                       "inbound": f"127.0.0.1:{node.ports['inbound']}", "imap": "", "imaps": "", "metrics": "",
                       "api": ""},
            "tls": {"client_ca": str(pki / "clients.pem")},
            "database": {"url": (database_urls or {}).get(node.name, "")},
            "queue": dict(QUEUE_SETTINGS),
        }  # fmt: skip
        (node.home / CONFIG_NAME).write_text(render_toml(config), encoding="utf-8")
    issued: dict[str, tuple[bytes, Path]] = {}
    for node, addrs in ((a, (CLINICIAN, COLLEAGUE, WARD)), (b, (PRACTITIONER, NURSE, FRONT, GHOST))):
        for addr in addrs:
            issued[addr] = _issue_user(node.home, node.home / "pki", addr)
    _populate(a, b, issued)
    _populate(b, a, issued)
    _pgp(a, b)
    for node, peer_domain, port, peer in ((a, B_DOMAIN, proxy_port, b), (b, A_DOMAIN, a.ports["inbound"], a)):
        engine = make_engine(node.database_url)
        with transaction(session_factory(engine)) as s:
            admin.trust_domain(s, peer_domain, relay=f"127.0.0.1:{port}", operator_dn=peer.operator_dn)
        engine.dispose()
    return a, b


# --- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    message_id: str
    sender: str
    recipients: tuple[str, ...]

    @property
    def token(self) -> str:
        return self.message_id.strip("<>")


def plan_messages(n: int, seed: int) -> list[Planned]:
    rng = random.Random(f"messages:{seed}")
    out: list[Planned] = []
    for i in range(n):
        if rng.random() < FAIL_SHARE:
            rcpts = [FRONT, *rng.sample(list(WEIGHTS), rng.randint(0, 2))]
        else:
            rcpts = [r for r, w in WEIGHTS.items() if rng.random() < w] or [rng.choice(list(WEIGHTS))]
        out.append(Planned(f"<fi.{seed}.{i}@{A_DOMAIN}>", rng.choice(SENDERS), tuple(sorted(rcpts))))
    return out


FILLER = "".join(f"Ligne {i:03d} du compte rendu de test, sans donnee de sante.\n" for i in range(40))


def render(p: Planned) -> bytes:
    """A message big enough for the proxy to tell its DATA flush from a TLS flight, even compressed
    (OpenPGP compresses: 6 KB of seeded random bytes, base64, keep it above 6 KB on the wire)."""
    noise = base64.encodebytes(random.Random(p.message_id).randbytes(6000)).decode()
    msg = EmailMessage()
    msg["From"] = p.sender
    msg["To"] = ", ".join(p.recipients)
    msg["Subject"] = "Compte rendu de test"
    msg["Date"] = "Tue, 03 Nov 2026 10:00:00 +0100"
    msg["Message-ID"] = p.message_id
    msg.set_content(f"Bonjour,\n{FILLER}\nReference de test:\n{noise}")
    return msg.as_bytes(policy=SMTP_POLICY)


class Submitter:
    """Blocking SMTP submission to A (STARTTLS + AUTH), one connection per sender, reopened after a failure."""

    def __init__(self, a: Node) -> None:
        self.a = a
        self.context = ssl.create_default_context(cafile=str(a.home / "pki" / "ca.pem"))
        self.conns: dict[str, tuple[smtplib.SMTP, int]] = {}  # sender: (connection, A's generation then)

    def send(self, p: Planned) -> int:
        """Submit ``p``; returns the generation of A the connection was opened to."""
        conn, generation = self.conns.get(p.sender, (None, 0))
        if conn is not None and generation != self.a.generation:  # A was restarted since: that one is dead
            self.reset(p.sender)
            conn = None
        if conn is None:
            generation = self.a.generation
            conn = smtplib.SMTP("127.0.0.1", self.a.ports["submission"], timeout=120)
            self.conns[p.sender] = (conn, generation)
            conn.starttls(context=self.context)
            conn.login(p.sender, PASSWORD)
        refused = conn.sendmail(p.sender, list(p.recipients), render(p))
        if refused:
            raise HarnessError(f"A refused recipients of {p.message_id}: {refused}")
        return generation

    def prepare(self, sender: str) -> int:
        """Drop the sender's connection if A was restarted since it was opened; the generation of A
        the next ``send`` talks to (a failure while that generation is still up is unexplained)."""
        conn, generation = self.conns.get(sender, (None, 0))
        if conn is not None and generation == self.a.generation:
            return generation
        self.reset(sender)
        return self.a.generation

    def reset(self, sender: str | None = None) -> None:
        """Forget a sender's connection (all of them without ``sender``): the next send opens a new one."""
        for key in [sender] if sender else list(self.conns):
            conn, _ = self.conns.pop(key, (None, 0))
            if conn is not None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    conn.close()


# --- the run -----------------------------------------------------------------------------------


@dataclass
class RunStats:
    submitted: list[Planned] = field(default_factory=list)
    resubmitted: int = 0
    kept_after_cut: int = 0  # a cut submission found committed in A's queue (not resent)
    anomalies: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def _until(predicate: Any, what: str, timeout: float, interval: float = 0.1) -> None:
    """Poll ``predicate`` until it holds: the events waited on are in other processes."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        if loop.time() > end:
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


async def _restart(node: Node, timeout: float) -> None:
    node.start()
    await _until(node.listening, f"{node.name} listening (generation {node.generation})", timeout)


async def _submit_all(a: Node, plan: list[Planned], stats: RunStats, progress: asyncio.Condition,
                      window: int, timeout: float) -> None:  # fmt: skip
    sub = Submitter(a)
    try:
        for p in plan:
            await _until(
                lambda: a.alive() and a.open_messages()[0] < window, "room in A's queue", timeout, 0.05
            )
            while True:
                generation = sub.prepare(p.sender)
                try:
                    await asyncio.to_thread(sub.send, p)
                    break
                except smtplib.SMTPRecipientsRefused as exc:
                    raise HarnessError(
                        f"A refused every recipient of {p.message_id}: {exc.recipients}"
                    ) from exc
                except smtplib.SMTPResponseException as exc:  # a definite answer: not accepted
                    sub.reset(p.sender)
                    if exc.smtp_code < 400 or exc.smtp_code >= 500:
                        stats.anomalies.append(f"submission of {p.message_id} refused: {exc.smtp_code}")
                        raise HarnessError(
                            f"A refused {p.message_id}: {exc.smtp_code} {exc.smtp_error!r}"
                        ) from exc
                    stats.resubmitted += 1
                    await asyncio.sleep(0.2)  # a 4xx (A busy or restarting): submit again shortly
                except (smtplib.SMTPException, OSError):  # the connection died: was it committed?
                    sub.reset(p.sender)
                    try:
                        await _until(lambda g=generation: a.generation != g or not a.alive(),  # type: ignore[misc]
                                     "A killed (a submission connection died)", 30)  # fmt: skip
                    except HarnessError:
                        stats.anomalies.append(f"submission connection of {p.message_id} died while A was up")
                    await _until(a.listening, "A back after a kill", timeout)
                    if await asyncio.to_thread(a.holds, p.message_id):
                        stats.kept_after_cut += 1
                        break
                    stats.resubmitted += 1
            stats.submitted.append(p)
            async with progress:
                progress.notify_all()
    finally:
        await asyncio.to_thread(sub.reset)


async def _killer(nodes: dict[str, Node], schedule: list[tuple[int, str]], rng: random.Random, stats: RunStats,
                  progress: asyncio.Condition, timeout: float) -> None:  # fmt: skip
    for threshold, name in schedule:
        async with progress:
            await progress.wait_for(lambda t=threshold: len(stats.submitted) >= t)  # type: ignore[misc]
        await asyncio.sleep(rng.uniform(0.0, 1.5))  # a random moment, not a wait for an event
        node = nodes[name]
        await asyncio.to_thread(node.kill)
        await asyncio.sleep(rng.uniform(0.0, 1.0))  # down for a random while
        await _restart(node, timeout)


async def _quiescent(a: Node, b: Node, timeout: float) -> None:
    """Until neither queue has work left and no new message appeared between two looks."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last: tuple[int, ...] | None = None
    while True:
        snap = (*(await asyncio.to_thread(b.open_messages)), *(await asyncio.to_thread(a.open_messages)))
        if snap[0] == 0 and snap[2] == 0 and snap == last:
            return
        last = snap
        if loop.time() > end:
            raise HarnessError(
                f"queues not drained after {timeout:.0f} s (B open, B all, A open, A all: {snap})"
            )
        await asyncio.sleep(1.0)


@dataclass
class Report:
    """The checker's counts and every offending (message, recipient) pair."""

    counts: dict[str, int]
    problems: list[str]
    drops: dict[str, int]
    seconds: float
    #: What was checked, so a test can check again after changing a mailbox (the checker's own test).
    operators: tuple[Node, Node] | None = None
    submitted: list[Planned] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [" ".join(f"{k}={v}" for k, v in self.counts.items()),
                 "drops by kind: " + (", ".join(f"{k}={v}" for k, v in sorted(self.drops.items())) or "none"),
                 f"seconds={self.seconds:.1f}"]  # fmt: skip
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems[:200]]
        return "\n".join(lines)


async def run_fault_injection(root: Path, *, messages: int, kills: int, seed: int, drop_probability: float,
                              database_urls: dict[str, str] | None = None, window: int = 24,
                              timeout: float = 600.0) -> Report:  # fmt: skip
    """Build both operators under ``root``, run the faults, wait for the queues to drain, check.

    ``kills`` SIGKILLs of each operator happen at seeded random points of the submission;
    ``timeout`` bounds each wait (a start, the drain), never a single test assertion."""
    started = time.monotonic()
    proxy_port = free_port()
    a, b = await asyncio.to_thread(build_operators, root, database_urls, proxy_port)
    proxy = FaultProxy(b.ports["inbound"], proxy_port, seed=seed, drop_probability=drop_probability)
    await proxy.start()
    rng = random.Random(f"kills:{seed}")
    targets = ["a"] * kills + ["b"] * kills
    rng.shuffle(targets)
    lo, hi = max(1, messages // 20), max(2, messages * 9 // 10)
    thresholds = sorted(rng.randint(lo, hi) for _ in targets)
    plan = plan_messages(messages, seed)
    stats = RunStats()
    progress = asyncio.Condition()
    flow_started = time.monotonic()
    try:
        await _restart(b, timeout)
        await _restart(a, timeout)
        schedule = list(zip(thresholds, targets, strict=True))
        tasks = [asyncio.create_task(_submit_all(a, plan, stats, progress, window, timeout)),
                 asyncio.create_task(_killer({"a": a, "b": b}, schedule, rng, stats, progress, timeout))]  # fmt: skip
        try:
            for task in asyncio.as_completed(tasks):
                await task
            await _quiescent(a, b, timeout)
        except HarnessError as exc:  # stuck or not drained: still check, so the report says what is where
            stats.anomalies.append(f"run stopped early: {exc}")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        stats.seconds = time.monotonic() - flow_started
    finally:
        await proxy.stop()
        for node in (a, b):
            await asyncio.to_thread(node.stop)
    try:
        report = await asyncio.to_thread(check, a, b, stats.submitted)
    finally:
        for node in (a, b):
            if node.engine is not None:
                node.engine.dispose()
    report.counts["kills_a"], report.counts["kills_b"] = a.kills, b.kills
    report.counts["connections"], report.counts["drops"] = proxy.connections, proxy.dropped
    report.counts["faults_planned"] = sum(proxy.planned.values())
    report.counts["resubmitted"], report.counts["kept_after_cut"] = stats.resubmitted, stats.kept_after_cut
    report.drops = dict(proxy.drops)
    report.problems += stats.anomalies
    report.seconds = stats.seconds
    report.counts["setup_seconds"] = round(flow_started - started)
    report.operators, report.submitted = (a, b), stats.submitted
    return report


# --- the checker -------------------------------------------------------------------------------


def _tokens(path: Path) -> set[str]:
    return {m.decode() for m in TOKEN.findall(path.read_bytes())}


def _dsn_of(data: bytes) -> tuple[str, list[str]] | None:
    """(reporting MTA, final recipients) of a DSN, or None for any other message."""
    recipients = [r.decode().lower() for r in re.findall(rb"Final-Recipient: rfc822; *([^\s]+)", data)]
    if not recipients:
        return None
    mta = re.search(rb"Reporting-MTA: dns; *([^\s]+)", data)
    return (mta.group(1).decode() if mta else "?"), recipients


def check(a: Node, b: Node, submitted: list[Planned]) -> Report:
    """Prove each (message, recipient) ended exactly once as expected; count and list what did not."""
    problems: list[str] = []
    counts: Counter[str] = Counter()
    by_token = {p.token: p for p in submitted}
    counts["submitted"] = len(submitted)
    counts["pairs"] = sum(len(p.recipients) for p in submitted)

    # Maildirs: copies per (message, recipient), DSNs per (message, final recipient, reporter).
    copies: Counter[tuple[str, str]] = Counter()
    files: dict[tuple[str, str], list[str]] = {}
    for node, boxes in ((b, (*B_DELIVERED, FRONT)), (a, (WARD,))):
        for box in boxes:
            for path in node.mailbox(box):
                data = path.read_bytes()
                if box == FRONT and b"X-Mssgw-Quarantined:" in data:
                    continue  # a quarantine notice, counted below
                for token in _tokens(path):
                    copies[(token, box)] += 1
                    files.setdefault((token, box), []).append(path.name)
    dsns: Counter[tuple[str, str, str]] = Counter()
    dsn_files: dict[tuple[str, str, str], list[str]] = {}
    for sender in SENDERS:
        for path in a.mailbox(sender):
            data = path.read_bytes()
            dsn = _dsn_of(data)
            if dsn is None:
                problems.append(f"{sender}: unexpected message in INBOX ({path.name})")
                continue
            counts["dsns"] += 1
            for token in _tokens(path):
                for rcpt in dsn[1]:
                    dsns[(token, rcpt, dsn[0])] += 1
                    dsn_files.setdefault((token, rcpt, dsn[0]), []).append(path.name)
    notices: Counter[str] = Counter()
    for path in b.mailbox(FRONT):
        m = re.search(rb"X-Mssgw-Quarantined: *(\w+)", path.read_bytes())
        if m:
            notices[m.group(1).decode()] += 1

    # Databases: A's recipient states; B's quarantine; leftovers on both sides.
    a_states: dict[tuple[str, str], list[str]] = {}
    with read_session_factory(a.db())() as s:
        protections = s.execute(select(QueuedRecipient.protection, func.count()).group_by(QueuedRecipient.protection)
                                .join(QueuedMessage, QueuedRecipient.message_id == QueuedMessage.id)
                                .where(QueuedMessage.origin == "submission")).all()  # fmt: skip
        rows = s.execute(select(QueuedMessage.message_id, QueuedRecipient.address, QueuedRecipient.state,
                                QueuedMessage.id)
                         .join(QueuedRecipient, QueuedRecipient.message_id == QueuedMessage.id)
                         .where(QueuedMessage.origin == "submission")).all()  # fmt: skip
    a_ids: dict[str, set[str]] = {}  # A's queue id(s) per submitted message
    for mid, addr, state, qid in rows:
        a_states.setdefault(((mid or "").strip("<>"), addr.lower()), []).append(str(state.value))
        a_ids.setdefault((mid or "").strip("<>"), set()).add(qid)
    quarantined: Counter[tuple[str, str]] = Counter()
    quarantine_ids: dict[tuple[str, str], list[str]] = {}
    with read_session_factory(b.db())() as s:
        rows = s.execute(select(QueuedMessage.id, QueuedMessage.message_id, QueuedRecipient.address)
                         .join(QueuedRecipient, QueuedRecipient.message_id == QueuedMessage.id)
                         .where(QueuedRecipient.state == "quarantined")).all()  # fmt: skip
    for qid, mid, addr in rows:
        key = ((mid or "").strip("<>"), addr.lower())
        quarantined[key] += 1
        quarantine_ids.setdefault(key, []).append(qid)
    b_queue: dict[tuple[str, str], list[str]] = {}  # B's inbound queue ids per (message, recipient)
    with read_session_factory(b.db())() as s:
        rows = s.execute(select(QueuedMessage.id, QueuedMessage.message_id, QueuedRecipient.address)
                         .join(QueuedRecipient, QueuedRecipient.message_id == QueuedMessage.id)
                         .where(QueuedMessage.origin == "inbound")).all()  # fmt: skip
    for qid, mid, addr in rows:
        b_queue.setdefault(((mid or "").strip("<>"), addr.lower()), []).append(qid)
    for node in (a, b):
        with read_session_factory(node.db())() as s:
            left = s.execute(select(QueuedMessage.id, QueuedMessage.claimed_by, QueuedMessage.parked)
                             .where(QueuedMessage.done.is_(False))).all()  # fmt: skip
        for qid, claimed_by, parked in left:
            if not parked:
                problems.append(f"{node.name}: queue {qid} still pending (not done, not parked)")
                counts["pending"] += 1
            if claimed_by:
                problems.append(f"{node.name}: queue {qid} still claimed by {claimed_by}")
                counts["claimed"] += 1

    a_host, b_host = f"mx.{A_DOMAIN}", f"mx.{B_DOMAIN}"
    for p in submitted:
        for r in p.recipients:
            pair = f"({p.message_id}, {r})"
            states = a_states.get((p.token, r), [])
            want_state = "bounced" if r == GHOST else "delivered"
            if states != [want_state]:
                problems.append(f"{pair}: A's queue says {states or 'nothing'}, expected {want_state}")
            if r in B_DELIVERED or r == WARD:
                n = copies[(p.token, r)]
                expected_dsn: set[str] = set()
            elif r == GHOST:
                n = dsns[(p.token, r, a_host)]
                expected_dsn = {a_host}
            else:  # FRONT: held at B, the sender told once by B, the recipient noticed once
                n = quarantined[(p.token, r)]
                expected_dsn = {b_host}
                if copies[(p.token, r)]:
                    problems.append(
                        f"{pair}: delivered {copies[(p.token, r)]} time(s) though it must be held"
                    )
                for qid in quarantine_ids.get((p.token, r), []):
                    if notices[qid] != 1:
                        problems.append(f"{pair}: {notices[qid]} quarantine notices for B's queue {qid}")
                if dsns[(p.token, r, b_host)] != 1:
                    counts["duplicate_dsns" if dsns[(p.token, r, b_host)] > 1 else "lost_dsns"] += 1
                    problems.append(f"{pair}: {dsns[(p.token, r, b_host)]} DSNs from B, expected 1: files "
                                    f"{dsn_files.get((p.token, r, b_host), [])}, B's queue ids "
                                    f"{quarantine_ids.get((p.token, r), [])}, A's {sorted(a_ids.get(p.token, ()))}")  # fmt: skip
            for host in (a_host, b_host):
                if host not in expected_dsn and dsns[(p.token, r, host)]:
                    problems.append(f"{pair}: {dsns[(p.token, r, host)]} unexpected DSN(s) from {host}")
            if n == 0:
                counts["lost"] += 1
                problems.append(f"{pair}: lost (no copy, DSN or quarantine)")
            elif n > 1:
                counts["duplicates"] += 1
                names = dsn_files.get((p.token, r, a_host), []) if r == GHOST else files.get((p.token, r), [])
                where = (f"files {names}, B's queue ids {b_queue.get((p.token, r), [])}, "
                         f"A's {sorted(a_ids.get(p.token, ()))}")  # fmt: skip
                problems.append(f"{pair}: {n} times (duplicate): {where}")
            elif r == GHOST:
                counts["bounced"] += 1
            elif r == FRONT:
                counts["quarantined"] += 1
            else:
                counts["delivered"] += 1
    for (token, r), n in quarantined.items():
        if token not in by_token or r != FRONT:
            problems.append(f"B quarantined ({token}, {r}) x{n}: not a message made to fail")
    for token, r in copies:
        if token not in by_token or r not in by_token[token].recipients:
            problems.append(f"copy of ({token}, {r}) that was never sent to it")
    order = ("submitted", "pairs", "delivered", "bounced", "dsns", "quarantined", "duplicates", "lost",
             "duplicate_dsns", "lost_dsns", "pending", "claimed")  # fmt: skip
    summary = {k: counts[k] for k in order}
    summary |= {f"protection_{name or 'none'}": int(n) for name, n in sorted(protections, key=str)}
    return Report(summary, problems, {}, 0.0)
