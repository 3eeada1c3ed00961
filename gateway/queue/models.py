"""Tables of the durable queue: one row per accepted message, one per recipient.

The message bytes live in a spool file (written tmp -> fsync -> rename) named by
the queue id, committed before the row, or, on PostgreSQL, in a ``queue_spool`` row
committed with it (``gateway.queue.spool``): a row never points at missing bytes.
A message's state is derived from its recipients'.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Enum, ForeignKey, Index, Integer, LargeBinary, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column, relationship

from directory.models import Base, utcnow
from gateway.core.states import PENDING, RELEASED, RecipientState

__all__ = ["PENDING", "RELEASED", "TRANSITIONS", "QueueDedupe", "QueuedBytes", "QueuedMessage", "QueuedRecipient", "RecipientState",
           "may_move"]


_S = RecipientState
#: THE table of recipient states: which state may follow which.  Final states have no way out;
#: quarantine leaves only by an admin's release (back to queued) or delete.  Every writer of a
#: recipient's state (worker outcomes, admin commands) asks ``may_move``.
TRANSITIONS: dict[RecipientState, frozenset[RecipientState]] = {
    _S.QUEUED: frozenset({_S.DEFERRED, _S.DELIVERED, _S.BOUNCED, _S.QUARANTINED, _S.DELETED}),
    _S.DEFERRED: frozenset({_S.DEFERRED, _S.DELIVERED, _S.BOUNCED, _S.QUARANTINED, _S.DELETED}),
    _S.QUARANTINED: frozenset({_S.QUEUED, _S.DELETED}),
    _S.DELIVERED: frozenset(),
    _S.BOUNCED: frozenset(),
    _S.DELETED: frozenset(),
}


def may_move(old: RecipientState | str, new: RecipientState | str) -> bool:
    """Whether a recipient in state ``old`` may be put in state ``new`` (``TRANSITIONS``)."""
    return RecipientState(new) in TRANSITIONS[RecipientState(old)]


class QueuedMessage(Base):
    __tablename__ = "queue_messages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random hex, also the spool file name
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    origin: Mapped[str] = mapped_column(String(16))  # submission, inbound, receipt
    kind: Mapped[str] = mapped_column(String(8), default="message")  # message, dsn, mdn
    sender: Mapped[str] = mapped_column(String(320))  # "" for the null reverse-path
    auth_identity: Mapped[str | None] = mapped_column(String(320))
    client_address: Mapped[str | None] = mapped_column(String(64))
    peer_operator: Mapped[str | None] = mapped_column(String(253))  # inbound: the sending domain
    message_id: Mapped[str | None] = mapped_column(String(998))  # the Message-ID header
    dedupe_key: Mapped[str | None] = mapped_column(String(400), index=True)  # per recipient: QueueDedupe
    related_id: Mapped[str | None] = mapped_column(String(32), index=True)  # receipts: the original
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_name: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    warned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Bumped by every claim: the fencing token a worker's outcomes must still carry to be applied.
    claim_gen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    done: Mapped[bool] = mapped_column(default=False)  # every recipient final
    #: Nothing for a worker to do until an admin acts (every recipient final or quarantined): never claimed.
    parked: Mapped[bool] = mapped_column(default=False, server_default=false())
    #: When the spool bytes were removed (every recipient final); None while they are kept.
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    security: Mapped[str | None] = mapped_column(Text)  # inbound: verification result (JSON)
    #: The sender's DSN parameters (RFC 3461 §4.3, §4.4): ENVID (xtext-decoded) and RET (FULL, HDRS).
    dsn_envid: Mapped[str | None] = mapped_column(String(100))
    dsn_ret: Mapped[str | None] = mapped_column(String(4))

    recipients: Mapped[list[QueuedRecipient]] = relationship(
        back_populates="message", cascade="all, delete-orphan", order_by="QueuedRecipient.id"
    )

    __table_args__ = (Index("ix_queue_ready", "done", "next_attempt_at"),)


class QueueDedupe(Base):
    """One row per (dedupe key, recipient) already accepted: a peer's retransmission is
    stored for the recipients not yet accepted only (a key alone would drop the others)."""

    __tablename__ = "queue_dedupe"

    dedupe_key: Mapped[str] = mapped_column(String(400), primary_key=True)
    recipient: Mapped[str] = mapped_column(String(320), primary_key=True)  # lower-cased address
    queue_id: Mapped[str] = mapped_column(ForeignKey("queue_messages.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QueuedRecipient(Base):
    __tablename__ = "queue_recipients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("queue_messages.id", ondelete="CASCADE"), index=True)
    address: Mapped[str] = mapped_column(String(320))
    state: Mapped[RecipientState] = mapped_column(
        Enum(RecipientState, native_enum=False, length=16), default=RecipientState.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    protection: Mapped[str | None] = mapped_column(String(32))  # smime, openpgp, mtls-signed, local
    last_reply: Mapped[str | None] = mapped_column(Text)  # last SMTP reply or error, never content
    #: RFC 3461 §4.1, §4.2: NOTIFY (NEVER, or SUCCESS,FAILURE,DELAY in part; None: the default
    #: failure and delay) and ORCPT (``rfc822;address``, xtext-decoded).
    dsn_notify: Mapped[str | None] = mapped_column(String(32))
    dsn_orcpt: Mapped[str | None] = mapped_column(String(500))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    message: Mapped[QueuedMessage] = relationship(back_populates="recipients")


class QueuedBytes(Base):
    """A message's bytes when the queue's database is PostgreSQL (``gateway.queue.spool.DatabaseSpool``):
    inserted with the message's rows, deleted in the transaction that makes it final.  Unused on SQLite."""

    __tablename__ = "queue_spool"

    name: Mapped[str] = mapped_column(ForeignKey("queue_messages.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
