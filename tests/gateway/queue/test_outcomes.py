"""One verdict, one transaction (``gateway.queue.outcomes``): the state table, fencing, ``fold_state``, group commit.

The commits run on a real queue on each database (PostgreSQL takes the ``FOR UPDATE`` path); the
receipts' side of a verdict commit (a bounce and its DSN together, none for a fenced or failed
verdict) is in ``test_verdict_commit.py``, with the worker that produces them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from directory import admin
from directory.db import make_engine, session_factory, transaction
from gateway.audit.models import AuditRecord
from gateway.audit.trail import AuditEvent
from gateway.config import load_settings
from gateway.core.states import PENDING
from gateway.process.verdict import Receipt
from gateway.queue.models import TRANSITIONS, QueuedMessage, RecipientState, may_move
from gateway.queue.outcomes import Outcome, Pending, Verdict, commit, commit_many, fold_state
from gateway.queue.store import QueueError, QueueStore

S = RecipientState
SENDER = "dr.martin@a.mssante.test"
LOCAL = "secretariat@a.mssante.test"
OTHER = "accueil@a.mssante.test"
REMOTE = "ph@b.mssante.test"
MESSAGE = (f"From: {SENDER}\r\nTo: {LOCAL}\r\nSubject: s\r\nMessage-ID: <o1@a.mssante.test>\r\n\r\nbody\r\n").encode()
Queue = tuple[sessionmaker[Session], QueueStore]


@pytest.fixture
def queue(operator_home: Path) -> Iterator[Queue]:
    """A queue on each database (the operator home's), with a local sender and two local mailboxes."""
    settings = load_settings(operator_home)
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    with transaction(factory) as s:
        admin.trust_domain(s, "b.mssante.test", relay="127.0.0.1:9", operator_dn="CN=mx.b,O=B,C=FR")
        for addr in (SENDER, LOCAL, OTHER):
            admin.add_mailbox(s, addr, type="ORG")
    yield factory, QueueStore(factory, settings.spool_dir, lease=timedelta(seconds=300))
    engine.dispose()


def _row(factory: sessionmaker[Session], qid: str) -> QueuedMessage:
    with factory() as s:
        row = s.get(QueuedMessage, qid)
        assert row is not None
        s.expunge(row)
        return row


def _recipients(store: QueueStore, qid: str) -> dict[str, dict[str, Any]]:
    return {r["address"]: r for r in store.get(qid)["recipient_states"]}


def _events(factory: sessionmaker[Session], qid: str) -> list[str]:
    with factory() as s:
        return list(s.scalars(select(AuditRecord.event).where(AuditRecord.queue_id == qid).order_by(AuditRecord.ts)))


# --- the state table and fold_state (pure) ------------------------------------------------------------


def test_the_state_table() -> None:
    finals = {s for s in S if s.final}
    assert finals == {S.DELIVERED, S.BOUNCED, S.DELETED}
    for old in S:
        for new in S:
            assert may_move(old, new) == (new in TRANSITIONS[old]), (old, new)
            assert may_move(old.value, new.value) == may_move(old, new)  # the database's strings too
    assert all(not TRANSITIONS[f] for f in finals)  # final stays final
    assert TRANSITIONS[S.QUARANTINED] == {S.QUEUED, S.DELETED}  # only an admin's release or delete
    assert S.DEFERRED in TRANSITIONS[S.DEFERRED]  # a retry that fails again
    assert set(PENDING) == {S.QUEUED, S.DEFERRED}


NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
FOLD = [
    # recipient states, done, parked
    ([S.QUEUED], False, False),
    ([S.DELIVERED, S.DEFERRED], False, False),
    ([S.DELIVERED, S.BOUNCED, S.DELETED], True, False),
    ([S.QUARANTINED], False, True),
    ([S.QUARANTINED, S.DELIVERED], False, True),
    ([S.QUARANTINED, S.DEFERRED], False, False),  # something still to do: claimable
]


@pytest.mark.parametrize("states, done, parked", FOLD)
def test_fold_state(states: list[RecipientState], done: bool, parked: bool) -> None:
    out = fold_state({}, [{"state": s.value} for s in states], NOW)
    assert (out["done"], out["parked"]) == (done, parked)
    assert out.get("purged_at") == (NOW if done else None)


def test_fold_state_keeps_the_first_purge_time() -> None:
    earlier = NOW - timedelta(days=1)
    assert "purged_at" not in fold_state({"purged_at": earlier}, [{"state": "delivered"}], NOW)


# --- commits --------------------------------------------------------------------------------------------


def test_final_states_stay_final(queue: Queue) -> None:
    factory, store = queue
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL, OTHER], origin="submission").queue_id
    store.claim("w1")
    delivered = Verdict([Outcome(LOCAL, S.DELIVERED, "250 2.0.0 ok")])
    assert commit_many(factory, [Pending(qid, None, delivered)]) == [False]
    store.delete(qid, reason="admin test")
    late = Verdict([Outcome(LOCAL, S.DEFERRED, "451 4.4.1 late"), Outcome(OTHER, S.DEFERRED, "451 4.4.1 late")])
    assert commit_many(factory, [Pending(qid, "w1", late)]) == [True]
    states = {a: r["state"] for a, r in _recipients(store, qid).items()}
    assert states == {LOCAL: "delivered", OTHER: "deleted"}
    with pytest.raises(QueueError, match="cannot become"):
        store.set_recipient_state(qid, LOCAL, S.DEFERRED)


def test_outcomes_of_a_worker_whose_lease_was_taken_over_are_discarded(queue: Queue) -> None:
    factory, store = queue
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[REMOTE], origin="submission").queue_id
    [first] = store.claim_rows("w1")
    later = dt.datetime.now(dt.UTC) + timedelta(minutes=10)  # w1's lease ran out
    [second] = store.claim_rows("w1", now=later)  # the same worker id: only the generation tells
    assert second["claim_gen"] == first["claim_gen"] + 1
    stale = Verdict([Outcome(REMOTE, S.DEFERRED, "451 4.4.1 stale")],
                    events=[AuditEvent("deferred", "fail", queue_id=qid)])  # fmt: skip
    commit_many(factory, [Pending(qid, "w1", stale, None, first["claim_gen"])])
    info = store.get(qid)
    assert info["recipient_states"][0]["state"] == "queued" and info["claimed_by"] == "w1"
    assert _events(factory, qid).count("outcome-fenced") == 1 and "deferred" not in _events(factory, qid)
    fresh = Verdict([Outcome(REMOTE, S.DELIVERED, "250 2.0.0 ok")])
    assert commit_many(factory, [Pending(qid, "w1", fresh, None, second["claim_gen"])]) == [True]
    assert store.get(qid)["recipient_states"][0]["state"] == "delivered"


def test_the_holder_releases_its_claim_and_schedules_what_is_left(queue: Queue) -> None:
    factory, store = queue
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL, OTHER], origin="submission").queue_id
    [row] = store.claim_rows("w1")
    asked: list[int] = []

    def schedule(attempts: int) -> dt.datetime:
        asked.append(attempts)
        return NOW + timedelta(minutes=attempts)

    verdict = Verdict([Outcome(LOCAL, S.DELIVERED, "250 2.0.0 ok"), Outcome(OTHER, S.DEFERRED, "451 4.3.0 busy")],
                      security={"signed": True}, warned_at=NOW)  # fmt: skip
    assert commit(factory, qid, "w1", verdict, schedule=schedule, gen=row["claim_gen"]) is False
    msg = _row(factory, qid)
    assert (msg.claimed_by, msg.lease_until, msg.done, msg.parked) == (None, None, False, False)
    assert asked == [1] and msg.next_attempt_at.replace(tzinfo=dt.UTC) == NOW + timedelta(minutes=1)
    assert json.loads(msg.security or "{}") == {"signed": True}
    assert msg.warned_at is not None and msg.warned_at.replace(tzinfo=dt.UTC) == NOW
    rows = _recipients(store, qid)
    assert (rows[LOCAL]["attempts"], rows[OTHER]["attempts"]) == (1, 1)


def test_without_the_claim_nothing_is_released(queue: Queue) -> None:
    """An admin's verdict (worker None) or another worker's leaves the holder's claim alone."""
    factory, store = queue
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL, OTHER], origin="submission").queue_id
    store.claim("w1")
    commit(factory, qid, None, Verdict([Outcome(LOCAL, S.DELIVERED, "250 ok")]))
    commit(factory, qid, "w2", Verdict([Outcome(OTHER, S.DEFERRED, "451 later")]))
    assert _row(factory, qid).claimed_by == "w1"
    assert {a: r["state"] for a, r in _recipients(store, qid).items()} == {LOCAL: "delivered", OTHER: "deferred"}


def test_an_outcome_for_a_stranger_is_skipped_not_fatal(queue: Queue) -> None:
    factory, store = queue
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
    verdict = Verdict([Outcome("intruder@a.mssante.test", S.DELIVERED, "250 ok"),
                       Outcome(LOCAL, S.DEFERRED, "4" * 3000, count_attempt=False, protection="x" * 40)])  # fmt: skip
    assert commit(factory, qid, None, verdict) is False
    row = _recipients(store, qid)[LOCAL]
    assert row["state"] == "deferred" and row["attempts"] == 0  # not counted: no attempt was made
    assert len(row["last_reply"]) == 2000 and row["protection"] == "x" * 32
    assert [r["address"] for r in store.get(qid)["recipient_states"]] == [LOCAL]
    assert commit(factory, "0" * 32, None, verdict) is True  # no such message: nothing to redo


def test_group_commit_of_several_messages(queue: Queue) -> None:
    """Messages whose updates set different columns, in one transaction; each gets its own answer."""
    factory, store = queue
    done_id = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
    parked_id = store.enqueue(MESSAGE, sender=SENDER, recipients=[OTHER], origin="submission").queue_id
    plain_id = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL, OTHER], origin="submission").queue_id
    items = [
        Pending(done_id, None, Verdict([Outcome(LOCAL, S.DELIVERED, "250 ok")], security={"verified": True})),
        Pending(parked_id, None, Verdict([Outcome(OTHER, S.QUARANTINED, "quarantined")])),
        Pending(plain_id, None, Verdict([Outcome(LOCAL, S.BOUNCED, "550 5.1.1 no")])),
    ]
    assert commit_many(factory, items, spool=store.spool) == [True, False, False]
    assert (_row(factory, done_id).done, _row(factory, done_id).purged_at is not None) == (True, True)
    assert json.loads(_row(factory, done_id).security or "{}") == {"verified": True}
    assert (_row(factory, parked_id).parked, _row(factory, parked_id).security) == (True, None)
    assert (_row(factory, plain_id).done, _row(factory, plain_id).parked) == (False, False)
    assert done_id not in {p.name for p in store.spool.files()}  # the final message's bytes are gone
    assert plain_id in {p.name for p in store.spool.files()}


def test_a_verdict_refused_whole_queues_no_receipt(queue: Queue) -> None:
    """A message deleted by an admin meanwhile: the bounce is refused by the table, and its DSN with it."""
    factory, store = queue
    qid = store.enqueue(MESSAGE, sender=SENDER, recipients=[LOCAL], origin="submission").queue_id
    store.delete(qid, reason="admin test")
    dsn = Receipt(b"From: postmaster@a.mssante.test\r\n\r\nfailed\r\n", "dsn", "", SENDER, qid, dedupe_key="dsn|x")
    bounce = Verdict([Outcome(LOCAL, S.BOUNCED, "550 5.1.1 no")], receipts=[dsn])
    assert commit(factory, qid, None, bounce, spool=store.spool) is True
    assert [m for m in store.list(include_done=True) if m["origin"] == "receipt"] == []
    with pytest.raises(ValueError, match="needs the spool"):
        commit(factory, qid, None, bounce)
