"""The client matrix's fixture: a running gateway (see ``client_world``) per test."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from client_world import World, populate

from gateway.app import Gateway
from gateway.config import load_settings, render_toml
from tests.ports import free_port


@pytest.fixture
async def world(sqlite_home: Path, tmp_path: Path) -> AsyncIterator[World]:
    raw = tomllib.loads((sqlite_home / "mssgw.toml").read_text())
    raw["listen"].update({name: f"127.0.0.1:{free_port()}" for name in ("submission", "submissions", "imap", "imaps")})
    raw["listen"].update({"inbound": "", "api": "", "metrics": ""})
    raw["auth"].update({"base_delay": 0.01, "max_delay": 0.02})
    # A first attempt deferred for a passing local reason is retried within seconds, not after the
    # default minute: these tests are about what clients send and see, and ``delivered`` says why
    # a message did not arrive.
    raw.setdefault("queue", {}).update({"retry_base_seconds": 2.0})
    (sqlite_home / "mssgw.toml").write_text(render_toml(raw))
    settings = load_settings(sqlite_home)
    populate(settings)
    gateway = Gateway(settings, workers=True, imap=True)
    await gateway.start()
    try:
        yield World(sqlite_home, settings, gateway, tmp_path)
    finally:
        await gateway.stop()
