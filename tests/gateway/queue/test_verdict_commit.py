"""One transaction per verdict: outcomes, receipts and audit records commit together or not at all.

The pipeline returns a value (``gateway.process.verdict.Verdict``); nothing reaches the queue
until the worker commits it.  A verdict lost before its commit (a worker killed), fenced (its
lease was taken over) or whose commit fails leaves no receipt behind: a DSN is never queued for
a verdict that is then redone.  A recipient's protection is decided once and carried to retries.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy.exc import OperationalError

from certs.pki import issue_certificate, load_dev_pki
from directory.certificates import register_certificate
from directory.db import transaction
from gateway.delivery.relay import Attempt, DsnRequest, Route
from gateway.process import pipeline
from gateway.queue import outcomes
from gateway.queue.store import QueueStore
from gateway.queue.worker import Workers

SENDER = "dr.martin@a.mssante.test"
REMOTE = "ph@b.mssante.test"
MESSAGE = (f"From: {SENDER}\r\nTo: {REMOTE}\r\nSubject: test\r\nMessage-ID: <v1@a.mssante.test>\r\n\r\nbody\r\n"
           ).encode()  # fmt: skip


class ScriptedPeer:
    """The relay boundary's in-memory double: answers each recipient with the next scripted reply."""

    def __init__(self, *replies: tuple[int, str]) -> None:
        self.replies = list(replies)
        self.sent: list[bytes] = []

    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:
        self.sent.append(data)
        code, status = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return [Attempt(r, code, status, "scripted reply", "127.0.0.1:9") for r in recipients]


def receipts(store: QueueStore) -> list[dict]:  # type: ignore[type-arg]
    return [m for m in store.list(include_done=True) if m["origin"] == "receipt"]


def spool_files(store: QueueStore) -> set[str]:
    return {p.name for p in store.spool.files()}


async def test_a_bounce_and_its_dsn_commit_together(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    workers = Workers(settings, factory, store, relay=ScriptedPeer((550, "5.1.1")), crypto_executor="inline")
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    await workers.run_once()
    info = store.get(qid)
    assert info["recipient_states"][0]["state"] == "bounced"
    (dsn,) = receipts(store)
    assert dsn["kind"] == "dsn" and store.get(dsn["id"])["related_id"] == qid
    assert dsn["id"] in spool_files(store)  # its bytes are in the spool, ready to be sent


async def test_a_lost_or_fenced_verdict_queues_no_receipt(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    workers = Workers(settings, factory, store, relay=ScriptedPeer((550, "5.1.1")), crypto_executor="inline")
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    ((job, data),) = await workers._claim(1)
    stale = await pipeline.run(workers.ctx, job, data)
    assert [r.kind for r in stale.receipts] == ["dsn"]
    # The run wrote nothing: a worker killed now loses its verdict and nothing else.
    assert receipts(store) == [] and spool_files(store) == {qid}
    assert store.get(qid)["recipient_states"][0]["state"] == "queued"

    # Its lease runs out; another worker claims the message (the claim generation moves on).
    later = dt.datetime.now(dt.UTC) + timedelta(seconds=301)
    (row,) = store.claim_rows("other-worker", limit=1, now=later)
    await workers._commit(job, stale)  # the stale verdict arrives late: fenced, with its DSN
    assert receipts(store) == [] and spool_files(store) == {qid}
    assert store.get(qid)["recipient_states"][0]["state"] == "queued"

    fresh = await pipeline.run(workers.ctx, type(job).from_columns(row), data)
    assert outcomes.commit_many(factory, [outcomes.Pending(qid, "other-worker", fresh, None, row["claim_gen"])],
                                spool=store.spool) == [True]  # fmt: skip
    assert [r["kind"] for r in receipts(store)] == ["dsn"]


async def test_a_failed_commit_leaves_no_receipt_behind(operator, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    workers = Workers(settings, factory, store, relay=ScriptedPeer((550, "5.1.1")), crypto_executor="inline")
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    ((job, data),) = await workers._claim(1)
    verdict = await pipeline.run(workers.ctx, job, data)

    def database_hiccup(conn, events):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT INTO audit_records", {}, Exception("disk I/O error"))

    monkeypatch.setattr(outcomes, "append", database_hiccup)
    with pytest.raises(OperationalError):
        outcomes.commit_many(factory, [outcomes.Pending(qid, workers.worker_id, verdict, None, job.claim_gen)],
                             spool=store.spool)  # fmt: skip
    assert receipts(store) == [] and spool_files(store) == {qid}  # no receipt row, no orphan bytes
    assert store.get(qid)["recipient_states"][0]["state"] == "queued"  # redone when the lease expires


async def test_the_protection_is_decided_once_and_carried_to_retries(operator) -> None:  # type: ignore[no-untyped-def]
    settings, factory, store = operator
    peer = ScriptedPeer((451, "4.4.1"))
    workers = Workers(settings, factory, store, relay=peer, crypto_executor="inline")
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    await workers.run_once()  # no certificate for REMOTE: signed for the pinned operator, deferred
    (rcpt,) = store.get(qid)["recipient_states"]
    assert (rcpt["state"], rcpt["protection"]) == ("deferred", "mtls-signed")
    assert b"multipart/signed" in peer.sent[0]

    # REMOTE now publishes a certificate: a fresh decision would encrypt; the retry keeps its own.
    cert, _ = issue_certificate(load_dev_pki(settings.pki_dir), kind="user", email=REMOTE)
    with transaction(factory) as s:
        register_certificate(s, cert.public_bytes(serialization.Encoding.PEM), address=REMOTE, purpose="encrypt")
    workers.ctx.plans.clear()
    await workers.run_once(now=dt.datetime.now(dt.UTC) + timedelta(hours=2))
    assert len(peer.sent) == 2
    assert b"multipart/signed" in peer.sent[1] and b"application/pkcs7-mime" not in peer.sent[1]
    assert store.get(qid)["recipient_states"][0]["protection"] == "mtls-signed"
