"""Freed memory given back to the system, so that a burst of sessions does not stay in RSS for good.

Why: most of what a busy gateway allocates is not Python objects but C memory (OpenSSL's
per-connection state and buffers, uvloop's transports, SQLite's pages) allocated from the pool
threads (FETCH parsing, Argon2, database calls) as well as from the event loop.  glibc gives
threads that contend their own arena, up to eight per core, and returns an arena's memory to the
system only from its top.  Measured with the seeded session fuzzer (``bench/fuzz_gateway.py
--seed 3031621923 --concurrency 40``, about 2,000 SMTP and 1,300 IMAP sessions): RSS went from
115 to 400 MiB with glibc's defaults while the Python heap stayed near 70 MiB (tracemalloc); with
two arenas it reached 279 MiB, and ``malloc_trim(0)`` then gave back another 63 MiB.

Both calls are glibc's; on another C library (musl, macOS) they do nothing and say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache

__all__ = ["MALLOC_ARENAS", "TRIM_INTERVAL", "limit_malloc_arenas", "release_free_memory"]

#: Arenas for the whole process: the event loop's thread and the pool threads share them.
MALLOC_ARENAS = 2
#: Seconds between two ``malloc_trim`` calls of a running gateway (a walk of the free lists:
#: milliseconds, done in a pool thread).
TRIM_INTERVAL = 30.0
_M_ARENA_MAX = -8  # glibc's <malloc.h>


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's arenas; call before the process starts threads.  False where not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas) == 1)


def release_free_memory() -> bool:
    """Return the free pages of every arena to the system (``malloc_trim(0)``).

    True when glibc released something; False when there was nothing to give back or the C
    library is not glibc.
    """
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)
