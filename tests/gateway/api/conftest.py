"""Fixtures of the API tests: a running gateway with ``listen.api`` on a random loopback port, and
client certificates for every case (APP, ORG-less PER, revoked, unregistered, foreign CA)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "smtp"))

from api_world import ApiCerts, ApiWorld, issue_api_certs, prepare_home, started_api


@pytest.fixture(scope="session")
def api_certs(pki_template: Path, tmp_path_factory: pytest.TempPathFactory) -> ApiCerts:
    return issue_api_certs(pki_template, tmp_path_factory.mktemp("api-certs"))


@pytest.fixture
async def api(sqlite_home: Path, api_certs: ApiCerts) -> AsyncIterator[ApiWorld]:
    prepare_home(sqlite_home, api_certs)
    async with started_api(sqlite_home, api_certs) as world:
        yield world


@pytest.fixture
async def api_any_db(operator_home: Path, api_certs: ApiCerts) -> AsyncIterator[ApiWorld]:
    """The same world on SQLite and on PostgreSQL (``operator_home`` is parametrised)."""
    prepare_home(operator_home, api_certs)
    async with started_api(operator_home, api_certs) as world:
        yield world
