"""The outbound step (``gateway.process.outbound``): grouping by protection, and what each reply makes of a recipient.

A real operator home (keys, directory, Maildir) and real S/MIME; only the relay boundary is the
in-memory double (``Peer``: answers per recipient, keeps what it was sent), as in
``tests/gateway/queue/test_verdict_commit.py``. What went on the wire is checked by ``openssl``;
the step's answer is its ``Verdict`` (outcomes, receipts), read before anything is committed.
"""

from __future__ import annotations

import datetime as dt
import email
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import update

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from directory import admin
from directory.certificates import register_certificate
from directory.db import make_engine, session_factory, transaction
from gateway.config import load_settings
from gateway.delivery.relay import Attempt, DsnRequest, Route
from gateway.process import pipeline
from gateway.process.verdict import Verdict
from gateway.queue.models import QueuedMessage
from gateway.queue.store import QueueStore
from gateway.queue.worker import Workers

SENDER = "dr.martin@a.mssante.test"
LOCAL = "secretariat@a.mssante.test"
CARDIO = "cardio@b.mssante.test"  # has a certificate
RADIO = "radio@b.mssante.test"  # has a certificate
PHARMACY = "ph@b.mssante.test"  # none: signed for the pinned operator
NOWHERE = "x@c.mssante.test"  # none, and its operator has no pinned identity: cannot be protected
MESSAGE = (f"From: {SENDER}\r\nTo: {CARDIO}\r\nSubject: s\r\nMessage-ID: <ob1@a.mssante.test>\r\n"
           "\r\nCompte rendu.\r\n").encode()  # fmt: skip


def run_openssl(*args: str) -> bytes:
    proc = subprocess.run(["openssl", *args], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


@dataclass
class Peer:
    """The relay boundary's in-memory double: one reply per recipient (default 250), every transaction kept."""

    replies: dict[str, tuple[int, str]] = field(default_factory=dict)
    sent: list[tuple[Route, tuple[str, ...], bytes]] = field(default_factory=list)

    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:
        self.sent.append((route, tuple(recipients), data))
        out = []
        for r in recipients:
            code, status = self.replies.get(r, (250, "2.0.0"))
            out.append(Attempt(r, code, status, f"{code} {status} scripted", "mx.b.test:25"))
        return out


@dataclass
class World:
    settings: Any
    store: QueueStore
    factory: Any
    keys: dict[str, Path]
    peer: Peer
    workers: Workers


@pytest.fixture
def world(sqlite_home: Path) -> Iterator[World]:
    yield from build_world(sqlite_home)


def build_world(sqlite_home: Path) -> Iterator[World]:
    settings = load_settings(sqlite_home)
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    pki = load_dev_pki(settings.pki_dir)
    keys: dict[str, Path] = {}
    with transaction(factory) as s:
        admin.trust_domain(s, "b.mssante.test", relay="127.0.0.1:9", operator_dn="CN=mx.b,O=B,C=FR")
        admin.trust_domain(s, "c.mssante.test", relay="127.0.0.1:9")
        for addr in (SENDER, LOCAL, CARDIO, RADIO, PHARMACY, NOWHERE):
            admin.add_mailbox(s, addr, type="ORG")
        for addr in (SENDER, CARDIO, RADIO):
            cert, key = issue_certificate(pki, kind="user", email=addr)
            name = addr.partition("@")[0]
            keys[addr] = settings.keys_dir / f"{name}.key"
            save_certificate_and_key(cert, key, settings.keys_dir / f"{name}.pem", keys[addr])
            pem = cert.public_bytes(serialization.Encoding.PEM)
            if addr == SENDER:
                register_certificate(s, pem, address=addr, purpose="smime", key_path=str(keys[addr]))
            else:
                register_certificate(s, pem, address=addr, purpose="encrypt")
    store = QueueStore(factory, settings.spool_dir, lease=timedelta(seconds=300))
    peer = Peer()
    workers = Workers(settings, factory, store, relay=peer, crypto_executor="inline")
    yield World(settings, store, factory, keys, peer, workers)
    engine.dispose()


async def run(world: World, recipients: Sequence[str], **columns: Any) -> Verdict:
    """Accept MESSAGE for ``recipients``, adjust its row (``columns``), claim it and run the step once."""
    qid = world.store.enqueue(MESSAGE, sender=SENDER, recipients=list(recipients), origin="submission").queue_id
    if columns:
        with transaction(world.factory) as s:
            s.execute(update(QueuedMessage).where(QueuedMessage.id == qid).values(**columns))
    ((job, data),) = await world.workers._claim(1)
    return await pipeline.run(world.workers.ctx, job, data)


def outcomes(verdict: Verdict) -> dict[str, tuple[str, str | None, str]]:
    """address -> (state, protection, reply's code and status)"""
    return {o.address: (o.state.value, o.protection, " ".join((o.reply or "").split()[:2])) for o in verdict.outcomes}


def dsn_fields(verdict: Verdict) -> list[dict[str, str]]:
    """Per-recipient fields of every DSN in the verdict (RFC 3464, read by Python's parser)."""
    fields: list[dict[str, str]] = []
    for receipt in verdict.receipts:
        assert receipt.kind == "dsn" and receipt.to == SENDER and receipt.sender == ""
        report = email.message_from_bytes(receipt.data)
        assert report.get_content_type() == "multipart/report"
        status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
        blocks = status.get_payload()
        assert isinstance(blocks, list)
        fields.extend({k.lower(): v for k, v in block.items()} for block in blocks[1:] if isinstance(block, Message))
    return fields


async def test_recipients_grouped_by_protection(world: World, tmp_path: Path) -> None:
    verdict = await run(world, [CARDIO, RADIO, PHARMACY, NOWHERE, LOCAL])
    assert outcomes(verdict) == {
        CARDIO: ("delivered", "smime", "250 2.0.0"),
        RADIO: ("delivered", "smime", "250 2.0.0"),
        PHARMACY: ("delivered", "mtls-signed", "250 2.0.0"),
        NOWHERE: ("bounced", None, "550 5.7.1"),
        LOCAL: ("delivered", "local", "250 2.0.0"),
    }
    # One transaction per (domain, protection): both certificate holders share one encrypted copy.
    by_rcpts = {rcpts: (route, wire) for route, rcpts, wire in world.peer.sent}
    assert set(by_rcpts) == {(CARDIO, RADIO), (PHARMACY,)}
    route, encrypted = by_rcpts[(CARDIO, RADIO)]
    assert route.domain == "b.mssante.test" and route.operator_dn == "CN=mx.b,O=B,C=FR"
    wire = tmp_path / "wire.eml"
    wire.write_bytes(encrypted)
    for addr in (CARDIO, RADIO):  # each can open it with its own key, and finds the sender's signature
        inner = run_openssl("cms", "-decrypt", "-in", str(wire), "-inkey", str(world.keys[addr]))
        assert b"multipart/signed" in inner or b"signed-data" in inner
    signed = tmp_path / "signed.eml"
    signed.write_bytes(by_rcpts[(PHARMACY,)][1])
    assert b"Compte rendu." in run_openssl("cms", "-verify", "-noverify", "-in", str(signed))
    assert b"pkcs7-mime; smime-type=enveloped" not in by_rcpts[(PHARMACY,)][1].lower()
    # The unprotectable recipient is never sent anything, and its sender learns why.
    (fields,) = dsn_fields(verdict)
    assert fields["final-recipient"].endswith(NOWHERE) and fields["action"] == "failed"
    assert fields["status"] == "5.7.1"


async def test_signed_only_relay_and_local_delivery_sign_with_the_configured_rsa_scheme(
        sqlite_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # fmt: skip
    """``crypto.rsa_signature = "pss"`` holds for every signature the workers make, not only the
    encrypted relay's: the signed-only copy for a pinned operator carries RSASSA-PSS (openssl)."""
    monkeypatch.setenv("MSSGW_CRYPTO_RSA_SIGNATURE", "pss")
    built = build_world(sqlite_home)
    pss = next(built)
    assert pss.settings.crypto.rsa_signature == "pss"
    try:
        verdict = await run(pss, [PHARMACY, LOCAL])
    finally:
        built.close()
    assert outcomes(verdict)[PHARMACY][:2] == ("delivered", "mtls-signed")
    assert outcomes(verdict)[LOCAL][:2] == ("delivered", "local")
    ((_, _, wire),) = pss.peer.sent
    signed = tmp_path / "signed.eml"
    signed.write_bytes(wire)
    assert b"Compte rendu." in run_openssl("cms", "-verify", "-noverify", "-in", str(signed))
    assert b"rsassaPss" in run_openssl("cms", "-cmsout", "-print", "-in", str(signed))


async def test_each_reply_decides_its_recipient(world: World) -> None:
    world.peer.replies.update({CARDIO: (550, "5.1.1"), RADIO: (451, "4.4.1")})
    verdict = await run(world, [CARDIO, RADIO, PHARMACY])
    assert outcomes(verdict) == {
        CARDIO: ("bounced", "smime", "550 5.1.1"),
        RADIO: ("deferred", "smime", "451 4.4.1"),  # retried later, same protection
        PHARMACY: ("delivered", "mtls-signed", "250 2.0.0"),
    }
    (fields,) = dsn_fields(verdict)  # a DSN for the refusal only; none for what will be retried
    assert fields["final-recipient"].endswith(CARDIO) and fields["status"] == "5.1.1"
    assert "mx.b.test" in fields.get("remote-mta", "")


async def test_a_temporary_failure_past_the_lifetime_bounces(world: World) -> None:
    world.peer.replies[PHARMACY] = (451, "4.4.1")
    verdict = await run(world, [PHARMACY], expires_at=dt.datetime.now(dt.UTC) - timedelta(minutes=1))
    state, protection, short = outcomes(verdict)[PHARMACY]
    assert (state, protection, short) == ("bounced", "mtls-signed", "554 4.4.7")
    assert "message expired after" in (verdict.outcomes[0].reply or "")
    (fields,) = dsn_fields(verdict)
    assert (fields["action"], fields["status"]) == ("failed", "4.4.7")


async def test_a_domain_dropped_from_the_trust_list_bounces_without_sending(world: World) -> None:
    qid = world.store.enqueue(MESSAGE, sender=SENDER, recipients=[PHARMACY], origin="submission").queue_id
    with transaction(world.factory) as s:
        admin.block_domain(s, "b.mssante.test", reason="operator left the trust space")
    ((job, data),) = await world.workers._claim(1)
    assert job.id == qid
    verdict = await pipeline.run(world.workers.ctx, job, data)
    assert outcomes(verdict) == {PHARMACY: ("bounced", None, "550 5.7.1")}
    assert "not in the trust list" in (verdict.outcomes[0].reply or "")
    assert world.peer.sent == []


async def test_one_delay_warning_for_a_message_waiting_too_long(world: World) -> None:
    world.peer.replies[RADIO] = (451, "4.4.1")
    hours = world.settings.queue.delay_warning_hours
    old = dt.datetime.now(dt.UTC) - timedelta(hours=hours + 1)
    verdict = await run(world, [RADIO, CARDIO], created_at=old)
    assert verdict.warned_at is not None
    (fields,) = dsn_fields(verdict)  # the delivered recipient is not in it
    assert fields["final-recipient"].endswith(RADIO)
    assert (fields["action"], fields["status"]) == ("delayed", "4.4.1") and "will-retry-until" in fields
    # Once warned, never again.
    again = await run(world, [RADIO], created_at=old, warned_at=old + timedelta(hours=1))
    assert again.receipts == [] and again.warned_at is None


async def test_a_local_address_without_a_mailbox_is_refused_and_no_maildir_is_made(world: World) -> None:
    """Only RCPT checked submitted mail; a receipt's Disposition-Notification-To, or a mailbox
    disabled since, reaches local delivery unchecked: refused for good, no folder made."""
    ghost, dotdot = "nobody@a.mssante.test", "../../x@a.mssante.test"
    verdict = await run(world, [ghost, dotdot, LOCAL])
    found = outcomes(verdict)
    assert found[ghost] == ("bounced", "local", "550 5.1.1") and found[dotdot][0] == "bounced"
    assert found[LOCAL] == ("delivered", "local", "250 2.0.0")
    mail = world.settings.mail_dir
    assert not list(mail.rglob("nobody*")) and not (mail.parent / "x").exists()
    with transaction(world.factory) as s:
        admin.set_active(s, LOCAL, False)
    found = outcomes(await run(world, [LOCAL]))
    assert found[LOCAL] == ("bounced", "local", "550 5.2.1")


async def test_a_key_that_does_not_open_defers_with_one_log_line_and_no_traceback(
        world: World, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A known condition (here the sender's key file does not parse; on a node given the wrong KEK,
    a sealed key that does not open) defers the message and logs its sentence, not a traceback."""
    world.keys[SENDER].write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    caplog.set_level("INFO")
    verdict = await run(world, [LOCAL])
    assert outcomes(verdict)[LOCAL] == ("deferred", None, "451 4.3.0")
    assert "KeyStoreError" in caplog.text and "Traceback" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)
