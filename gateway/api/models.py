"""The table of the API's idempotency keys: the first answer to each (certificate mailbox, key).

A row is written before the message is handed to the queue (``state = pending``, with the queue
id chosen in advance and the 202 answer already known) and marked ``done`` once the queue
committed it, so a retry after a crash between the two can tell, from the queue alone, whether
the message was stored. The primary key makes two nodes that receive the same retry at once
agree on one of them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from directory.models import Base, utcnow

__all__ = ["ApiIdempotency"]


class ApiIdempotency(Base):
    __tablename__ = "api_idempotency"

    identity: Mapped[str] = mapped_column(String(320), primary_key=True)  # the mailbox of the certificate
    key: Mapped[str] = mapped_column(String(255), primary_key=True)  # the Idempotency-Key header
    request_sha256: Mapped[str] = mapped_column(String(64))  # of the canonical JSON body
    queue_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(8))  # pending, done
    status: Mapped[int] = mapped_column(Integer)  # the HTTP status of the first answer
    response: Mapped[str] = mapped_column(Text)  # its JSON body (ids and decisions: no content)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
