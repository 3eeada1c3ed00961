"""A migrated, seeded directory on each database (no operator home, no PKI: fast)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from directory import admin
from directory.db import make_engine, migrate, session_factory, transaction

LOCAL = "a.mssante.test"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrate(eng)
    with transaction(session_factory(eng)) as session:
        admin.add_local_domain(session, LOCAL)
        admin.seed_consumer_domains(session)
    yield eng
    eng.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def people(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """The directory with ``tests.directory.directory_world``'s people in it."""
    from tests.directory.directory_world import populate

    with transaction(factory) as s:
        populate(s)
    return factory
