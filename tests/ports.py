"""Loopback ports for the test servers, chosen below the kernel's ephemeral range.

Why: a port found free by binding to port 0 comes from the ephemeral range, the very range the
kernel hands to every outgoing connection; between that check and the server's own bind, one of
the suite's client connections could take it (``address already in use`` on a loaded CI
machine).  Ports here are drawn at random below that range, checked bindable, and never handed
out twice by one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

_LOWEST = 10_000
_given: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A loopback TCP port nobody listens on, outside the range outgoing connections draw from."""
    top = _ephemeral_floor()
    if top - _LOWEST < 1_000:  # an unusual range: fall back on the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(_LOWEST, top)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
