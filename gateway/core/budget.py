"""A count of octets held at once, shared by whoever buffers message content on one event loop.

The SMTP DATA readers and the API's request bodies each take what they buffer before reading it
and give it back when done; one that would go over the total is refused at once (452 4.3.1, or
503 with Retry-After) instead of growing the process.  Single event loop: no lock needed.
"""

from __future__ import annotations

__all__ = ["OctetBudget"]


class OctetBudget:
    """At most ``total`` octets held at once; ``take`` says whether more may be."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0

    def take(self, octets: int) -> bool:
        if self.held + octets > self.total:
            return False
        self.held += octets
        return True

    def give_back(self, octets: int) -> None:
        self.held = max(0, self.held - octets)
