"""Helpers of the two-operator tests: operators, the wire proxy, messages and parsing."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from directory import admin
from directory.certificates import register_certificate
from directory.db import make_engine, session_factory, transaction
from gateway.config import CONFIG_NAME, Settings, load_settings, render_toml
from gateway.operator import init_operator
from tests.ports import free_port

A_DOMAIN = "a.mssante.test"
B_DOMAIN = "b.mssante.test"
CLINICIAN = f"dr.martin@{A_DOMAIN}"  # A's prescriber
COLLEAGUE = f"secretariat@{A_DOMAIN}"  # another mailbox of A
PRACTITIONER = f"ph.durand@{B_DOMAIN}"  # B's pharmacist
GHOST = f"ghost@{B_DOMAIN}"  # A has a certificate for it, B has no such mailbox
CLINICIAN_RPPS = "10000000009"  # the prescriber is a practitioner of the national directory (both sides)


def _add(s, addr: str, **kw: object) -> None:  # type: ignore[no-untyped-def]
    """The clinician is a PER mailbox of a practitioner; the other mailboxes are ORG mailboxes."""
    if addr == CLINICIAN:
        admin.add_practitioner(s, identifier=CLINICIAN_RPPS, last_name="Martin", first_name="Anne",
                               profession_code="10")
        admin.add_mailbox(s, addr, type="PER", rpps=CLINICIAN_RPPS)
    else:
        admin.add_mailbox(s, addr, type="ORG", **kw)  # type: ignore[arg-type]


def users_of() -> dict[str, list[str]]:
    return {"a": [CLINICIAN, COLLEAGUE], "b": [PRACTITIONER, GHOST]}


@dataclass
class Template:
    home: Path
    domain: str
    hostname: str
    operator_dn: str
    ca_pem: bytes


def _settings_overrides(domain: str, hostname: str, ports: dict[str, int], client_ca: str) -> dict[str, dict[str, object]]:
    return {
        "operator": {"domains": [domain], "hostname": hostname, "organisation": f"Operateur {domain}"},
        "listen": {
            "submission": f"127.0.0.1:{ports['submission']}",
            "submissions": "",
            "inbound": f"127.0.0.1:{ports['inbound']}",
            "imap": "",
            "imaps": "",
            "metrics": "",
            "api": "",
        },
        "tls": {"client_ca": client_ca},
        "database": {"url": ""},
    }


def _issue_user(home: Path, pki_dir: Path, address: str) -> tuple[bytes, Path]:
    pki = load_dev_pki(pki_dir)
    cert, key = issue_certificate(pki, kind="user", email=address)
    keys = home / "keys"
    cert_path, key_path = keys / f"{address}.pem", keys / f"{address}.key"
    save_certificate_and_key(cert, key, cert_path, key_path)
    return cert.public_bytes(serialization.Encoding.PEM), key_path


def build_templates(root: Path) -> dict[str, Template]:
    """Both operators' homes, fully configured except for ports (see the module docstring)."""
    out: dict[str, Template] = {}
    for name, domain in (("a", A_DOMAIN), ("b", B_DOMAIN)):
        home = root / name
        hostname = f"mx.{domain}"
        init_operator(home, domain=domain, hostname=hostname)
        ca_pem = (home / "pki" / "ca.pem").read_bytes()
        op = x509.load_pem_x509_certificate((home / "pki" / "operator.pem").read_bytes())
        out[name] = Template(home, domain, hostname, op.subject.rfc4514_string(), ca_pem)
    users = users_of()
    issued: dict[str, tuple[bytes, Path]] = {}
    for name, addrs in users.items():
        t = out[name]
        for addr in addrs:
            issued[addr] = _issue_user(t.home, t.home / "pki", addr)
    for name, peer in (("a", "b"), ("b", "a")):
        t, p = out[name], out[peer]
        # Our CA and the peer's CA for client certificates (mutual TLS) and anchors.
        (t.home / "pki" / "clients.pem").write_bytes(t.ca_pem + p.ca_pem)
        settings = load_settings(t.home)
        engine = make_engine(settings.database_url)
        with transaction(session_factory(engine)) as s:
            admin.trust_domain(s, p.domain, relay="127.0.0.1:1", operator_dn=p.operator_dn)
            register_certificate(s, p.ca_pem, address=None, purpose="anchor")
            for addr in users[name]:
                if addr == GHOST:
                    continue
                _add(s, addr, display_name=addr.split("@")[0])
            for addr in users[peer]:
                _add(s, addr)
            for addr in users[name]:
                pem, key_path = issued[addr]
                register_certificate(s, pem, address=addr, purpose="smime", key_path=str(key_path))
            for addr in users[peer]:
                register_certificate(s, issued[addr][0], address=addr, purpose="smime")
        engine.dispose()
    return out


class WireProxy:
    """A TCP relay that records every byte from client to server (and back)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: list[bytes]) -> None:
        try:
            while chunk := await reader.read(65536):
                log.append(chunk)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        t1 = asyncio.create_task(self._pipe(reader, up_writer, self.to_server))
        t2 = asyncio.create_task(self._pipe(up_reader, writer, self.to_client))
        self._tasks |= {t1, t2}
        await asyncio.gather(t1, t2, return_exceptions=True)
        self._tasks -= {t1, t2}

    @property
    def wire(self) -> bytes:
        return b"".join(self.to_server)


@dataclass
class Operator:
    name: str
    domain: str
    home: Path
    settings: Settings
    gateway: object
    workers: object
    operator_dn: str
    ca_pem: bytes
    clock: list[dt.datetime] = field(default_factory=list)

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.gateway.store  # type: ignore[attr-defined]

    @property
    def sessions(self):  # type: ignore[no-untyped-def]
        return self.gateway.sessions  # type: ignore[attr-defined]

    @property
    def inbound_port(self) -> int:
        return int(self.gateway.addresses["inbound"][1])  # type: ignore[attr-defined]

    async def set_relay(self, peer_domain: str, port: int, operator_dn: str | None = None) -> None:
        """Point the peer's route at ``port`` and apply it now, as the gateway's trust watcher would
        within seconds: the watcher then finds nothing new, and never retries deferred mail
        behind a test's back (its retry is due at the wall clock's now, the tests' clock is theirs)."""
        with transaction(self.sessions) as s:
            admin.trust_domain(s, peer_domain, relay=f"127.0.0.1:{port}", operator_dn=operator_dn)
        await self.gateway.reload_trust()  # type: ignore[attr-defined]

    def mailbox(self, address: str, folder: str = "INBOX") -> list[bytes]:
        from gateway.delivery.maildir import MaildirDelivery

        base = MaildirDelivery(self.settings.mail_dir).folder_path(address, folder)
        files = sorted([*base.glob("new/*"), *base.glob("cur/*")], key=lambda p: p.stat().st_mtime_ns)
        return [p.read_bytes() for p in files]

    def enqueue(self, data: bytes, sender: str, recipients: list[str]) -> str:
        return str(self.store.enqueue(data, sender=sender, recipients=recipients, origin="submission",
                                      auth_identity=sender).queue_id)  # fmt: skip

    def queue(self, queue_id: str) -> dict:  # type: ignore[type-arg]
        return self.store.get(queue_id)  # type: ignore[no-any-return]

    def receipts(self, kind: str | None = None) -> list[dict]:  # type: ignore[type-arg]
        rows = self.store.list(include_done=True, limit=1000)
        return [r for r in rows if r["kind"] in ((kind,) if kind else ("dsn", "mdn"))]


def _write_config(t: Template, home: Path, ports: dict[str, int],
                  extra: dict[str, dict[str, object]] | None = None) -> None:  # fmt: skip
    overrides = _settings_overrides(t.domain, t.hostname, ports, str(home / "pki" / "clients.pem"))
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    (home / CONFIG_NAME).write_text(render_toml(overrides), encoding="utf-8")


def copy_directory_to(home: Path, url: str) -> None:
    """Give an operator home a PostgreSQL database with the same directory as its SQLite one.

    The schema comes from the migrations; the rows (directory, trust list, certificates, keys)
    are copied table by table, and each serial column's sequence is moved past the copied ids.
    The audit trail starts afresh (its chain is the new database's own).
    """
    from sqlalchemy import insert, select, text

    import gateway.audit.models
    import gateway.queue.models  # noqa: F401  (every table in the metadata)
    from directory.db import migrate
    from directory.models import Base

    src = make_engine(f"sqlite:///{home / 'mssgw.db'}")
    dst = make_engine(url)
    try:
        migrate(dst)
        with src.connect() as read, dst.begin() as write:
            for table in Base.metadata.sorted_tables:
                if table.name.startswith("audit") or table.name == "alembic_version":
                    continue
                rows = [dict(r) for r in read.execute(select(table)).mappings()]
                if rows:
                    write.execute(insert(table), rows)
                for column in table.primary_key.columns:
                    if column.autoincrement is True or (
                        column.autoincrement == "auto" and column.type.python_type is int
                    ):
                        write.execute(
                            text(
                                f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'), "
                                f"COALESCE((SELECT MAX({column.name}) FROM {table.name}), 0) + 1, false)"
                            )
                        )
    finally:
        src.dispose()
        dst.dispose()


async def _start(name: str, t: Template, root: Path, extra: dict[str, dict[str, object]] | None = None,
                 database_url: str | None = None) -> Operator:  # fmt: skip
    from gateway.app import Gateway
    from gateway.queue.worker import Workers

    home = root / name
    shutil.copytree(t.home, home)
    if database_url is not None:
        copy_directory_to(home, database_url)
        extra = {**(extra or {}), "database": {"url": database_url}}
    _write_config(t, home, {"submission": free_port(), "inbound": free_port()}, extra)
    settings = load_settings(home)
    gw = Gateway(settings, workers=False, imap=False)  # the tests drive the workers
    await gw.start()
    op = Operator(name, t.domain, home, settings, gw, None, t.operator_dn, t.ca_pem)
    op.workers = Workers(settings, gw.sessions, gw.store, crypto_executor="thread", worker_id=f"{name}-worker",
                         poll_interval=0.05)  # fmt: skip
    return op


@dataclass
class Pair:
    a: Operator
    b: Operator
    proxy: WireProxy

    async def flow(self, *, now: dt.datetime | None = None, rounds: int = 8) -> None:
        """Run both operators' workers until neither has anything ready (A first, then B)."""
        for _ in range(rounds):
            n = await self.a.workers.run_once(now=now)  # type: ignore[attr-defined]
            n += await self.b.workers.run_once(now=now)  # type: ignore[attr-defined]
            if n == 0:
                return


# --- messages ------------------------------------------------------------------------------------

PDF = (b"%PDF-1.4\n% ordonnance\n1 0 obj << /Type /Catalog >> endobj\n"
       b"PRESCRIPTION-SECRET-7f3a: amoxicilline 1 g, 3 fois par jour, 6 jours\n" + bytes(range(256)) * 8
       + b"\n%%EOF\n")  # fmt: skip
SUBJECT = "Ordonnance patient DUPONT-SECRET-42"


def prescription(*, sender: str = CLINICIAN, to: str = PRACTITIONER, mdn: bool = True,
                 message_id: str | None = None) -> bytes:  # fmt: skip
    msg = EmailMessage()
    msg["From"] = f"Dr Martin <{sender}>"
    msg["To"] = to
    msg["Subject"] = SUBJECT
    msg["Date"] = "Tue, 03 Nov 2026 10:00:00 +0100"
    msg["Message-ID"] = message_id or f"<{dt.datetime.now().timestamp()}.rx@{A_DOMAIN}>"
    if mdn:
        msg["Disposition-Notification-To"] = sender
    msg.set_content("Bonjour,\nveuillez trouver l'ordonnance ci-jointe.\n")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="ordonnance.pdf")
    return msg.as_bytes(policy=policy.SMTP)


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def local_original(data: bytes) -> EmailMessage:
    """A message between two of an operator's mailboxes, as its reader's client gets it: the original
    (no multipart/signed or message/rfc822 wrapper), with Return-Path and one Authentication-Results."""
    msg = parse(data)
    assert msg.get_content_type() not in ("multipart/signed", "message/rfc822"), msg.get_content_type()
    assert len(msg.get_all("Return-Path") or []) == 1
    assert len(msg.get_all("Authentication-Results") or []) == 1
    return msg
