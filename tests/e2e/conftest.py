"""Two operators on loopback: a.mssante.test and b.mssante.test, each with its own home, PKI and database.

Each operator's home is built once per session by ``init_operator`` (dev CA, server and operator
certificates), then copied for every test with fresh ports.  Each trusts the other's domain
(relay on loopback, operator DN from the whitelist, the other CA as an ``anchor`` row and in
``tls.client_ca`` so its client certificate is accepted); users' certificates are issued by
their own operator's CA and registered in both directories.  The SMTP listeners are the real
ones (``gateway.app.Gateway``); the queue workers are driven by the tests (``run_once`` with an
injected clock), so retries and expiry never wait on real time.  A tiny TCP proxy sits between
A's relay and B's inbound listener and records the bytes on the wire.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from e2e_support import (
    A_DOMAIN,
    B_DOMAIN,
    Pair,
    Template,
    WireProxy,
    _start,
    build_templates,
)
from sqlalchemy import create_engine, text


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    os.environ.pop("MSSGW_DATABASE_URL", None)
    return build_templates(tmp_path_factory.mktemp("operators"))


@pytest.fixture
def b_settings() -> dict[str, dict[str, object]]:
    """Settings B starts with beyond the defaults (a test overrides this fixture to change them)."""
    return {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets ``BACKENDS = ("sqlite", "postgresql")`` runs each of its two-operator
    tests on both stores (each operator then gets its own fresh PostgreSQL database)."""
    backends = getattr(metafunc.module, "BACKENDS", None)
    if backends and "pair" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[dict[str, str | None]]:
    """Each operator's database URL: None for the SQLite database of its home."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield {"a": None, "b": None}
        return
    server = os.environ.get("MSSGW_TEST_PG_URL")
    if not server:
        if os.environ.get("MSSGW_TEST_NO_PG") == "1":
            pytest.skip("PostgreSQL disabled with MSSGW_TEST_NO_PG=1")
        raise RuntimeError(
            "MSSGW_TEST_PG_URL is not set: run the suite with .ci/run (or set MSSGW_TEST_NO_PG=1)"
        )
    admin = create_engine(
        server.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    names = {op: f"mssgw_e2e_{op}_{uuid.uuid4().hex[:10]}" for op in ("a", "b")}
    base = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield {op: f"{base}/{name}" for op, name in names.items()}
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
async def pair(templates: dict[str, Template], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               b_settings: dict[str, dict[str, object]], backend: dict[str, str | None]) -> AsyncIterator[Pair]:  # fmt: skip
    monkeypatch.delenv("MSSGW_DATABASE_URL", raising=False)
    a = await _start("a", templates["a"], tmp_path, database_url=backend["a"])
    b = await _start("b", templates["b"], tmp_path, b_settings, database_url=backend["b"])
    proxy = WireProxy(b.inbound_port)
    await proxy.start()
    await a.set_relay(B_DOMAIN, proxy.port, templates["b"].operator_dn)
    await b.set_relay(A_DOMAIN, a.inbound_port, templates["a"].operator_dn)
    try:
        yield Pair(a, b, proxy)
    finally:
        await proxy.stop()
        for op in (a, b):
            await op.workers.stop()  # type: ignore[attr-defined]
            await op.gateway.stop(grace=2)  # type: ignore[attr-defined]


