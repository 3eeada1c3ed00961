"""A real IMAP service on random loopback ports, with TLS from the operator's development PKI."""

from __future__ import annotations

import email.policy
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from directory import admin
from directory.db import make_engine, session_factory, transaction
from directory.identifiers import luhn_valid
from gateway.audit.trail import AuditWriter
from gateway.auth import Authenticator
from gateway.config import Settings, load_settings
from gateway.delivery.maildir import MaildirDelivery
from gateway.imap.server import ImapService, start_imap
from tests.ports import free_port as _free_port

DOMAIN = "a.mssante.test"
ALICE = f"alice.martin@{DOMAIN}"  # PER (practitioner)
BOB = f"bob.durand@{DOMAIN}"  # PER
SECRETARIAT = f"secretariat.cardio@{DOMAIN}"  # ORG, delegated to ALICE
GONE = f"ancien.medecin@{DOMAIN}"  # deactivated
PASSWORD = "correct horse battery"
ORG_PASSWORD = "org mailbox passphrase"
MAX_FAILURES = 3


def rpps(seed: int) -> str:
    """A Luhn-valid 11-digit RPPS number built from ``seed``."""
    body = f"1{seed:09d}"
    return next(body + str(d) for d in range(10) if luhn_valid(body + str(d)))


@dataclass
class Imap:
    settings: Settings
    factory: sessionmaker[Session]
    service: ImapService
    authenticator: Authenticator
    audit: AuditWriter
    delivery: MaildirDelivery
    ca: Path

    @property
    def starttls_port(self) -> int:
        return self.service.addresses["imap"][1]

    @property
    def tls_port(self) -> int:
        return self.service.addresses["imaps"][1]

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture
async def imap(sqlite_home: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Imap]:
    monkeypatch.setenv("MSSGW_LISTEN_IMAP", f"127.0.0.1:{_free_port()}")
    monkeypatch.setenv("MSSGW_LISTEN_IMAPS", f"127.0.0.1:{_free_port()}")
    monkeypatch.setenv("MSSGW_AUTH_MAX_FAILURES", str(MAX_FAILURES))
    monkeypatch.setenv("MSSGW_AUTH_BASE_DELAY", "0.01")
    monkeypatch.setenv("MSSGW_AUTH_MAX_DELAY", "0.02")
    settings = load_settings(sqlite_home)
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    with transaction(factory) as session:
        for n, (address, first, last) in enumerate(
            [(ALICE, "Alice", "Martin"), (BOB, "Bob", "Durand"), (GONE, "Paul", "Ancien")], start=1
        ):
            admin.add_practitioner(session, identifier=rpps(n), first_name=first, last_name=last)
            admin.add_mailbox(session, address, type="PER", rpps=rpps(n), password=PASSWORD)
        admin.add_mailbox(session, SECRETARIAT, type="ORG", password=ORG_PASSWORD, display_name="Secretariat")
        admin.delegate(session, SECRETARIAT, ALICE)
        admin.set_active(session, GONE, False)
    audit = AuditWriter(factory)
    audit.start()
    authenticator = Authenticator(factory, settings, audit)
    service = await start_imap(settings, factory, authenticator)
    try:
        yield Imap(settings, factory, service, authenticator, audit, MaildirDelivery(settings.mail_dir),
                   settings.pki_dir / "ca.pem")
    finally:
        await service.close()
        await audit.close()
        engine.dispose()


def pdf_bytes() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n" + bytes(range(256))
    )


def lab_report(subject: str = "Compte rendu biologie", to: str = ALICE) -> bytes:
    """A MIME message with a PDF attachment and an Authentication-Results header, CRLF line ends."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Authentication-Results"] = "mx.a.mssante.test; smime=pass header.from=labo@b.mssante.test"
    msg["From"] = "Laboratoire <labo@b.mssante.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = "<cr-1234@b.mssante.test>"
    msg["Date"] = "Tue, 02 Jun 2026 10:00:00 +0200"
    msg.set_content("Bonjour,\nveuillez trouver le compte rendu ci-joint.\n")
    msg.add_attachment(pdf_bytes(), maintype="application", subtype="pdf", filename="cr.pdf")
    return msg.as_bytes()
