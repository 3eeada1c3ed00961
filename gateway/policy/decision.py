"""The ``Decision`` value every policy check returns.

Policy never raises to say no: it returns a Decision that names the rule, the
reply and a reason a person understands. The SMTP layer sends ``decision.reply``;
the audit trail records the same value; ``mssgw domains check`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.core.replies import Reply


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reply: Reply
    rule: str  # the name of the rule that decided
    reason: str  # a sentence for a person
    facts: tuple[tuple[str, str], ...] = ()  # extra context for the audit trail (no content)

    @classmethod
    def accept(cls, reply: Reply, rule: str, reason: str, **facts: str) -> Decision:
        return cls(True, reply, rule, reason, tuple(sorted(facts.items())))

    @classmethod
    def refuse(cls, reply: Reply, rule: str, reason: str, **facts: str) -> Decision:
        return cls(False, reply.with_text(reason), rule, reason, tuple(sorted(facts.items())))

    @property
    def temporary(self) -> bool:
        return self.reply.temporary

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": "accept" if self.accepted else "refuse",
            "reply": str(self.reply),
            "code": self.reply.code,
            "enhanced_code": self.reply.enhanced,
            "rule": self.rule,
            "reason": self.reason,
            **dict(self.facts),
        }
