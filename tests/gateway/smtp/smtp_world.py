"""Helpers of the SMTP tests: the test world (a running gateway, its directory and client TLS material).

The operator a.mssante.test (dev PKI from ``init_operator``) serves:
sec@ (ORG, password), bob@ (ORG), app@ (APP, client certificate registered), old@
(deactivated); it trusts b.mssante.test (operator certificate from the same CA,
``operator_dn`` recorded, mailbox doc@b.mssante.test) and c.mssante.test. Peer
certificates: b's operator (trusted), c's operator (trusted CA, other domain), and one
from a CA we do not trust (trustme).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from cryptography.hazmat.primitives import serialization

from directory import admin
from directory.certificates import register_certificate
from directory.db import make_engine, session_factory, transaction
from gateway.app import Gateway
from gateway.config import Settings, load_settings
from tests.ports import free_port

PASSWORD = "correct horse battery staple"
DOMAIN = "a.mssante.test"


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PeerCerts:
    app: CertFiles  # app@a.mssante.test, registered as tls-client
    peer_b: CertFiles  # operator of b.mssante.test
    peer_c: CertFiles  # operator of c.mssante.test (trusted CA, other domain)
    foreign: CertFiles  # operator of b.mssante.test, issued by a CA we do not trust
    peer_b_subject: str


@dataclass
class World:
    home: Path
    settings: Settings
    gateway: Gateway
    certs: PeerCerts

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.pem"

    def port(self, name: str) -> int:
        return self.gateway.addresses[name][1]

    def client_context(self, cert: CertFiles | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            ctx.load_cert_chain(cert.cert, cert.key)
        return ctx

    def client(self, listener: str = "submission", cert: CertFiles | None = None) -> aiosmtplib.SMTP:
        implicit = listener == "submissions"
        return aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port(listener), use_tls=implicit,
                               start_tls=False, tls_context=self.client_context(cert), timeout=10)

    async def submitter(self, user: str = f"sec@{DOMAIN}", password: str = PASSWORD) -> aiosmtplib.SMTP:
        smtp = self.client()
        await smtp.connect()
        await smtp.starttls(server_hostname="localhost")
        await smtp.login(user, password)
        return smtp


def write_settings(home: Path, extra: dict[str, dict[str, object]] | None = None) -> None:
    """Random loopback ports, fast login throttling, no IMAP; ``extra`` overrides.

    Both submission ports ask for a client certificate here (``tls.request_client_cert``), as
    a port set aside for software does: the certificate-login tests use them. The default
    (only the API and inbound ask) is tested by ``test_client_cert_request``."""
    import tomllib

    from gateway.config import render_toml

    raw = tomllib.loads((home / "mssgw.toml").read_text())
    raw.setdefault("tls", {})["request_client_cert"] = ["submission", "submissions", "api"]
    raw["listen"].update({"submission": f"127.0.0.1:{free_port()}", "submissions": f"127.0.0.1:{free_port()}",
                          "inbound": f"127.0.0.1:{free_port()}", "imap": "", "imaps": "", "api": "",
                          "metrics": f"127.0.0.1:{free_port()}"})
    raw["auth"].update({"base_delay": 0.01, "max_delay": 0.02, "max_failures": 3})
    raw["limits"].update({"max_message_size": 200_000, "max_recipients": 3})
    for section, values in (extra or {}).items():
        raw[section].update(values)
    (home / "mssgw.toml").write_text(render_toml(raw))


@asynccontextmanager
async def started(home: Path, certs: PeerCerts) -> AsyncIterator[World]:
    """The listeners (no workers, no IMAP) of the gateway whose home is ready, stopped afterwards."""
    settings = load_settings(home)
    gateway = Gateway(settings, workers=False, imap=False)
    await gateway.start()
    try:
        yield World(home, settings, gateway, certs)
    finally:
        await gateway.stop()


def populate(settings: Settings, certs: PeerCerts) -> None:
    engine = make_engine(settings.database_url)
    try:
        with transaction(session_factory(engine)) as db:
            admin.trust_domain(db, "b.mssante.test", relay="127.0.0.1:1", operator_dn=certs.peer_b_subject)
            admin.trust_domain(db, "c.mssante.test", relay="127.0.0.1:1", operator_dn="CN=c-operator")
            admin.add_mailbox(db, f"sec@{DOMAIN}", type="ORG", display_name="Secretariat", password=PASSWORD)
            admin.add_mailbox(db, f"bob@{DOMAIN}", type="ORG", display_name="Bob")
            admin.add_mailbox(db, f"app@{DOMAIN}", type="APP", display_name="Prescription software")
            admin.add_mailbox(db, f"old@{DOMAIN}", type="ORG", display_name="Old")
            admin.set_active(db, f"old@{DOMAIN}", False)
            admin.add_mailbox(db, "doc@b.mssante.test", type="ORG", source="whitelist")
            register_certificate(db, certs.app.cert.read_bytes(), address=f"app@{DOMAIN}", purpose="tls-client")
    finally:
        engine.dispose()


def cert_pem_der(path: Path) -> bytes:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def message(sender: str = f"sec@{DOMAIN}", to: str = f"bob@{DOMAIN}", *, body: str = "Bonjour.\r\n",
            extra: str = "", message_id: str = "<m1@a.mssante.test>") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: Resultats\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
            f"Message-ID: {message_id}\r\n{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"\r\n{body}").encode()
