"""Alembic: the migrations build the schema on both databases and match the models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import gateway.api.models
import gateway.audit.models
import gateway.queue.models  # noqa: F401  (every table in the metadata compared)
from directory.db import is_migrated, make_engine, migrate
from directory.models import Base


def test_upgrade_head_matches_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert not is_migrated(engine)
        migrate(engine)
        migrate(engine)  # idempotent
        assert is_migrated(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"mailboxes", "practitioners", "organisations", "domains", "certificates"} <= tables
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
    finally:
        engine.dispose()
