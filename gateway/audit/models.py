"""Table of the audit trail: append-only records chained by SHA-256.

Each record stores the hash of the previous one of its chain (one chain per node);
``hash`` covers every field of the record plus ``prev_hash``, so editing or deleting any record breaks the chain
from that point (``mssgw audit verify``). Records never hold bodies, subjects or
attachment names: only envelopes, identities, rules and outcomes.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from directory.models import Base, utcnow


class AuditRecord(Base):
    __tablename__ = "audit_records"

    #: The chain the record belongs to: one per gateway node (``audit.node``; "" for a lone node).
    #: Each node appends to its own chain, so nodes never wait for each other's audit records.
    node: Mapped[str] = mapped_column(String(64), primary_key=True, default="", server_default="")
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # within the chain
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    event: Mapped[str] = mapped_column(String(32))  # connect, auth, mail, rcpt, accept, deliver, ...
    outcome: Mapped[str] = mapped_column(String(16))  # accept, refuse, fail, info
    actor: Mapped[str | None] = mapped_column(String(320))  # authenticated identity or peer operator
    client: Mapped[str | None] = mapped_column(String(64))  # client IP address
    sender: Mapped[str | None] = mapped_column(String(320))
    recipient: Mapped[str | None] = mapped_column(String(320))
    queue_id: Mapped[str | None] = mapped_column(String(32))
    rule: Mapped[str | None] = mapped_column(String(64))
    reply: Mapped[str | None] = mapped_column(String(64))  # e.g. "550 5.7.1"
    detail: Mapped[str | None] = mapped_column(Text)  # JSON object of extra fields, no content
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_ts", "ts"),
        Index("ix_audit_sender", "sender"),
        Index("ix_audit_recipient", "recipient"),
    )
