"""What the outbound and inbound pipelines share: the job snapshot, the context, outcomes, receipts.

The job: one place that turns a pipeline's verdict on a recipient into queue state and audit
records (``record``), that enqueues receipts (``enqueue_receipt``: DSN RFC 3464, MDN RFC 8098,
never for a report), and that runs CPU-bound crypto off the event loop (``Context.crypto``,
ARCHITECTURE rule 6).  Database calls are synchronous SQLAlchemy and run in a thread.

Errors: ``PipelineError`` for a message the pipeline cannot handle at all (unknown origin,
vanished spool file); the worker defers such a message and audits why.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from gateway.audit.trail import AuditEvent
from gateway.config import Settings
from gateway.crypto.keystore import KeyStore
from gateway.delivery.receipts import DsnRecipient, build_dsn
from gateway.delivery.relay import Attempt, Route
from gateway.queue.models import QueuedMessage, RecipientState
from gateway.queue.outcomes import Outcome, OutcomeBatch
from gateway.queue.store import QueueStore, as_utc
from gateway.ttlcache import TtlCache

log = logging.getLogger("mssgw.process")
T = TypeVar("T")

PLAN_TTL = 5.0  # seconds a domain's route, recipients' protections and signer names are reused

__all__ = ["Context", "Job", "LocalDelivery", "PipelineError", "Recipient", "RelayTransport"]


class PipelineError(Exception):
    """The message cannot be processed at all; the worker defers it and audits the reason."""


class LocalDelivery(Protocol):
    def deliver(self, address: str, data: bytes, *, folder: str = "INBOX", flags: str = "") -> str: ...


class RelayTransport(Protocol):
    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes) -> list[Attempt]: ...


@dataclass(frozen=True)
class Recipient:
    address: str
    state: RecipientState
    attempts: int
    protection: str | None = None  # "released-by-admin": delivered as is, never judged again


@dataclass(frozen=True)
class Job:
    """A snapshot of a claimed queue row (no ORM object crosses an await)."""

    id: str
    origin: str
    kind: str
    sender: str
    created_at: _dt.datetime
    expires_at: _dt.datetime
    warned_at: _dt.datetime | None
    peer_operator: str | None
    message_id: str | None
    related_id: str | None
    recipients: tuple[Recipient, ...]
    claim_gen: int = 0  # the claim's fencing token: outcomes count only while it is current

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state in (RecipientState.QUEUED, RecipientState.DEFERRED)]

    @property
    def is_receipt(self) -> bool:
        return self.kind in ("dsn", "mdn") or self.origin == "receipt"

    @classmethod
    def from_columns(cls, msg: Mapping[str, Any]) -> Job:
        """From a claimed row as ``QueueStore.claim_rows`` returns it (columns + ``recipients``)."""
        return cls(
            id=msg["id"], origin=msg["origin"], kind=msg["kind"], sender=msg["sender"] or "",
            created_at=as_utc(msg["created_at"]), expires_at=as_utc(msg["expires_at"]),
            warned_at=as_utc(msg["warned_at"]) if msg["warned_at"] else None,
            peer_operator=msg["peer_operator"], message_id=msg["message_id"], related_id=msg["related_id"],
            recipients=tuple(Recipient(r["address"], RecipientState(r["state"]), r["attempts"], r.get("protection"))
                             for r in msg["recipients"]),
            claim_gen=int(msg.get("claim_gen") or 0),
        )  # fmt: skip


@dataclass
class Context:
    """Everything a pipeline step needs; built once by ``Workers``."""

    settings: Settings
    factory: sessionmaker[Session]
    store: QueueStore
    keys: KeyStore
    relay: RelayTransport
    local: LocalDelivery
    executor: Executor | None = None  # CPU-bound crypto; None runs it inline (tests)
    openpgp: Any = None  # gateway.crypto.openpgp.OpenPgp, created on first use
    actor: str = "worker"
    now: Callable[[], _dt.datetime] = field(default=lambda: _dt.datetime.now(_dt.UTC))
    readers: sessionmaker[Session] | None = None  # lookups: no write lock on SQLite (deferred BEGIN)
    batches: dict[str, OutcomeBatch] = field(default_factory=dict)
    plans: TtlCache = field(default_factory=lambda: TtlCache(PLAN_TTL))
    wake: Callable[[], None] | None = None  # the workers' ``wake``: a receipt was queued

    def read(self) -> Session:
        """A session for lookups (directory, queue rows): never takes SQLite's write lock."""
        return (self.readers or self.factory)()

    async def crypto(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the crypto executor (processes or threads), or inline."""
        if self.executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking I/O (database, Maildir fsync) in a thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def cached_io(self, key: Hashable, fn: Callable[..., T], *args: Any) -> T:
        """``io`` for a lookup that may lag the directory by ``PLAN_TTL`` seconds (keys, certificates,
        the trust anchors): a hit is answered on the event loop, without a thread hop.  Errors are
        not cached."""
        hit = self.plans.get(key)
        if hit is not None:
            return hit[0]  # type: ignore[no-any-return]
        value = await self.io(fn, *args)
        self.plans.put(key, (value,))
        return value

    @property
    def local_domains(self) -> set[str]:
        return set(self.settings.domains)

    def is_local(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.local_domains

    @property
    def postmaster(self) -> str:
        return f"postmaster@{self.settings.domains[0]}"

    # --- outcomes ----------------------------------------------------------------------

    # A pipeline run inside ``collect(job)`` gathers its outcomes in memory; the worker writes
    # them with the release in one transaction (``gateway.queue.outcomes.commit``).  Outside
    # it (a caller without a worker) each outcome is written at once.

    def collect(self, job: Job) -> OutcomeBatch:
        batch = OutcomeBatch()
        self.batches[job.id] = batch
        return batch

    def collected(self, job: Job) -> OutcomeBatch:
        return self.batches.pop(job.id, None) or OutcomeBatch()

    async def record(self, job: Job, address: str, state: RecipientState, *, reply: str,
                     event: str, outcome: str, protection: str | None = None,
                     detail: dict[str, Any] | None = None) -> None:  # fmt: skip
        ev = AuditEvent(
            event, outcome, actor=self.actor, sender=job.sender or "<>", recipient=address, queue_id=job.id,
            reply=audit_reply(reply), detail={"kind": job.kind, "origin": job.origin, **(detail or {})},
        )  # fmt: skip
        relay = str((detail or {}).get("remote") or ("local" if self.is_local(address) else "none"))
        log_attempt(job, address, state, reply, relay=relay, now=self.now())
        batch = self.batches.get(job.id)
        if batch is not None:
            batch.add(Outcome(address, state, reply, protection), [ev])
            return
        await self.io(self.store.set_recipient_state, job.id, address, state, reply=reply,
                      protection=protection, audit_events=[ev])  # fmt: skip

    async def set_security(self, job: Job, security: dict[str, Any]) -> None:
        batch = self.batches.get(job.id)
        if batch is not None:
            batch.security = security
            return

        def _write() -> None:
            with self.factory() as session, session.begin():
                session.execute(
                    update(QueuedMessage).where(QueuedMessage.id == job.id)
                    .values(security=json.dumps(security, sort_keys=True, default=str))
                )  # fmt: skip

        await self.io(_write)

    async def mark_warned(self, job: Job, when: _dt.datetime) -> None:
        def _write() -> None:
            with self.factory() as session, session.begin():
                session.execute(update(QueuedMessage).where(QueuedMessage.id == job.id).values(warned_at=when))

        await self.io(_write)

    # --- receipts ----------------------------------------------------------------------

    async def enqueue_receipt(self, job: Job, data: bytes, *, kind: str, to: str, event: str,
                              detail: dict[str, Any] | None = None,
                              dedupe_key: str | None = None) -> str | None:  # fmt: skip
        """Queue a receipt about ``job`` for ``to``.

        ``dedupe_key`` makes it once per (key, recipient) for good: the receipt is queued before the
        job's verdict commits, so a worker dying in between redoes the job, and the queue's dedupe
        table then answers "already queued" instead of storing a second copy.

        DSNs use the null reverse-path (RFC 3461 §6.2).  MDNs come from our postmaster, as
        Direct Project HISPs send them, so that peers' MAIL FROM checks accept them; loops are
        prevented by ``kind`` and by never answering a report (``receipts.is_report``)."""
        sender = "" if kind == "dsn" else self.postmaster
        ev = AuditEvent(event, "info", actor=self.actor, sender=sender or "<>", recipient=to, queue_id=None,
                        detail={"kind": kind, "related_id": job.id, **(detail or {})})  # fmt: skip
        enq = await self.io(
            self.store.enqueue, data, sender=sender, recipients=[to], origin="receipt", kind=kind,
            related_id=job.id, audit_events=[ev],
            dedupe_key=dedupe_key,
        )  # fmt: skip
        if self.wake is not None:
            self.wake()
        return enq.queue_id

    async def send_dsn(self, job: Job, original: bytes, recipients: Sequence[DsnRecipient]) -> str | None:
        """A DSN to the job's sender, unless the job is itself a receipt or has the null sender."""
        if not recipients:
            return None
        if not job.sender or job.is_receipt:
            for r in recipients:
                log.info("no DSN for %s (%s): null sender or report", job.id, r.address)
            return None
        dsn = build_dsn(
            reporting_mta=self.settings.hostname, postmaster=self.postmaster, to=job.sender,
            recipients=recipients, original=original, arrival=job.created_at, envelope_id=job.id,
            now=self.now(),
        )  # fmt: skip
        action = "delayed" if all(r.action == "delayed" for r in recipients) else "failed"
        return await self.enqueue_receipt(job, dsn, kind="dsn", to=job.sender, event=f"dsn-{action}",
                                          detail={"recipients": [r.address for r in recipients]})  # fmt: skip


_STATUS = {RecipientState.DELIVERED: "sent", RecipientState.DEFERRED: "deferred", RecipientState.BOUNCED: "bounced",
           RecipientState.QUARANTINED: "quarantined", RecipientState.DELETED: "deleted",
           RecipientState.QUEUED: "queued"}  # fmt: skip
delivery_log = logging.getLogger("mssgw.delivery")


def log_attempt(job: Job, address: str, state: RecipientState, reply: str, *, relay: str,
                now: _dt.datetime) -> None:  # fmt: skip
    """One line per delivery attempt, as Postfix's ``smtp``/``local`` write them, without content.

    ``queue_id=... to=<...> relay=host:port delay=1.2 status=sent (250 2.0.0)``: the reply is
    reduced to its code and enhanced status (``audit_reply``), so no text a peer chose is logged.
    """
    delay = max(0.0, (now - job.created_at).total_seconds())
    delivery_log.info("queue_id=%s to=<%s> relay=%s delay=%.2f status=%s (%s)", job.id, address, relay or "none",
                      delay, _STATUS.get(state, state.value), audit_reply(reply))  # fmt: skip


AUDIT_REPLY_LEN = 64  # gateway.audit.models.AuditRecord.reply: String(64)


def audit_reply(reply: str) -> str:
    """The reply as the audit's ``reply`` column holds it: code and enhanced status ("451 4.4.1").

    The column is String(64): PostgreSQL refuses a longer value (StringDataRightTruncation),
    which after a successful relay would roll back the outcome and resend the message.  The
    full reply stays in the recipient's ``last_reply`` (Text).
    """
    parts = reply.split(None, 2)
    short = " ".join(parts[:2]) if len(parts) >= 2 and parts[0].isdigit() else reply
    return short[:AUDIT_REPLY_LEN]


def route_for(session: Session, domain: str) -> Route | None:
    """The relay route of a trusted peer domain, or None when it is not in the trust list.

    A fixed relay (``domains trust --relay``) wins; a domain marked ``--mx`` (or with no route
    at all) goes to its MX hosts (RFC 5321 §5.1), resolved at delivery time by the relay."""
    from directory.models import DomainKind
    from directory.service import get_domain

    row = get_domain(session, domain)
    if row is None or row.kind != DomainKind.TRUSTED:
        return None
    if row.relay:
        host, _, port = row.relay.rpartition(":")
        return Route(domain, host.strip("[]"), int(port), row.operator_dn)
    return Route(domain, domain, 25, row.operator_dn, use_mx=True)  # host and port unused: MX lookup


AsyncFn = Callable[[], Awaitable[None]]
