"""A bound on the APPEND message bytes all IMAP sessions together hold in memory.

pymap buffers each APPEND literal whole before it parses and stores the message, so
APPENDLIMIT bounds one message but not how many arrive at once: eight parallel 45 MB
APPENDs added 396 MB to the process (round 2, finding 204). Every APPEND literal is
counted here against ``APPEND_MEMORY_MAX`` before a byte of it is read, and released
once its command has been answered (the connection's next command, or its end).

Decisions:

* A **synchronizing** literal (``{N}``) that does not fit is refused before the ``+``
  continuation: ``NO [LIMIT]`` (RFC 5530), the client has sent nothing of it and may
  retry; the session goes on.
* A **non-synchronizing** literal (``{N+}``) is already on its way, but still sits in
  the socket, not in memory: the session waits for room up to ``APPEND_MEMORY_WAIT``
  seconds (on the event loop, holding no thread), since LITERAL+ clients expect no
  refusal. If no room comes in time, or the literal alone exceeds the whole budget,
  the command gets ``BAD [LIMIT]`` and ``* BYE`` (RFC 7888 4: its bytes cannot be told
  apart from commands otherwise).
"""

from __future__ import annotations

import asyncio

__all__ = ["APPEND_MEMORY_MAX", "APPEND_MEMORY_WAIT", "AppendMemory"]

#: APPEND literal bytes held at once by the whole service (read at each check, for tests).
APPEND_MEMORY_MAX = 128 * 1024 * 1024
#: Seconds a non-synchronizing APPEND literal may wait for room before BAD + BYE.
APPEND_MEMORY_WAIT = 30.0


class AppendMemory:
    """The service's APPEND literal bytes in memory; one per event loop (``start_imap``)."""

    def __init__(self) -> None:
        self.used = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def try_take(self, size: int) -> bool:
        """Count ``size`` bytes if they fit now."""
        if self.used + size > APPEND_MEMORY_MAX:
            return False
        self.used += size
        return True

    async def take(self, size: int) -> bool:
        """Count ``size`` bytes once they fit, waiting up to ``APPEND_MEMORY_WAIT``; ``False`` if not."""
        if size > APPEND_MEMORY_MAX:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + APPEND_MEMORY_WAIT
        while not self.try_take(size):
            left = deadline - loop.time()
            if left <= 0:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), left)
            except TimeoutError:
                return False
            finally:
                self._waiters.discard(waiter)
        return True

    def give(self, size: int) -> None:
        """Return bytes counted by ``try_take``/``take`` and wake whoever waits for room."""
        self.used = max(self.used - size, 0)
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
