"""Shared fixtures: operator homes on SQLite and (when available) PostgreSQL, free loopback ports.

PostgreSQL: ``.ci/run`` starts a throwaway cluster and exports ``MSSGW_TEST_PG_URL``
(a server URL with rights to create databases); each test that asks for it gets a
fresh database. Without that variable the PostgreSQL cases fail loudly rather
than skip, unless ``MSSGW_TEST_NO_PG=1`` is set for a quick local run.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, text

from tests.ports import free_port

PG_URL_ENV = "MSSGW_TEST_PG_URL"

# Property tests judge answers, never speed: Hypothesis's per-example deadline is a wall-clock
# assertion that fails at random on a loaded 2-core runner, so it is off for the whole suite.
hypothesis_settings.register_profile("mssgw", deadline=None)
hypothesis_settings.load_profile("mssgw")


@pytest.fixture
def unused_port() -> int:
    return free_port()


def _pg_server_url() -> str | None:
    url = os.environ.get(PG_URL_ENV)
    if url:
        return url
    if os.environ.get("MSSGW_TEST_NO_PG") == "1":
        return None
    raise RuntimeError(f"{PG_URL_ENV} is not set: run the suite with .ci/run (or set MSSGW_TEST_NO_PG=1)")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test."""
    server = _pg_server_url()
    if server is None:
        pytest.skip("PostgreSQL disabled with MSSGW_TEST_NO_PG=1")
    name = f"mssgw_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = server.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs twice: on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mssgw.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def pki_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development PKI for a.mssante.test made once per run (RSA key generation is slow)."""
    from certs.pki import create_dev_pki

    directory = tmp_path_factory.mktemp("pki-template") / "pki"
    create_dev_pki(directory, "a.mssante.test", "localhost")
    return directory


def _init_from_template(home: Path, template: Path) -> Path:
    from gateway.operator import init_operator

    home.mkdir(parents=True)
    shutil.copytree(template, home / "pki")
    init_operator(home, domain="a.mssante.test", hostname="localhost")
    return home


@pytest.fixture
def operator_home(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, pki_template: Path) -> Path:
    """An initialised operator (domain a.mssante.test) on each database."""
    monkeypatch.setenv("MSSGW_DATABASE_URL", database_url)
    return _init_from_template(tmp_path / "op-a", pki_template)


@pytest.fixture
def sqlite_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki_template: Path) -> Path:
    """An initialised operator on SQLite only (for tests where the store does not matter)."""
    monkeypatch.delenv("MSSGW_DATABASE_URL", raising=False)
    return _init_from_template(tmp_path / "op-a", pki_template)


FIXTURES = Path(__file__).parent / "fixtures"


NO_SKIP_ENV = "MSSGW_TEST_NO_SKIP"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under ``scripts/test`` (``MSSGW_TEST_NO_SKIP=1``) a skipped test is a failure.

    ``scripts/test`` installs every tool the suite uses, so a skip there means an install step
    is missing (swaks without TLS once passed locally and failed on a fresh machine): CI must
    say so instead of going green with a whole area unexercised.
    """
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get(NO_SKIP_ENV) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"unexpected skip under scripts/test ({NO_SKIP_ENV}=1): {reason}"
