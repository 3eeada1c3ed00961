"""A chain of named rules read top to bottom; the first rule that decides wins.

A rule is a small named check over a facts value that returns a ``Decision`` or
``None`` (no opinion). The same chains serve the SMTP edge and ``mssgw domains
check``, so what the CLI explains is what the gateway does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.policy.decision import Decision

F = TypeVar("F")


@dataclass(frozen=True)
class Rule(Generic[F]):
    name: str
    description: str
    check: Callable[[F], Decision | None]


def evaluate(chain: Sequence[Rule[F]], facts: F, default: Callable[[F], Decision]) -> Decision:
    for rule in chain:
        decision = rule.check(facts)
        if decision is not None:
            return decision
    return default(facts)
