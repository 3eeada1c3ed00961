"""Database access: engine, sessions and schema migrations (Alembic).

SQLite (WAL, foreign keys on, synchronous FULL so a commit is on disk) is the
embedded default; PostgreSQL is reached through psycopg 3. Both run the same
Alembic history in ``directory/migrations``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from directory.models import Base
from gateway.core.durable import PRIVATE_FILE_MODE, private_dir, private_file, private_umask
from gateway.core.errors import OutageError

MIGRATIONS = Path(__file__).parent / "migrations"
READ_ONLY_OPTION = "mssgw_read_only"
_HOLDS_WRITE_LOCK = "mssgw_holds_write_lock"


class DatabaseError(OutageError):
    """The database cannot be opened or migrated; the message says which and why."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _private_sqlite_files(path: Path) -> None:
    """The database holds password hashes: it and its ``-wal``/``-shm`` are 0600 (SQLite gives the
    WAL and shared-memory files the database file's mode, so it is created 0600 before SQLite
    opens it); files of an older install made under a wider umask are narrowed."""
    if not path.parent.exists():
        private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        private_file(name)


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and use the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(url: str, *, echo: bool = False) -> Engine:
    url = normalise_url(url)
    parsed = make_url(url)
    private_umask()
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_files(Path(parsed.database))
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        # SQLite's own BEGIN handling is replaced by ours. Writers use BEGIN IMMEDIATE, which
        # avoids the upgrade deadlock of a transaction that reads then writes; sessions from
        # ``read_session_factory`` use a deferred BEGIN, so lookups never wait for a writer (WAL).
        # Writers of this process take turns on a lock of their own before BEGIN IMMEDIATE:
        # SQLite's busy handler makes a waiting writer sleep 1, 2, 5, 10... ms between tries,
        # which leaves the CPU idle while the queue's threads (enqueues, claims, outcomes,
        # audit) wait for each other.  Other processes (the CLI) still meet the busy timeout.
        writers = threading.Lock()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
            if not read_only:
                if not writers.acquire(timeout=30):
                    raise DatabaseError("the database stayed locked by another writer for 30 s")
                conn.info[_HOLDS_WRITE_LOCK] = True
            try:
                conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
            except BaseException:
                _release(conn.info)
                raise

        def _release(info: dict[str, Any]) -> None:
            if info.pop(_HOLDS_WRITE_LOCK, False):
                writers.release()

        # commit/rollback events come just before the statement: the next writer may meet
        # SQLite's lock for the time of a COMMIT, at worst one short busy-handler sleep.  A
        # connection going back to the pool never keeps the turn (``info`` is the pooled
        # connection's, shared with the Connection).
        event.listen(engine, "commit", lambda conn: _release(conn.info))
        event.listen(engine, "rollback", lambda conn: _release(conn.info))
        def _checkin(_dbapi: Any, record: Any) -> None:
            if record is not None:
                _release(record.info)

        event.listen(engine.pool, "checkin", _checkin)

        @event.listens_for(engine, "connect")
        def _no_autobegin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    from alembic import command

    try:
        command.upgrade(alembic_config(engine), "head")
    except Exception as exc:  # the driver's errors vary; say what failed
        raise DatabaseError(f"cannot migrate the database at {engine.url!r}: {exc}") from exc


def is_migrated(engine: Engine) -> bool:
    return inspect(engine).has_table("alembic_version")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for lookups only: on SQLite they do not take the write lock."""
    return sessionmaker(engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False)


def write_connection(factory: sessionmaker[Session]) -> AbstractContextManager[Connection]:
    """``engine.begin()`` for the factory's engine: a Core transaction without the ORM session.

    The queue's hot paths (group commit, claims, outcomes) only run Core statements; a bare
    connection costs about half the CPU of a Session for the same statements.  Same BEGIN
    (IMMEDIATE on SQLite) as the factory's sessions.
    """
    bind = factory.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("the session factory has no engine bound")
    return bind.begin()


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error."""
    with factory() as session, session.begin():
        yield session


__all__ = [
    "Base",
    "DatabaseError",
    "make_engine",
    "migrate",
    "read_session_factory",
    "session_factory",
    "transaction",
]
