"""Where the bytes of queued messages live: fsynced files on one node, rows of the database when nodes share PostgreSQL.

The job: one ``Spool`` interface, two implementations, chosen from the database (``spool_for``):

- ``FileSpool`` (SQLite, one node): ``stage`` stores a message's bytes durably (tmp -> fsync ->
  rename -> fsync of the folder, ``gateway.core.durable.write_durably``) BEFORE the rows that point at
  them are committed, so a row never points at missing bytes; ``remove`` drops the bytes of
  finished messages AFTER the commit that made them final; ``sweep`` removes what a crash left
  between the two.  Files are 0600 in 0700 folders, fanned out by the first two hex digits.
- ``DatabaseSpool`` (PostgreSQL, any number of nodes): the bytes are a ``bytea`` row of
  ``queue_spool`` inserted IN the acceptance transaction (``insert`` is called by
  ``gateway.queue.admission.insert_new`` on the transaction's connection), read by whichever
  node claims the message in the claim's transaction (``read_many``), and deleted IN the
  transaction that makes the message final (``drop``).  Bytes and rows commit or vanish
  together: no orphan to sweep, no node-local disk on the delivery path.  Spool files a
  single-node PostgreSQL install queued before it switched (``legacy``) are still read, and
  removed once their message is final, so an upgrade strands nothing.

Why ``bytea`` and not large objects: a message is bounded (``limits.max_message_bytes``, tens of
MB, far below bytea's 1 GB) and is always read whole, which is what bytea does in one round
trip; a bytea value goes with its row (DELETE, ON DELETE CASCADE, transaction rollback), while a
large object outlives its referencing row until ``lo_unlink`` (orphans then need ``vacuumlo``),
needs its own privileges and is dumped apart by ``pg_dump``.  The column is stored EXTERNAL
(out of line, uncompressed: most messages are S/MIME ciphertext, which does not compress).

Errors: ``OSError`` from the file system (the caller turns it into a temporary failure);
``FileExistsError`` for a queue id already in use (stored bytes are never overwritten; the
database spool meets its primary key instead); ``SpoolMissing`` (an ``OSError``) for bytes
that are not there.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, cast

from sqlalchemy import Connection, Engine, Table, bindparam, delete, exists, insert, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.core.durable import PRIVATE_DIR_MODE, private_dir, write_durably
from gateway.core.errors import QueueError
from gateway.queue.models import QueuedBytes, QueuedMessage

__all__ = ["DatabaseSpool", "FileSpool", "Spool", "SpoolMissing", "spool_for"]

log = logging.getLogger("mssgw.queue")

_BYTES = cast(Table, QueuedBytes.__table__)
_MESSAGES = cast(Table, QueuedMessage.__table__)
_INSERT = insert(_BYTES)
_READ = select(_BYTES.c.name, _BYTES.c.data).where(_BYTES.c.name.in_(bindparam("names", expanding=True)))
_DROP = delete(_BYTES).where(_BYTES.c.name.in_(bindparam("names", expanding=True)))


class SpoolMissing(QueueError, FileNotFoundError):
    """The bytes of a message are not in the spool (removed, or lost outside the gateway)."""

    def __init__(self, name: str) -> None:
        super().__init__(errno.ENOENT, "message bytes not in the spool", name)


class Spool(Protocol):
    """The bytes of queued messages, around the transactions that store their rows.

    The queue calls, in order: ``stage`` before the acceptance transaction, ``insert`` inside it,
    ``discard`` when it failed or stored nothing; ``read_many`` inside a claim (``read`` outside
    one); ``drop`` inside the transaction that makes a message final and ``remove`` after it.
    Each implementation does its work in the steps that keep "a row never points at missing
    bytes" true for it and leaves the others empty.
    """

    #: Whether the bytes travel in the database's transactions (they then ride in ``NewMessage.data``).
    in_database: bool

    def stage(self, name: str, data: bytes) -> None:
        """Before the transaction: make ``data`` durable under ``name`` if it lives outside the database."""
        ...

    def insert(self, conn: Connection, items: Sequence[tuple[str, bytes]]) -> None:
        """Inside the acceptance transaction: store the bytes that live in the database."""
        ...

    def discard(self, name: str) -> None:
        """After a transaction that did not store ``name``'s rows: drop what ``stage`` wrote."""
        ...

    def read(self, name: str) -> bytes:
        """The bytes of ``name`` (``SpoolMissing`` when they are not there)."""
        ...

    def read_many(self, conn: Connection, names: Sequence[str]) -> dict[str, bytes]:
        """The bytes of ``names`` that are there, read in the caller's transaction (the claim)."""
        ...

    def drop(self, conn: Connection, names: Sequence[str]) -> None:
        """Inside the transaction that makes these messages final: remove bytes kept in the database."""
        ...

    def remove(self, names: Sequence[str]) -> None:
        """After that transaction committed: remove bytes kept outside the database."""
        ...

    def holds(self, name: str) -> bool:
        """Whether bytes are stored under ``name`` (admin checks and tests)."""
        ...

    def sweep(self, factory: sessionmaker[Session], older_than: float) -> int:
        """Remove bytes with no message or of a finished one; how many were removed."""
        ...


class FileSpool:
    """One node's private folder of fsynced files (SQLite)."""

    in_database = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        private_dir(directory)

    def path(self, name: str) -> Path:
        return self.directory / name[:2] / name

    def write(self, name: str, data: bytes) -> Path:
        final = self.path(name)
        final.parent.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        if final.exists():  # a caller-chosen id already in use: never overwrite stored bytes
            raise FileExistsError(17, "queue id already in use", str(final))
        write_durably(final.with_name(f".{name}.tmp"), final, data)
        return final

    def stage(self, name: str, data: bytes) -> None:
        self.write(name, data)

    def insert(self, conn: Connection, items: Sequence[tuple[str, bytes]]) -> None:
        return None  # the files were staged before the transaction

    def read(self, name: str) -> bytes:
        try:
            return self.path(name).read_bytes()
        except FileNotFoundError:
            raise SpoolMissing(name) from None

    def read_many(self, conn: Connection, names: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for name in names:
            try:
                out[name] = self.path(name).read_bytes()
            except OSError as exc:
                log.warning("spool file %s cannot be read (%s)", name, exc.strerror)
        return out

    def discard(self, name: str) -> None:
        """Remove bytes that were never acknowledged (their rows did not commit)."""
        self.path(name).unlink(missing_ok=True)

    def drop(self, conn: Connection, names: Sequence[str]) -> None:
        return None  # files go after the commit (``remove``): the row says done before the bytes go

    def remove(self, names: Sequence[str]) -> None:
        """Remove the bytes of finished messages (their rows already say ``purged_at``).

        Called after the commit that made them final: a crash before this leaves files that the
        orphan sweep removes; a message whose bytes are gone is never claimable.
        """
        for name in names:
            try:
                self.path(name).unlink(missing_ok=True)
            except OSError as exc:  # left for the sweep
                log.warning("spool file %s could not be removed (%s)", name, exc.strerror)

    def holds(self, name: str) -> bool:
        return self.path(name).exists()

    def files(self) -> Iterator[Path]:
        """Every file in the spool, temporary ones (``.<name>.tmp``) included."""
        return self.directory.glob("*/*")

    def sweep(self, factory: sessionmaker[Session], older_than: float) -> int:
        """Files with no queue row (a crash before commit; never acknowledged) or whose message
        is finished (a crash between the final commit and ``remove``)."""
        removed = 0
        cutoff = time.time() - older_than
        with factory() as session:
            for path in self.files():
                name = path.name.lstrip(".").removesuffix(".tmp")
                msg = None if path.name.endswith(".tmp") else session.get(QueuedMessage, name)
                finished = msg is not None and msg.purged_at is not None
                if not finished and path.stat().st_mtime > cutoff:
                    continue
                if msg is None or finished:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


class DatabaseSpool:
    """``queue_spool`` rows (bytea) written, read and deleted in the queue's own transactions (PostgreSQL)."""

    in_database = True

    def __init__(self, factory: sessionmaker[Session], legacy: FileSpool | None = None) -> None:
        bind = factory.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("the session factory has no engine bound")
        self._engine = bind
        #: Files queued before the spool moved into the database (this node's own folder).
        self.legacy = legacy

    def stage(self, name: str, data: bytes) -> None:
        return None  # the bytes ride in the transaction (``insert``)

    def insert(self, conn: Connection, items: Sequence[tuple[str, bytes]]) -> None:
        if items:
            conn.execute(_INSERT, [{"name": name, "data": data} for name, data in items])

    def discard(self, name: str) -> None:
        return None  # rolled back with the transaction that would have stored them

    def read(self, name: str) -> bytes:
        with self._engine.connect() as conn:
            found = self.read_many(conn, [name])
        if name not in found:
            raise SpoolMissing(name)
        return found[name]

    def read_many(self, conn: Connection, names: Sequence[str]) -> dict[str, bytes]:
        if not names:
            return {}
        found = {row[0]: bytes(row[1]) for row in conn.execute(_READ, {"names": list(names)})}
        if self.legacy is not None and len(found) < len(names):
            found.update(self.legacy.read_many(conn, [n for n in names if n not in found and self.legacy.holds(n)]))
        return found

    def drop(self, conn: Connection, names: Sequence[str]) -> None:
        if names:
            conn.execute(_DROP, {"names": list(names)})

    def remove(self, names: Sequence[str]) -> None:
        """Rows were dropped in the transaction that made the messages final; files of before the switch go now."""
        if self.legacy is not None:
            self.legacy.remove(names)

    def holds(self, name: str) -> bool:
        with self._engine.connect() as conn:
            if conn.execute(select(exists().where(_BYTES.c.name == name))).scalar() is True:
                return True
        return self.legacy is not None and self.legacy.holds(name)

    def sweep(self, factory: sessionmaker[Session], older_than: float) -> int:
        """Rows of finished messages (none expected: they are dropped in the final transaction;
        bytes of a message removed by hand).  The foreign key rules out rows with no message."""
        finished = select(_MESSAGES.c.id).where(_MESSAGES.c.purged_at.is_not(None))
        with self._engine.begin() as conn:
            removed = int(conn.execute(delete(_BYTES).where(_BYTES.c.name.in_(finished))).rowcount or 0)
        if self.legacy is not None:
            removed += self.legacy.sweep(factory, older_than)
        return removed


def spool_for(factory: sessionmaker[Session], directory: Path) -> FileSpool | DatabaseSpool:
    """The spool the database implies: rows when it is PostgreSQL (nodes share it and nothing
    else), files in ``directory`` when it is SQLite (one node, an fsync per message is cheaper
    than bytes in the single-writer database)."""
    bind = factory.kw.get("bind")
    if isinstance(bind, Engine) and bind.dialect.name == "postgresql":
        return DatabaseSpool(factory, FileSpool(directory))
    return FileSpool(directory)
