"""The verified-credential cache of ``Authenticator``: fast repeat logins that never outlive a change."""

from __future__ import annotations

import pytest
from smtp_world import DOMAIN, PASSWORD, World

from directory import admin
from directory.db import transaction
from gateway.auth import CredentialCache

pytestmark = pytest.mark.asyncio

NEW_PASSWORD = "another long passphrase"


async def login(world: World, user: str, password: str) -> tuple[bool, str]:
    auth = world.gateway.authenticator
    assert auth is not None
    outcome = await auth.check_password(user, password, client="192.0.2.9", protocol="smtp")
    return outcome.ok, outcome.reason


def cached(world: World, user: str, password: str) -> bool:
    auth = world.gateway.authenticator
    assert auth is not None
    return auth.credentials.get(auth.credentials.key(user, password)) is not None


async def test_cached_login_then_wrong_password_still_fails(world: World) -> None:
    user = f"sec@{DOMAIN}"
    assert await login(world, user, PASSWORD) == (True, "ok")
    assert cached(world, user, PASSWORD) and cached(world, user.upper(), PASSWORD)
    assert await login(world, user, PASSWORD) == (True, "ok")  # from the cache
    assert await login(world, user, PASSWORD + "x") == (False, "bad-credentials")
    assert not cached(world, user, PASSWORD + "x")  # failures are never cached


async def test_deactivation_and_password_change_apply_at_once(world: World) -> None:
    user = f"sec@{DOMAIN}"
    assert world.gateway.sessions is not None
    assert await login(world, user, PASSWORD) == (True, "ok")
    with transaction(world.gateway.sessions) as db:
        admin.set_password(db, user, NEW_PASSWORD)
    assert await login(world, user, PASSWORD) == (False, "bad-credentials")  # the cached entry no longer counts
    assert not cached(world, user, PASSWORD)
    assert await login(world, user, NEW_PASSWORD) == (True, "ok")
    with transaction(world.gateway.sessions) as db:
        admin.set_active(db, user, False)
    assert await login(world, user, NEW_PASSWORD) == (False, "bad-credentials")
    with transaction(world.gateway.sessions) as db:
        admin.set_active(db, user, True)
    assert await login(world, user, NEW_PASSWORD) == (True, "ok")


async def test_cache_expiry_bound_and_keys() -> None:
    now = [0.0]
    cache = CredentialCache(ttl=10, size=2, clock=lambda: now[0])
    k1, k2, k3 = (cache.key(f"u{i}@a.test", "pw") for i in range(3))
    assert k1 != cache.key("u0@a.test", "pw2") and len(k1) == 32  # an HMAC, neither address nor password
    assert cache.key("u0@a.test", "pw") != CredentialCache().key("u0@a.test", "pw")  # per-process secret
    cache.put(k1, "u0@a.test", "h1")
    cache.put(k2, "u1@a.test", "h2")
    cache.put(k3, "u2@a.test", "h3")  # full: the oldest goes
    assert cache.get(k1) is None and cache.get(k3) is not None
    now[0] = 11.0
    assert cache.get(k2) is None and cache.get(k3) is None
