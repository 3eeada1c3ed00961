"""The policy tests' directory: migrated and seeded on each database, read by the rules under test (no PKI: fast)."""

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
