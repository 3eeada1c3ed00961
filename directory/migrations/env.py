"""Alembic environment: runs on the engine the caller passes (see directory.db.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

# Every table of the schema, so that the metadata Alembic compares is complete.
import gateway.api.models
import gateway.audit.models
import gateway.queue.models  # noqa: F401
from directory.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
