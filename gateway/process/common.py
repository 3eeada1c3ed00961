"""What the outbound and inbound pipelines share: the context, the verdict being built, receipts.

The job: one place that turns a pipeline's decision on a recipient into the verdict's outcome
and audit records (``record``), that adds receipts to the verdict (``enqueue_receipt``: DSN RFC
3464, MDN RFC 8098, never for a report), and that runs CPU-bound crypto off the event loop
(``Context.crypto``, ARCHITECTURE rule 6).  Nothing here writes to the queue: the verdict is a
value (``gateway.process.verdict``) that the queue commits in one transaction.  Database lookups
are synchronous SQLAlchemy and run in a thread.

Errors: ``PipelineError`` for a message the pipeline cannot handle at all (unknown origin,
vanished spool file); the run then defers what is still pending and audits why.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from gateway.audit.trail import AuditEvent
from gateway.config import Settings
from gateway.core.errors import OutageError, QueueError
from gateway.core.ttlcache import TtlCache
from gateway.crypto.keystore import KeyStore
from gateway.delivery.receipts import DsnRecipient, build_dsn
from gateway.delivery.relay import Attempt, DsnRequest, Route
from gateway.process.verdict import Job, Outcome, Receipt, Recipient, RecipientState, Verdict

log = logging.getLogger("mssgw.process")
T = TypeVar("T")

PLAN_TTL = 5.0  # seconds a domain's route, recipients' protections and signer names are reused

__all__ = ["Context", "CryptoWorkersLost", "Job", "LocalDelivery", "PipelineError", "Recipient", "RelayTransport"]


class PipelineError(QueueError):
    """The message cannot be processed at all; the run defers it and audits the reason."""


class CryptoWorkersLost(OutageError):
    """The crypto processes kept dying under a call, pool after pool: the message waits for its
    next attempt (a temporary local problem, never the message's fault)."""

    def __init__(self) -> None:
        super().__init__("a crypto worker process stopped; will retry")


#: New pools a call may get before its message is deferred (``Context.crypto``).
POOL_RENEWALS = 3


class LocalDelivery(Protocol):
    def deliver(self, address: str, data: bytes, *, folder: str = "INBOX", flags: str = "") -> str: ...


class RelayTransport(Protocol):
    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]: ...


@dataclass
class Context:
    """Everything a pipeline step needs; built once by ``Workers``."""

    settings: Settings
    readers: sessionmaker[Session]  # lookups only (directory, keys): on SQLite never the write lock
    keys: KeyStore
    relay: RelayTransport
    local: LocalDelivery
    executor: Executor | None = None  # CPU-bound crypto; None runs it inline (tests)
    # Replaces a broken ``executor`` (a crypto process died) and returns the new one; None: cannot.
    renew_executor: Callable[[Executor], Executor | None] | None = None
    openpgp: Any = None  # gateway.crypto.openpgp.OpenPgp, created on first use
    actor: str = "worker"
    now: Callable[[], _dt.datetime] = field(default=lambda: _dt.datetime.now(_dt.UTC))
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # the runs in progress, by queue id
    plans: TtlCache = field(default_factory=lambda: TtlCache(PLAN_TTL))

    def read(self) -> Session:
        """A session for lookups (directory, queue rows): never takes SQLite's write lock."""
        return self.readers()

    async def crypto(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the crypto executor (processes or threads), or inline.

        A process pool whose worker died (killed by an admin or the out-of-memory killer,
        crashed on some input) is broken for good: every later call would fail and every
        message be deferred until a restart.  It is replaced, and the call (pure: sign,
        encrypt, verify) made again in the new pool, up to ``POOL_RENEWALS`` times; then the
        message is deferred with ``CryptoWorkersLost`` (one log line, no traceback)."""
        executor = self.executor
        if executor is None:
            return fn(*args)
        loop = asyncio.get_running_loop()
        renewals = POOL_RENEWALS
        while True:
            try:
                return await loop.run_in_executor(executor, partial(fn, *args))
            except BrokenExecutor:
                fresh = self.renew_executor(executor) if renewals and self.renew_executor is not None else None
                if fresh is None:
                    raise CryptoWorkersLost() from None
                executor, renewals = fresh, renewals - 1

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

    # --- the verdict ---------------------------------------------------------------------

    # ``begin(job)`` opens the run's verdict; every ``record``, ``set_security`` and receipt of
    # the run goes into it, and ``end(job)`` hands it back (``gateway.process.pipeline.run``).

    def begin(self, job: Job) -> Verdict:
        verdict = self.verdicts[job.id] = Verdict()
        return verdict

    def end(self, job: Job) -> Verdict:
        return self.verdicts.pop(job.id, None) or Verdict()

    def verdict(self, job: Job) -> Verdict:
        try:
            return self.verdicts[job.id]
        except KeyError:  # a step run without ``begin``: a programming error, never a silent write
            raise PipelineError(f"no verdict open for {job.id}") from None

    async def record(self, job: Job, address: str, state: RecipientState, *, reply: str,
                     event: str, outcome: str, protection: str | None = None,
                     detail: dict[str, Any] | None = None) -> None:  # fmt: skip
        ev = AuditEvent(
            event, outcome, actor=self.actor, sender=job.sender or "<>", recipient=address, queue_id=job.id,
            reply=audit_reply(reply), detail={"kind": job.kind, "origin": job.origin, **(detail or {})},
        )  # fmt: skip
        relay = str((detail or {}).get("remote") or ("local" if self.is_local(address) else "none"))
        log_attempt(job, address, state, reply, relay=relay, now=self.now())
        self.verdict(job).add(Outcome(address, state, reply, protection), [ev])

    async def set_security(self, job: Job, security: dict[str, Any]) -> None:
        self.verdict(job).security = security

    async def mark_warned(self, job: Job, when: _dt.datetime) -> None:
        self.verdict(job).warned_at = when

    # --- receipts ----------------------------------------------------------------------

    async def enqueue_receipt(self, job: Job, data: bytes, *, kind: str, to: str, event: str,
                              detail: dict[str, Any] | None = None,
                              dedupe_key: str | None = None) -> None:  # fmt: skip
        """Add a receipt about ``job`` for ``to`` to the verdict; the queue stores it with the
        recipients' new states, in the same transaction.

        ``dedupe_key`` makes it once per (key, recipient) for good, across runs of the job.

        DSNs and MDNs use the null reverse-path (RFC 3461 §6.2, RFC 8098 §3), so nothing ever
        answers them; they are signed for their From (``receipts.receipt_author``).  Loops are
        also prevented by ``kind`` and by never answering a report (``receipts.is_report``)."""
        sender = "" if kind in ("dsn", "mdn") else self.postmaster
        ev = AuditEvent(event, "info", actor=self.actor, sender=sender or "<>", recipient=to, queue_id=None,
                        detail={"kind": kind, "related_id": job.id, **(detail or {})})  # fmt: skip
        self.verdict(job).receipts.append(Receipt(data, kind, sender, to, job.id, dedupe_key, (ev,)))

    async def send_dsn(self, job: Job, original: bytes, recipients: Sequence[DsnRecipient]) -> None:
        """A DSN to the job's sender, unless the job is itself a receipt or has the null sender.

        Only for the recipients whose NOTIFY asks for this action (RFC 3461 §4.1: without NOTIFY,
        failures and delays; NEVER, nothing); with the sender's ENVID (Original-Envelope-Id) and
        each recipient's ORCPT (Original-Recipient).  The body never travels back (RET, see
        ``receipts``)."""
        asked = []
        for r in recipients:
            queued = job.recipient(r.address)
            if queued is not None and not queued.wants_dsn(r.action):
                log.info("no DSN for %s (%s): NOTIFY=%s", job.id, r.address, queued.notify)
                continue
            orcpt = queued.orcpt if queued is not None else None
            asked.append(replace(r, original_recipient=orcpt) if orcpt and not r.original_recipient else r)
        recipients = asked
        if not recipients:
            return
        if not job.sender or job.is_receipt:
            for r in recipients:
                log.info("no DSN for %s (%s): null sender or report", job.id, r.address)
            return
        dsn = build_dsn(
            reporting_mta=self.settings.hostname, postmaster=self.postmaster, to=job.sender,
            recipients=recipients, original=original, arrival=job.created_at, queue_id=job.id,
            envelope_id=job.envid, now=self.now(),
        )  # fmt: skip
        if all(r.action == "delayed" for r in recipients):
            action = "delayed"
        elif all(r.action in ("delivered", "relayed") for r in recipients):
            action = "success"
        else:
            action = "failed"
        await self.enqueue_receipt(job, dsn, kind="dsn", to=job.sender, event=f"dsn-{action}",
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
    from directory.facts import get_domain
    from directory.models import DomainKind

    row = get_domain(session, domain)
    if row is None or row.kind != DomainKind.TRUSTED:
        return None
    if row.relay:
        host, _, port = row.relay.rpartition(":")
        return Route(domain, host.strip("[]"), int(port), row.operator_dn)
    return Route(domain, domain, 25, row.operator_dn, use_mx=True)  # host and port unused: MX lookup


AsyncFn = Callable[[], Awaitable[None]]
