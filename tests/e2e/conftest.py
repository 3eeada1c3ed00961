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
from collections.abc import AsyncIterator
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


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    os.environ.pop("MSSGW_DATABASE_URL", None)
    return build_templates(tmp_path_factory.mktemp("operators"))


@pytest.fixture
def b_settings() -> dict[str, dict[str, object]]:
    """Settings B starts with beyond the defaults (a test overrides this fixture to change them)."""
    return {}


@pytest.fixture
async def pair(templates: dict[str, Template], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               b_settings: dict[str, dict[str, object]]) -> AsyncIterator[Pair]:  # fmt: skip
    monkeypatch.delenv("MSSGW_DATABASE_URL", raising=False)
    a = await _start("a", templates["a"], tmp_path)
    b = await _start("b", templates["b"], tmp_path, b_settings)
    proxy = WireProxy(b.inbound_port)
    await proxy.start()
    a.set_relay(B_DOMAIN, proxy.port, templates["b"].operator_dn)
    b.set_relay(A_DOMAIN, a.inbound_port, templates["a"].operator_dn)
    try:
        yield Pair(a, b, proxy)
    finally:
        await proxy.stop()
        for op in (a, b):
            await op.workers.stop()  # type: ignore[attr-defined]
            await op.gateway.stop(grace=2)  # type: ignore[attr-defined]


