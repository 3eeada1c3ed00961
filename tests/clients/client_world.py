"""Helpers of the client matrix: a whole gateway (submission, submissions, IMAP, IMAPS, queue workers) for real, unmodified mail clients.

The operator a.mssante.test (development PKI from ``init_operator``, TLS name ``localhost``) serves
alice (PER: a practitioner with her own S/MIME certificate) and bob (PER), both with passwords.
Clients verify the server certificate against the operator's CA (``ca.pem``); nothing is
accepted blindly. ``World.delivered`` waits for a mailbox to change on the in-process notice
that local delivery sends (``gateway.delivery.maildir.mailbox_events``): no sleeping, no polling.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from directory import admin
from directory.db import make_engine, session_factory, transaction
from gateway.app import Gateway
from gateway.config import Settings
from gateway.delivery.maildir import MaildirDelivery, mailbox_events
from gateway.operator import register_certificate

DOMAIN = "a.mssante.test"
ALICE = f"alice.martin@{DOMAIN}"
BOB = f"bob.durand@{DOMAIN}"
PASSWORD = "correct horse battery staple"
ALICE_RPPS = "10000000009"
BOB_RPPS = "10000000017"


@dataclass
class World:
    home: Path
    settings: Settings
    gateway: Gateway
    tmp: Path

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.pem"

    def port(self, name: str) -> int:
        return int(self.gateway.addresses[name][1])

    @property
    def maildir(self) -> MaildirDelivery:
        return MaildirDelivery(self.settings.mail_dir)

    def folder(self, address: str, folder: str = "INBOX") -> list[bytes]:
        base = self.maildir.folder_path(address, folder)
        files = sorted([*base.glob("new/*"), *base.glob("cur/*")], key=lambda p: p.stat().st_mtime_ns)
        return [p.read_bytes() for p in files]

    async def delivered(self, address: str, count: int, folder: str = "INBOX") -> list[bytes]:
        """Wait (on delivery notices) until ``folder`` of ``address`` holds ``count`` messages."""
        with mailbox_events.listen(self.maildir.mailbox_path(address)) as changed:
            while len(self.folder(address, folder)) < count:
                try:
                    await asyncio.wait_for(changed.wait(), 60)  # bounded: a lost message fails the test
                except TimeoutError:
                    store = self.gateway.store
                    queued = [store.get(m["id"]) for m in store.list(include_done=True)] if store else []
                    states = [(q["id"], q["recipient_states"]) for q in queued]
                    raise AssertionError(f"{address} got {len(self.folder(address, folder))} of {count}; "
                                         f"queue: {states}") from None  # fmt: skip
                changed.clear()
        return self.folder(address, folder)

    async def run(self, argv: Sequence[str], *, stdin: bytes = b"", env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        """Run a client off the event loop (the gateway keeps serving it meanwhile)."""
        return await asyncio.to_thread(subprocess.run, list(argv), input=stdin, capture_output=True, timeout=120,
                                       env=env, cwd=cwd, check=False)  # fmt: skip


def populate(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    try:
        pki = load_dev_pki(settings.pki_dir)
        cert, key = issue_certificate(pki, kind="user", email=ALICE)
        cert_path, key_path = settings.keys_dir / "alice.pem", settings.keys_dir / "alice.key"
        save_certificate_and_key(cert, key, cert_path, key_path)
        with transaction(session_factory(engine)) as db:
            admin.add_practitioner(db, identifier=ALICE_RPPS, last_name="Martin", first_name="Anne",
                                   profession_code="10")  # fmt: skip
            admin.add_practitioner(db, identifier=BOB_RPPS, last_name="Durand", first_name="Bob",
                                   profession_code="21")  # fmt: skip
            admin.add_mailbox(db, ALICE, type="PER", rpps=ALICE_RPPS, password=PASSWORD)
            admin.add_mailbox(db, BOB, type="PER", rpps=BOB_RPPS, password=PASSWORD)
            register_certificate(db, cert.public_bytes(serialization.Encoding.PEM), address=ALICE, purpose="smime",
                                 key_path=str(key_path))  # fmt: skip
    finally:
        engine.dispose()
