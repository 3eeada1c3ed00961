"""The allocator gives freed memory back (``gateway.core.memory``), measured in a fresh process's RSS."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from gateway.core.memory import limit_malloc_arenas, release_free_memory

GLIBC = platform.libc_ver()[0] == "glibc"

#: A process that fills threads' arenas with 1 KiB..8 KiB blocks (above pymalloc, below mmap),
#: frees all but one in 64 (so no arena can shrink from its top), then trims; with glibc's
#: arenas and with ours.
_FRAGMENT_THEN_TRIM = textwrap.dedent("""
    import sys, threading
    from gateway.core.memory import limit_malloc_arenas, release_free_memory

    def rss_kib():
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0])

    arenas_limited = limit_malloc_arenas() if sys.argv[1] == "limit" else False
    kept = []
    def churn():
        blocks = [bytes(1024 * (1 + i % 8)) for i in range(5_000)]
        kept.extend(blocks[::64])
        del blocks
    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    before = rss_kib()
    released = release_free_memory()
    print(arenas_limited, released, before, rss_kib())
""")


def run_fragmenter(mode: str) -> tuple[bool, bool, int, int]:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT_THEN_TRIM, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", out[1] == "True", int(out[2]), int(out[3])


@pytest.mark.skipif(not GLIBC, reason="malloc_trim and M_ARENA_MAX are glibc's")
@pytest.mark.parametrize("arenas", ["default", "limit"])
def test_trim_gives_fragmented_free_memory_back_to_the_system(arenas: str) -> None:
    limited, released, before, after = run_fragmenter(arenas)
    assert limited is (arenas == "limit")
    assert released
    assert before - after > 40 * 1024, f"RSS {before} KiB before the trim, {after} KiB after"


def test_both_calls_answer_false_rather_than_fail_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.core import memory

    memory._glibc.cache_clear()
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("", ""))
    try:
        assert limit_malloc_arenas() is False
        assert release_free_memory() is False
    finally:
        memory._glibc.cache_clear()
