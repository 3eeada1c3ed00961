"""A small time-bounded memo for answers that may lag the directory by a few seconds.

Used where a burst of messages asks the database the same question: RCPT, MAIL and peer
decisions at the SMTP edge, routes, protection plans and signer names in the workers.  An
entry lives ``ttl`` seconds, so a directory change (a mailbox deactivated, a delegation
removed, a domain blocked) shows within that delay.  Values must not be ``None`` (``get``
answers ``None`` for a miss); wrap optional answers in a tuple.

The expiry and size bound are ``cachetools.TTLCache``'s (least recently used entries go first
when full); a lock makes it safe for the worker threads that consult it beside the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

from cachetools import TTLCache

__all__ = ["TtlCache"]


class TtlCache:
    """At most ``size`` entries, each reused for ``ttl`` seconds; thread-safe."""

    def __init__(self, ttl: float, size: int = 4096) -> None:
        self.ttl = ttl
        self.size = size
        self._items: TTLCache[Hashable, Any] = TTLCache(maxsize=size, ttl=ttl)
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            return self._items.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
