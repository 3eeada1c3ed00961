"""The audit trail: an append-only, hash-chained record of every decision.

Each record's ``hash`` is SHA-256 over its canonical JSON (every field but the
hash) including ``prev_hash``; editing, inserting or deleting a record breaks
the chain at that point, which ``verify`` reports. Retention removes a prefix of
the chain and appends a ``retention`` record naming the last removed sequence
number and hash, so a verified chain may start after 1 only with that proof.

The chain alone cannot see records cut from its tail. The writing process
therefore checks that its own last record is still in place before each append,
after each batch and before each seal (``gateway/audit/watch.py``); when it is not,
an ``audit-chain-break`` record (expected seq and hash, what was found; no content)
is linked to the current head and the next seal names the break.

Records hold envelopes, identities, rules and outcomes, never bodies, subjects
or attachment names.

One chain per gateway node (``audit.node``, bound to the engine with ``bind_node``; "" for a
lone node): each record carries its chain's name and a seq within it, and its hash covers the
name.  Appends to one chain are serialised (SQLite's write lock, BEGIN IMMEDIATE; on PostgreSQL
a transaction-level advisory lock keyed by the chain), so the nodes sharing a PostgreSQL never
wait for each other's audit records: the lock that made every enqueue and outcome of the
cluster commit one at a time is now one per node.  Why chains per node rather than one chain
built later by a single sealer: every record is chained in the transaction that decides it (no
window where a committed decision has no hash), each chain verifies alone, and the seals of
each node name the heads of every chain (``gateway.audit.seal``), so a chain cut back while its
node is down is still seen by the others' seals.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Engine, Integer, Table, bindparam, delete, func, insert, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from directory.db import READ_ONLY_OPTION
from gateway.audit.models import AuditRecord
from gateway.audit.storable import storable, storable_with_detail
from gateway.audit.watch import BREAK_EVENT, describe, inspect, stage, watch_for
from gateway.core.errors import OutageError

if TYPE_CHECKING:
    from gateway.audit.seal import Sealer

log = logging.getLogger("mssgw.audit")

GENESIS = "0" * 64
_PG_LOCK_CLASS = 0x6D737367  # "mssg": with the chain's CRC-32, the two-key advisory lock of one chain


@dataclass(frozen=True)
class AuditEvent:
    event: str
    outcome: str  # accept, refuse, fail, info
    actor: str | None = None
    client: str | None = None
    sender: str | None = None
    recipient: str | None = None
    queue_id: str | None = None
    rule: str | None = None
    reply: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    ts: datetime | None = None


def _ts_text(ts: datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def record_hash(seq: int, ts: datetime, fields: dict[str, Any], prev_hash: str, node: str = "") -> str:
    """SHA-256 of the record's canonical JSON; a named chain's records cover its name too (a record
    moved to another chain breaks), the lone node's ("") hash as they always did."""
    chained = {"node": node} if node else {}
    canonical = json.dumps(
        {"seq": seq, "ts": _ts_text(ts), **fields, **chained, "prev_hash": prev_hash},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _fields(row: Any) -> dict[str, Any]:
    """The hashed fields of a record (an ``AuditRecord`` or a row of its table)."""
    return {
        "event": row.event,
        "outcome": row.outcome,
        "actor": row.actor,
        "client": row.client,
        "sender": row.sender,
        "recipient": row.recipient,
        "queue_id": row.queue_id,
        "rule": row.rule,
        "reply": row.reply,
        "detail": row.detail,
    }


def bind_node(engine: Engine, node: str) -> None:
    """Records this process appends through ``engine`` go to chain ``node`` (``audit.node``)."""
    watch_for(engine).node = node[:64]


def chain_lock_key(node: str) -> int:
    """The second key of a chain's advisory lock (a signed 32-bit CRC of its name)."""
    crc = zlib.crc32(node.encode("utf-8"))
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def _lock_chain(db: Session | Connection, node: str) -> None:
    dialect = db.dialect if isinstance(db, Connection) else db.get_bind().dialect
    if dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(:c, :k)"), {"c": _PG_LOCK_CLASS, "k": chain_lock_key(node)})


_NODE = bindparam("node", type_=AuditRecord.node.type)
_LAST = select(AuditRecord.seq, AuditRecord.hash).where(AuditRecord.node == _NODE).order_by(
    AuditRecord.seq.desc()).limit(1)
_HASH_AT = select(AuditRecord.hash).where(AuditRecord.node == _NODE,
                                          AuditRecord.seq == bindparam("seq", type_=Integer))
_INSERT = insert(cast(Table, AuditRecord.__table__))
_WALK = (
    select(*cast(Table, AuditRecord.__table__).c)
    .where(AuditRecord.node == _NODE, AuditRecord.seq > bindparam("after", type_=Integer))
    .order_by(AuditRecord.seq)
    .limit(bindparam("batch", type_=Integer))
)
_CHAINS = select(AuditRecord.node).distinct().order_by(AuditRecord.node)


def chains(db: Session | Connection) -> list[str]:
    """The names of the chains in the trail ("" is the lone node's)."""
    return [str(n) for n in db.execute(_CHAINS).scalars()]


def append(db: Session | Connection, events: Sequence[AuditEvent], *, node: str | None = None) -> list[int]:
    """Append ``events`` in the caller's transaction (committed with it); returns their seq numbers.

    ``db`` is an ORM session (admin commands) or a bare connection (the queue's hot paths).
    The chain is this process's (``bind_node``) unless ``node`` names another (a purge's
    retention record goes to each chain it shortens).
    When this process's last record is no longer where it wrote it (``watch``), an
    ``audit-chain-break`` record goes first: the gap is recorded, never chained over silently.
    """
    if not events:
        return []
    return _append(db, list(events), node)


def repair(db: Session | Connection) -> bool:
    """Write an ``audit-chain-break`` record now if this process's last record is gone or changed
    (read-back after a commit, and before a seal); True when one was written."""
    return bool(_append(db, []))


def check_chain(factory: sessionmaker[Session], reader: Engine | None = None) -> bool:
    """Read-back: is this process's last record still there? One lookup by seq on a read-only
    connection (``reader``: made once by a frequent caller, it is not cheap); only when it is
    not, a write transaction records the break. True when one was written."""
    bind = factory.kw.get("bind")
    if not isinstance(bind, Engine):
        return False
    watch = watch_for(bind)
    own = watch.last
    if own is None:
        return False
    if reader is None:
        reader = read_only(bind)
    with reader.connect() as conn:  # a bare connection: a third of a Session's cost
        if conn.execute(_HASH_AT, {"node": watch.node, "seq": own[0]}).scalar() == own[1]:
            return False
    with factory() as session, session.begin():
        return repair(session)


def read_only(bind: Engine) -> Engine:
    """The read-back's engine: same pool, never the SQLite write lock."""
    return bind.execution_options(**{READ_ONLY_OPTION: True})


def _break_event(found: dict[str, Any]) -> AuditEvent:
    return AuditEvent(BREAK_EVENT, "fail", rule=BREAK_EVENT, detail=dict(found))


def _append(db: Session | Connection, events: list[AuditEvent], node: str | None = None) -> list[int]:
    watch = watch_for(db)
    chain = watch.node if node is None else node
    own = chain == watch.node  # this process watches its own chain only
    if not events and (watch.last is None or not own):
        return []
    _lock_chain(db, chain)
    last = db.execute(_LAST, {"node": chain}).first()
    found = inspect(db, watch, (int(last[0]), str(last[1])) if last else None) if own else None
    if found is not None:
        log.error("audit chain break: %s", describe(found))
        events = [_break_event(found), *events]
    elif not events:
        return []
    seq, prev = (last[0], last[1]) if last else (0, GENESIS)
    out: list[int] = []
    rows: list[dict[str, Any]] = []
    for raw_event in events:
        ev, detail = storable_with_detail(raw_event)  # never trust a caller to have escaped and cut its values
        seq += 1
        ts = ev.ts or datetime.now(UTC)
        fields = {
            "event": ev.event,
            "outcome": ev.outcome,
            "actor": ev.actor,
            "client": ev.client,
            "sender": ev.sender,
            "recipient": ev.recipient,
            "queue_id": ev.queue_id,
            "rule": ev.rule,
            "reply": ev.reply,
            "detail": detail,
        }
        digest = record_hash(seq, ts, fields, prev, chain)
        rows.append({"node": chain, "seq": seq, "ts": ts, **fields, "prev_hash": prev, "hash": digest})
        prev = digest
        out.append(seq)
    if isinstance(db, Session):
        db.flush()  # ORM changes of the caller's transaction first, then one bulk insert
    db.execute(_INSERT, rows)
    if own:
        stage(db, watch, seq, prev, found)
    return out


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    first_seq: int | None
    last_seq: int | None
    broken_at: int | None = None
    problem: str | None = None
    node: str = ""  # the chain (the broken one, or the lone node's)
    #: Every chain checked: name -> (records, first seq, last seq), when there are named chains.
    chains: dict[str, tuple[int, int | None, int | None]] = field(default_factory=dict)

    def summary(self) -> str:
        where = f" (chain {self.node!r})" if self.node else ""
        if self.ok:
            if not self.records:
                return "audit trail is empty"
            if len(self.chains) > 1 or self.node:
                parts = ", ".join(f"{name or '(lone)'}: {n} seq {a}..{b}" for name, (n, a, b) in self.chains.items())
                return f"audit trail intact: {self.records} records in {len(self.chains)} chains ({parts})"
            return f"audit trail intact: {self.records} records, seq {self.first_seq}..{self.last_seq}"
        return f"audit trail BROKEN at seq {self.broken_at}{where}: {self.problem}"


def verify(session: Session, *, batch: int = 5000, node: str | None = None) -> VerifyResult:
    """Walk every chain (or ``node``'s) in order; report the first record that does not fit.

    Each chain verifies alone: a node's records never depend on another node's."""
    names = [node] if node is not None else chains(session)
    results = [_verify_chain(session, name, batch) for name in names] or [VerifyResult(True, 0, None, None)]
    broken = next((r for r in results if not r.ok), None)
    if broken is not None:
        return broken
    summary = {r.node: (r.records, r.first_seq, r.last_seq) for r in results}
    if len(results) == 1:
        return VerifyResult(True, results[0].records, results[0].first_seq, results[0].last_seq,
                            node=results[0].node, chains=summary)  # fmt: skip
    return VerifyResult(True, sum(r.records for r in results), None, None, chains=summary)


def _verify_chain(session: Session, node: str, batch: int) -> VerifyResult:
    res = _walk_chain(session, node, batch)
    return VerifyResult(res.ok, res.records, res.first_seq, res.last_seq, res.broken_at, res.problem, node)


def _walk_chain(session: Session, node: str, batch: int) -> VerifyResult:
    count = 0
    first: int | None = None
    expected_seq: int | None = None
    prev = GENESIS
    after = 0
    while True:
        # Plain rows, not ORM objects: a long trail is walked several times faster.
        rows = list(session.execute(_WALK, {"node": node, "after": after, "batch": batch}))
        if not rows:
            break
        for row in rows:
            if first is None:
                first = row.seq
                expected_seq = row.seq
                if row.seq != 1:
                    proof = _retention_proof(session, node, row.seq - 1, row.prev_hash)
                    if not proof:
                        return VerifyResult(False, count, first, row.seq, row.seq,
                                            f"chain starts at seq {row.seq} with no retention record for the records before it")
                prev = row.prev_hash
            if row.seq != expected_seq:
                return VerifyResult(False, count, first, row.seq, expected_seq,
                                    f"record {expected_seq} is missing (next is {row.seq})")
            if row.prev_hash != prev:
                return VerifyResult(False, count, first, row.seq, row.seq,
                                    "its link to the previous record does not match (a record before it was changed or removed)")
            if record_hash(row.seq, row.ts, _fields(row), row.prev_hash, node) != row.hash:
                return VerifyResult(False, count, first, row.seq, row.seq, "its content does not match its hash (edited)")
            prev = row.hash
            expected_seq = row.seq + 1
            count += 1
            after = row.seq
    return VerifyResult(True, count, first, after or None)


def _retention_proof(session: Session, node: str, last_removed: int, last_hash: str) -> bool:
    rows = session.scalars(select(AuditRecord).where(AuditRecord.node == node, AuditRecord.event == "retention")
                           .order_by(AuditRecord.seq.desc()))  # fmt: skip
    for row in rows:
        detail = json.loads(row.detail or "{}")
        if detail.get("removed_through") == last_removed and detail.get("last_removed_hash") == last_hash:
            return True
    return False


def purge(session: Session, *, older_than: timedelta, now: datetime | None = None) -> int:
    """Remove records older than the retention period from every chain, keeping each verifiable."""
    cutoff = (now or datetime.now(UTC)) - older_than
    return sum(_purge_chain(session, node, cutoff) for node in chains(session))


def _purge_chain(session: Session, node: str, cutoff: datetime) -> int:
    _lock_chain(session, node)
    last_old = session.execute(
        select(AuditRecord.seq, AuditRecord.hash)
        .where(AuditRecord.node == node, AuditRecord.ts < cutoff, AuditRecord.event != "retention")
        .order_by(AuditRecord.seq.desc())
        .limit(1)
    ).first()
    if last_old is None:
        return 0
    # The retention record first: it takes the next seq after the head even when every record
    # goes (numbering never restarts, so seals of the removed records still place them).
    append(session, [AuditEvent("retention", "info", detail={
        "removed_through": last_old[0], "last_removed_hash": last_old[1], "cutoff": cutoff.isoformat()})],
        node=node)
    removed = session.execute(delete(AuditRecord).where(AuditRecord.node == node,
                                                        AuditRecord.seq <= last_old[0])).rowcount or 0  # type: ignore[attr-defined]
    return int(removed)


def query(
    session: Session,
    *,
    since: datetime | None = None,
    address: str | None = None,
    event: str | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    stmt = select(AuditRecord).order_by(AuditRecord.seq.desc(), AuditRecord.node).limit(limit)
    if since is not None:
        stmt = stmt.where(AuditRecord.ts >= since)
    if address:
        a = address.lower()
        stmt = stmt.where(or_(AuditRecord.sender == a, AuditRecord.recipient == a, AuditRecord.actor == a))
    if event:
        stmt = stmt.where(AuditRecord.event == event)
    rows = list(session.scalars(stmt))
    rows.reverse()
    return [
        {"seq": r.seq, "ts": _ts_text(r.ts), **_fields(r), "detail": json.loads(r.detail) if r.detail else None,
         **({"node": r.node} if r.node else {})}
        for r in rows
    ]


def count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(AuditRecord)) or 0)


_LENT_MAX = 100_000


class AuditUnavailable(OutageError):
    """The database cannot take audit records now (``flush`` of a writer that was not started)."""


def unwritable(ev: AuditEvent, exc: BaseException) -> AuditEvent:
    """What stands in for a record the database refused: that one was lost, and why (no content)."""
    return AuditEvent("audit", "fail", rule="audit-unwritable", ts=ev.ts,
                      detail={"lost_event": ev.event[:32], "error": type(exc).__name__})


class AuditWriter:
    """Batches audit events from the event loop and writes them from a thread.

    ``submit`` never blocks the SMTP conversation and makes each event storable
    first (``storable``); ``flush`` waits until all submitted events are committed.
    One bad record never wedges the trail: when a batch fails, its events are written
    one by one, and an event the database still refuses is replaced by an
    ``audit-unwritable`` record (if that too fails, the database is down: the events
    are kept and retried, logged without content). ``close`` always finishes: after
    ``close_timeout`` seconds of outage the events left are counted in the log and
    dropped. With a ``sealer``, the trail is sealed periodically and at close.
    """

    def __init__(self, factory: sessionmaker[Session], *, max_batch: int = 500,
                 executor: Executor | None = None,
                 sink: Callable[[Sequence[AuditEvent]], None] | None = None, linger: float = 0.05,
                 sealer: Sealer | None = None, retry_delay: float = 1.0, close_timeout: float = 10.0) -> None:
        self._factory = factory
        bind = factory.kw.get("bind")
        self._readback = read_only(bind) if isinstance(bind, Engine) else None
        self._max_batch = max_batch
        # Events wait up to ``linger`` seconds for others: one write transaction per burst
        # (an SMTP transaction submits several) rather than one per event.  Nothing is
        # acknowledged on the strength of these records (acceptances are committed with the
        # message), and ``flush`` cuts the wait short.
        self._linger = linger
        self._hurry = asyncio.Event()
        # The gateway passes ``QueueStore.append_audit``: batches then ride in the queue's
        # group commits instead of competing with them for the database's write lock.
        self._sink = sink
        self._executor = executor
        self._sealer = sealer
        self._retry_delay = retry_delay
        self._close_timeout = close_timeout
        self._pending: list[AuditEvent] = []
        # Events a caller took (``take_pending``) and gave back after its transaction failed:
        # written by this writer only, never lent again, so that a record the database
        # refuses cannot make message after message fail with it.
        self._held: list[AuditEvent] = []
        self._lent: dict[int, None] = {}  # ids of events lent out (bounded; see ``take_pending``)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._seal_task: asyncio.Task[None] | None = None
        self._closing = False
        self.replaced = 0  # records the database refused, replaced by ``audit-unwritable`` (tests, metrics)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")
        if self._sealer is not None and self._seal_task is None:
            self._seal_task = asyncio.get_running_loop().create_task(
                self._sealer.run(self._executor), name="audit-sealer")

    def submit(self, *events: AuditEvent) -> None:
        for ev in events:
            if self._lent.pop(id(ev), False) is None:  # given back by a caller whose transaction failed
                self._held.append(ev)
            else:
                self._pending.append(storable(ev))
        self._idle.clear()
        self._wakeup.set()

    def take_pending(self) -> list[AuditEvent]:
        """The events not yet being written, for a caller that commits them in its own transaction
        (the SMTP edge, with the message it accepts: one write instead of two).  A caller whose
        transaction fails gives them back with ``submit``; those are then written by the writer
        alone (one of them may be why the transaction failed)."""
        events, self._pending = self._pending, []
        lent = self._lent
        for ev in events:
            lent[id(ev)] = None
        if len(lent) > _LENT_MAX:  # committed events never come back: forget the oldest half
            for key in list(lent)[: len(lent) // 2]:
                del lent[key]
        return events

    def write_now(self, events: Iterable[AuditEvent]) -> None:
        """Synchronous append in its own transaction (for callers outside the event loop), then
        the read-back: a trigger deleting rows as they are inserted is caught at once."""
        if self._sink is not None:
            self._sink(list(events))
        else:
            with self._factory() as session, session.begin():
                append(session, list(events))
        try:
            check_chain(self._factory, self._readback)
        except Exception as exc:  # the records are committed; the next append or seal checks again
            log.error("audit read-back failed error=%s", type(exc).__name__)

    async def _write(self, batch: list[AuditEvent]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.write_now, batch)

    async def _write_each(self, batch: list[AuditEvent]) -> list[AuditEvent]:
        """Write the events one by one, replacing any the database refuses; returns those left
        unwritten because the database is down (the stand-in record could not be written either)."""
        for i, ev in enumerate(batch):
            try:
                await self._write([ev])
            except Exception:
                try:  # once more: a refusal that persists is the record's fault, not a hiccup
                    await self._write([ev])
                    continue
                except Exception as again:
                    exc = again
                try:
                    await self._write([unwritable(ev, exc)])
                except Exception:
                    return batch[i:]
                self.replaced += 1
                log.error("audit record refused by the database (%s); replaced by an audit-unwritable record",
                          type(exc).__name__)
        return []

    def _next_batch(self) -> list[AuditEvent]:
        """Given-back events first, then the others, at most ``max_batch``; out of reach of
        ``take_pending`` while written."""
        source = self._held if self._held else self._pending
        batch = source[: self._max_batch]
        del source[: len(batch)]
        return batch

    async def flush(self) -> None:
        if self._task is None:
            while self._held or self._pending:
                left = await self._write_batch(self._next_batch())
                self._held[0:0] = left
                if left:
                    raise AuditUnavailable(f"the audit trail cannot be written now ({len(left)} events kept)")
            self._idle.set()
            return
        self._hurry.set()
        self._wakeup.set()
        await self._idle.wait()

    async def _write_batch(self, batch: list[AuditEvent]) -> list[AuditEvent]:
        try:
            await self._write(batch)
        except Exception:
            return await self._write_each(batch)
        return []

    async def close(self) -> None:
        """Write what is pending (for at most ``close_timeout`` s of outage), seal, stop."""
        self._closing = True
        try:
            await asyncio.wait_for(self.flush(), timeout=self._close_timeout)
        except (TimeoutError, AuditUnavailable):
            log.error("audit writer closed with %d events unwritten (database unavailable)",
                      len(self._pending) + len(self._held))
        for task in (self._task, self._seal_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._seal_task = None
        if self._sealer is not None:
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._executor, self._sealer.seal),
                                       timeout=self._close_timeout)
            except Exception as exc:  # the trail stays verifiable; its tail is reported unsealed
                log.error("audit seal at shutdown failed error=%s", type(exc).__name__)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if self._linger > 0 and not self._hurry.is_set():
                # A timer rather than asyncio.wait_for: on Python 3.11 wait_for can swallow the
                # cancellation that ``close`` sends, and the writer would never end.
                timer = asyncio.get_running_loop().call_later(self._linger, self._hurry.set)
                try:
                    await self._hurry.wait()
                finally:
                    timer.cancel()
            self._hurry.clear()
            self._wakeup.clear()
            while self._held or self._pending:
                left = await self._write_batch(self._next_batch())
                if left:  # the database is down: keep the events, retry shortly
                    log.error("audit write failed; %d events kept for retry", len(left))
                    self._held[0:0] = left
                    await asyncio.sleep(self._retry_delay)
            self._idle.set()
