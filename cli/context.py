"""What every command needs: the operator's settings and a database, opened on first use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from directory.db import is_migrated, make_engine, read_session_factory, session_factory
from gateway.audit.trail import bind_node
from gateway.config import ConfigError, Settings, load_settings, resolve_home


@dataclass
class AppContext:
    data_dir: str | None
    _settings: Settings | None = field(default=None, repr=False)
    _engine: Engine | None = field(default=None, repr=False)
    _factory: sessionmaker[Session] | None = field(default=None, repr=False)
    _read_factory: sessionmaker[Session] | None = field(default=None, repr=False)

    @property
    def home(self) -> Path:
        return resolve_home(self.data_dir)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.data_dir)
        return self._settings

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            engine = make_engine(self.settings.database_url, echo=self.settings.database.echo)
            if not is_migrated(engine):
                raise ConfigError(
                    f"the database of {self.home} is not initialised: run 'mssgw init --data-dir {self.home}'"
                )
            bind_node(engine, self.settings.audit.node)  # records go to this node's chain
            self._engine = engine
        return self._engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._factory is None:
            self._factory = session_factory(self.engine)
        return self._factory

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session committed when the block succeeds, rolled back otherwise."""
        with self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for lookups only (on SQLite it never waits for a writer)."""
        if self._read_factory is None:
            self._read_factory = read_session_factory(self.engine)
        with self._read_factory() as session, session.begin():
            yield session

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


pass_app = click.make_pass_decorator(AppContext)
