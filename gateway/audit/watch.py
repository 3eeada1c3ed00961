"""What this process last wrote to the audit trail: so that a head moved back is noticed.

The hash chain links each new record to whatever head the database shows. A database
owner who deletes the unsealed tail (by hand inside the seal window, or with a trigger
that deletes rows as they are inserted) leaves a shorter chain that still verifies, and
the next seal would sign it. The process therefore remembers the (seq, hash) of the last
record it committed itself, per database (keyed by the engine's connection pool, which
an engine and its ``execution_options`` copies share). Before appending, before sealing
and after each batch (read-back), that record must still be there with the same hash:
one lookup by primary key. A higher head is fine (the CLI and other nodes append too);
a head below it, or the record gone or changed, is a break.

The memory is moved only when the writing transaction commits (connection ``commit``
event): a rolled-back append must not look like a deletion afterwards.

What it cannot see: a deletion while no gateway process that wrote the tail is running
(the memory is per process); that tail is then only as safe as the last seal.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, event, select
from sqlalchemy.orm import Session

from gateway.audit.models import AuditRecord

BREAK_EVENT = "audit-chain-break"

@dataclass
class ChainWatch:
    """The last record this process committed to one database's trail, and breaks not yet sealed."""

    last: tuple[int, str] | None = None
    node: str = ""  # the chain this process appends to (``trail.bind_node``)
    breaks: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def confirm(self, seq: int, digest: str, found: dict[str, Any] | None) -> None:
        with self.lock:  # commits of this process come in chain order (the chain lock is held until then)
            self.last = (seq, digest)
            if found is not None:
                self.breaks.append(found)

    def take_breaks(self) -> list[dict[str, Any]]:
        with self.lock:
            taken, self.breaks = self.breaks, []
            return taken

    def give_back(self, breaks: list[dict[str, Any]]) -> None:
        with self.lock:
            self.breaks[0:0] = breaks


_WATCHES: weakref.WeakKeyDictionary[Any, ChainWatch] = weakref.WeakKeyDictionary()
_WATCHES_LOCK = threading.Lock()


def _engine_of(db: Session | Connection | Engine) -> Engine:
    if isinstance(db, Engine):
        return db
    if isinstance(db, Connection):
        return db.engine
    bind = db.get_bind()
    return bind.engine if isinstance(bind, Connection) else bind


def watch_for(db: Session | Connection | Engine) -> ChainWatch:
    pool = _engine_of(db).pool
    with _WATCHES_LOCK:
        found = _WATCHES.get(pool)
        if found is None:
            found = _WATCHES[pool] = ChainWatch()
        return found


def _covered_by_retention(db: Session | Connection, node: str, seq: int, digest: str) -> bool:
    """A record gone because a purge removed it (the retention record names it or a later one)."""
    for raw in db.execute(select(AuditRecord.detail).where(AuditRecord.node == node,
                                                           AuditRecord.event == "retention")).scalars():
        try:
            detail = json.loads(raw or "{}")
            through = int(detail.get("removed_through", 0))
        except (ValueError, TypeError):
            continue
        if through > seq or (through == seq and detail.get("last_removed_hash") == digest):
            return True
    return False


def inspect(db: Session | Connection, watch: ChainWatch, head: tuple[int, str] | None) -> dict[str, Any] | None:
    """None when this process's last record is still in place; else what was found instead (no content)."""
    own = watch.last
    if own is None:
        return None
    seq, digest = own
    head_seq = int(head[0]) if head is not None else 0
    if head is not None and head_seq == seq:
        found_hash: str | None = str(head[1])
    elif head_seq < seq:
        found_hash = None
    else:
        found_hash = db.execute(select(AuditRecord.hash).where(AuditRecord.node == watch.node,
                                                               AuditRecord.seq == seq)).scalar()
    if found_hash == digest:
        return None
    if found_hash is None and _covered_by_retention(db, watch.node, seq, digest):
        return None
    if found_hash is not None:
        kind = "changed"
    elif head_seq < seq:
        kind = "head-below"
    else:
        kind = "missing"
    return {"expected_seq": seq, "expected_hash": digest, "found": kind, "head_seq": head_seq,
            "lost_from": min(seq, head_seq + 1) if kind == "head-below" else seq, "lost_through": seq}


def describe(detail: dict[str, Any]) -> str:
    """A break in words (for ``audit verify`` and the log): which records this process wrote are gone."""
    try:
        first, last = int(detail["lost_from"]), int(detail["lost_through"])
        kind = str(detail.get("found"))
        head = int(detail.get("head_seq", 0))
    except (KeyError, TypeError, ValueError):
        return "the writer found its last record gone or changed"
    span = f"seq {first}" if first == last else f"seq {first}..{last}"
    if kind == "changed":
        return f"record {span} written by the gateway was changed in the database"
    if kind == "head-below":
        what = f"record {span} written by the gateway was" if first == last else f"records {span} written by the gateway were"
        return f"{what} deleted (the head went back to seq {head})"
    return f"record {span} written by the gateway was deleted"


def stage(db: Session | Connection, watch: ChainWatch, seq: int, digest: str, found: dict[str, Any] | None) -> None:
    """Remember (seq, digest) as this process's last record once the transaction commits."""
    conn = db if isinstance(db, Connection) else db.connection()
    state = {"open": True}  # the listeners live as long as the Connection (closed with its transaction)

    def on_commit(_conn: Connection) -> None:
        if state["open"]:
            state["open"] = False
            watch.confirm(seq, digest, found)

    def on_rollback(_conn: Connection) -> None:
        state["open"] = False

    event.listen(conn, "commit", on_commit)
    event.listen(conn, "rollback", on_rollback)
