"""A small time-bounded memo for answers that may lag the directory by a few seconds.

Used where a burst of messages asks the database the same question: RCPT, MAIL and peer
decisions at the SMTP edge, routes, protection plans and signer names in the workers.  An
entry lives ``ttl`` seconds, so a directory change (a mailbox deactivated, a delegation
removed, a domain blocked) shows within that delay.  Values must not be ``None`` (``get``
answers ``None`` for a miss); wrap optional answers in a tuple.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

__all__ = ["TtlCache"]


class TtlCache:
    """At most ``size`` entries, each reused for ``ttl`` seconds; thread-safe enough for its callers.

    A full cache first drops what has expired, then everything: no LRU bookkeeping on the
    hot path.  Lookups and inserts are single dict operations (atomic under the GIL).
    """

    def __init__(self, ttl: float, size: int = 4096) -> None:
        self.ttl = ttl
        self.size = size
        self._items: dict[Hashable, tuple[float, Any]] = {}

    def get(self, key: Hashable) -> Any:
        hit = self._items.get(key)
        if hit is None or hit[0] <= time.monotonic():
            return None
        return hit[1]

    def put(self, key: Hashable, value: Any) -> None:
        now = time.monotonic()
        if len(self._items) >= self.size:
            self._items = {k: v for k, v in self._items.items() if v[0] > now}
            if len(self._items) >= self.size:
                self._items = {}
        self._items[key] = (now + self.ttl, value)

    def discard(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
