"""What a pipeline step is given (a ``Job``) and what it returns (a ``Verdict``): plain values, no queue.

A step (``gateway.process.outbound``, ``gateway.process.inbound``) never writes to the queue.  It
reads a ``Job`` (a snapshot of the claimed message: envelope, recipients with their state,
attempts, last reply and decided protection) and returns a ``Verdict``: the recipients' new
states, the receipts to queue (DSN RFC 3464, MDN RFC 8098, quarantine notices), the audit
records, the inbound verification result and whether the delay warning went out.  The queue
(``gateway.queue.outcomes.commit_many``) writes all of it in one transaction, and only while the
worker still holds the claim: a crash before that commit loses the whole verdict, so the message
is redone and no receipt is ever queued twice for one verdict.

Errors: none; a step that fails half-way returns what it decided so far and ``defer_rest``
defers the other pending recipients.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.audit.trail import AuditEvent
from gateway.core.errors import OutageError
from gateway.core.states import PENDING, RELEASED, RecipientState

__all__ = ["RELEASED", "Job", "Outcome", "Receipt", "Recipient", "RecipientState", "Verdict", "as_utc"]


def as_utc(value: _dt.datetime) -> _dt.datetime:
    """SQLite returns naive datetimes: they are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=_dt.UTC)


@dataclass(frozen=True)
class Recipient:
    address: str
    state: RecipientState
    attempts: int
    #: Decided once and carried with the job: at RCPT time (local mailboxes) or by the first
    #: attempt (the relay's protection group); ``RELEASED``: delivered as is, never judged again.
    protection: str | None = None
    last_reply: str | None = None
    notify: str | None = None  # RFC 3461 NOTIFY: NEVER or e.g. SUCCESS,FAILURE; None: failure and delay
    orcpt: str | None = None  # RFC 3461 ORCPT, decoded: "rfc822;address"

    def wants_dsn(self, action: str) -> bool:
        """Whether this recipient's sender asked for a DSN of this action (RFC 3461 §4.1):
        without NOTIFY, failures and delays (as before the extension); NEVER, none."""
        wanted = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS", "relayed": "SUCCESS",
                  "expanded": "SUCCESS"}[action]  # fmt: skip
        if self.notify is None:
            return wanted != "SUCCESS"
        return wanted in self.notify.split(",")


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
    envid: str | None = None  # RFC 3461 ENVID the sender gave (decoded)
    ret: str | None = None  # RFC 3461 RET: FULL or HDRS

    def recipient(self, address: str) -> Recipient | None:
        return next((r for r in self.recipients if r.address == address), None)

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state in PENDING]

    @property
    def is_receipt(self) -> bool:
        return self.kind in ("dsn", "mdn") or self.origin == "receipt"

    @classmethod
    def from_columns(cls, msg: Mapping[str, Any]) -> Job:
        """From a claimed row as the queue returns it (its columns + ``recipients``)."""
        return cls(
            id=msg["id"], origin=msg["origin"], kind=msg["kind"], sender=msg["sender"] or "",
            created_at=as_utc(msg["created_at"]), expires_at=as_utc(msg["expires_at"]),
            warned_at=as_utc(msg["warned_at"]) if msg["warned_at"] else None,
            peer_operator=msg["peer_operator"], message_id=msg["message_id"], related_id=msg["related_id"],
            recipients=tuple(Recipient(r["address"], RecipientState(r["state"]), r["attempts"], r.get("protection"),
                                       r.get("last_reply"), r.get("dsn_notify"), r.get("dsn_orcpt"))
                             for r in msg["recipients"]),
            claim_gen=int(msg.get("claim_gen") or 0), envid=msg.get("dsn_envid"), ret=msg.get("dsn_ret"),
        )  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    address: str
    state: RecipientState
    reply: str | None = None
    protection: str | None = None
    count_attempt: bool = True


@dataclass(frozen=True)
class Receipt:
    """A message the verdict asks the queue to store with it (a DSN, an MDN, a quarantine notice).

    ``dedupe_key`` makes it once per (key, recipient) for good, even across verdicts of
    different runs of the same job."""

    data: bytes
    kind: str  # dsn, mdn, notice
    sender: str  # "" for the null reverse-path
    to: str
    related_id: str
    dedupe_key: str | None = None
    events: tuple[AuditEvent, ...] = ()


@dataclass
class Verdict:
    """What one run of a pipeline decided about one message, not yet written."""

    outcomes: list[Outcome] = field(default_factory=list)
    events: list[AuditEvent] = field(default_factory=list)
    security: dict[str, Any] | None = None
    receipts: list[Receipt] = field(default_factory=list)
    warned_at: _dt.datetime | None = None  # the delay DSN went out (once per message)

    def add(self, outcome: Outcome, events: list[AuditEvent] | tuple[AuditEvent, ...] = ()) -> None:
        self.outcomes.append(outcome)
        self.events.extend(events)

    def decided(self, address: str) -> Outcome | None:
        """This run's last outcome for ``address``, if any."""
        return next((o for o in reversed(self.outcomes) if o.address == address), None)

    def defer_rest(self, job: Job, error: BaseException | str, *, actor: str) -> Verdict:
        """Defer what is still pending and undecided after an unexpected error (never drop, never
        bounce for it); the audit trail names the error's type, not its text."""
        kind = error if isinstance(error, str) else type(error).__name__
        reason = f"451 4.3.0 internal error ({kind}); will retry"
        if isinstance(error, OutageError):  # a known local outage: its own sentence says it
            reason = f"451 4.3.0 {error}"
        decided = {o.address for o in self.outcomes}
        for r in job.pending:
            if r.address not in decided:
                self.add(Outcome(r.address, RecipientState.DEFERRED, reason))
        self.events.append(AuditEvent("worker-error", "fail", actor=actor, queue_id=job.id, detail={"error": kind}))
        return self

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.events or self.security is not None or self.receipts
                    or self.warned_at is not None)  # fmt: skip
