"""The delivery core between two real operators: per-recipient dedupe, quarantine release, spool purge.

B's inbound listener is the real one (mutual TLS through the wire proxy); A's relay is the real
one.  Regressions of issue 11 (items 1 and 3) and issue 10 (item 9).
"""

from __future__ import annotations

import datetime as dt

import pytest
from e2e_support import B_DOMAIN, CLINICIAN, GHOST, PRACTITIONER, Pair, parse, prescription
from sqlalchemy import select

from directory import admin
from directory.db import transaction
from gateway.audit.models import AuditRecord
from gateway.delivery.relay import Route
from gateway.queue.models import QueueDedupe

BACKENDS = ("sqlite", "postgresql")  # the delivery tests run on both stores

HOUR = dt.timedelta(hours=1)


def _states(info: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {r["address"]: r["state"] for r in info["recipient_states"]}


def _inbound(pair: Pair) -> list[dict]:  # type: ignore[type-arg]
    return [m for m in pair.b.store.list(include_done=True, limit=1000) if m["origin"] == "inbound"]


class TestRcptLimitAtB:
    @pytest.fixture
    def b_settings(self) -> dict[str, dict[str, object]]:
        return {"limits": {"max_recipients": 1}}  # a second RCPT gets 452 4.5.3: A retries it later

    async def test_recipient_refused_4xx_then_resent_with_same_message_id_arrives(self, pair: Pair) -> None:
        await _refused_then_resent(pair)


async def _refused_then_resent(pair: Pair) -> None:
    """A's second recipient gets 452 at RCPT; its retry carries the same Message-ID and must arrive."""
    a, b = pair.a, pair.b
    with transaction(b.sessions) as s:
        admin.add_mailbox(s, GHOST, type="ORG")  # B gets a second mailbox (its key is in B's home)
    data = prescription(message_id=f"<resent.{dt.datetime.now().timestamp()}@a.mssante.test>")
    qid = a.enqueue(data, CLINICIAN, [PRACTITIONER, GHOST])
    await a.workers.run_once()  # type: ignore[attr-defined]
    info = a.queue(qid)
    assert _states(info) == {PRACTITIONER: "delivered", GHOST: "deferred"}, info["recipient_states"]

    await pair.flow(now=dt.datetime.now(dt.UTC) + 2 * HOUR)  # the retry, and B's processing
    assert _states(a.queue(qid)) == {PRACTITIONER: "delivered", GHOST: "delivered"}
    assert len(b.mailbox(GHOST)) == 1, "the re-sent recipient was dropped as a duplicate"
    assert len(b.mailbox(PRACTITIONER)) == 1
    held = _inbound(pair)
    assert sorted(m["recipients"] for m in held) == [1, 1]  # two transactions, one recipient each

    # A resends the first recipient (a lost 250): acknowledged, stored nowhere, not delivered twice.
    again = a.enqueue(data, CLINICIAN, [PRACTITIONER])
    await pair.flow(now=dt.datetime.now(dt.UTC) + 3 * HOUR)
    assert _states(a.queue(again)) == {PRACTITIONER: "delivered"}
    assert len(_inbound(pair)) == 2
    assert len(b.mailbox(PRACTITIONER)) == 1
    with b.sessions() as s:
        keys = s.execute(select(QueueDedupe.dedupe_key, QueueDedupe.recipient)).all()
    assert sorted(r for _, r in keys) == sorted([PRACTITIONER.lower(), GHOST.lower()])


async def test_mixed_transaction_is_stored_for_new_recipients_only(pair: Pair) -> None:
    """One transaction repeating an accepted recipient and adding a new one: only the new one is queued."""
    a, b = pair.a, pair.b
    with transaction(b.sessions) as s:
        admin.add_mailbox(s, GHOST, type="ORG")
    route = Route(B_DOMAIN, "127.0.0.1", pair.proxy.port, b.operator_dn)
    relay = a.workers.ctx.relay  # type: ignore[attr-defined]
    from gateway.process.outbound import protect_job

    keys = a.workers.keys  # type: ignore[attr-defined]
    certs = (*keys.recipient_certs(PRACTITIONER), *keys.recipient_certs(GHOST))
    data = protect_job(prescription(), keys.signer_for(CLINICIAN), certs, True, "Message securise")
    first = await relay.send(route, CLINICIAN, [PRACTITIONER], data)
    assert first[0].ok, first
    second = await relay.send(route, CLINICIAN, [PRACTITIONER, GHOST], data)
    assert all(att.ok for att in second), second
    held = _inbound(pair)
    assert len(held) == 2
    assert [b.queue(m["id"])["recipient_states"][0]["address"] for m in held] == [PRACTITIONER, GHOST]
    await b.workers.run_once()  # type: ignore[attr-defined]
    assert len(b.mailbox(PRACTITIONER)) == 1 and len(b.mailbox(GHOST)) == 1


async def test_released_quarantine_is_delivered_once_as_is(pair: Pair) -> None:
    """``queue quarantine release``: delivered with its failed verdict in the header, once, no second notice."""
    a, b = pair.a, pair.b
    from gateway.process.outbound import protect_job

    signer = a.workers.keys.signer_for(CLINICIAN)  # type: ignore[attr-defined]
    certs = tuple(a.workers.keys.recipient_certs(PRACTITIONER))  # type: ignore[attr-defined]
    protected = protect_job(prescription(), signer, certs, True, "Message securise")
    head, _, body = protected.partition(b"\r\n\r\n")
    lines = body.split(b"\r\n")
    mid = len(lines) // 2
    lines[mid] = lines[mid][:10] + (b"A" if lines[mid][10:11] != b"A" else b"B") + lines[mid][11:]
    tampered = head + b"\r\n\r\n" + b"\r\n".join(lines)
    route = Route(B_DOMAIN, "127.0.0.1", pair.proxy.port, b.operator_dn)
    attempts = await a.workers.ctx.relay.send(route, CLINICIAN, [PRACTITIONER], tampered)  # type: ignore[attr-defined]
    assert attempts[0].ok, attempts
    await b.workers.run_once()  # type: ignore[attr-defined]
    qid = _inbound(pair)[0]["id"]
    assert _states(b.queue(qid)) == {PRACTITIONER: "quarantined"}
    notices = len(b.receipts())
    assert notices == 1
    assert b.queue(qid)["bytes"] == "kept"  # quarantine needs them

    assert b.store.release_quarantine(qid, actor="admin-test") == 1
    await b.workers.drain()  # type: ignore[attr-defined]
    await b.workers.drain(now=dt.datetime.now(dt.UTC) + 2 * HOUR)  # type: ignore[attr-defined]

    info = b.queue(qid)
    assert _states(info) == {PRACTITIONER: "delivered"}
    assert info["recipient_states"][0]["protection"] == "released-by-admin"
    box = b.mailbox(PRACTITIONER)
    inbox = [m for m in box if b"postmaster@" not in m.partition(b"\r\n\r\n")[0]]  # minus the quarantine notice
    assert len(inbox) == 1 and len(box) == 2
    assert "smime=fail" in str(parse(inbox[0])["Authentication-Results"])
    assert len(b.receipts()) == notices  # no second failure notice
    assert info["bytes"] == "removed" and not b.store.spool.holds(qid)
    with b.sessions() as s:
        events = [(r.event, r.actor) for r in s.scalars(select(AuditRecord).where(AuditRecord.queue_id == qid))]
    assert ("quarantine-release", "admin-test") in events
    assert [e for e, _ in events].count("delivered-released") == 1
    assert [e for e, _ in events].count("quarantined") == 1


async def test_home_files_are_private_after_serve_and_a_message(pair: Pair) -> None:
    """Password hashes (database) and health data (spool, Maildir): files 0600, folders 0700."""
    import stat
    from pathlib import Path

    a, b = pair.a, pair.b
    qid = a.enqueue(prescription(), CLINICIAN, [PRACTITIONER])
    await a.workers.run_once()  # type: ignore[attr-defined]
    held = _inbound(pair)[0]["id"]
    assert b.store.spool.holds(held)  # B's spool holds the message now (a file, or a row on PostgreSQL)
    checked = 0
    for op in (a, b):
        files: list[Path] = []
        if op.settings.database_url.startswith("sqlite"):  # on PostgreSQL the server keeps the rows
            db = Path(op.settings.database_url.split("///", 1)[1])
            files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
        folders = [op.settings.spool_dir]
        for root in (op.settings.spool_dir, op.settings.mail_dir):
            for path in root.rglob("*"):
                (folders if path.is_dir() else files).append(path)
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        for path in folders:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        checked += len(files) + len(folders)
    await pair.flow()
    assert _states(a.queue(qid)) == {PRACTITIONER: "delivered"}
    for path in b.settings.mail_dir.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
        checked += 1
    assert checked > 8
