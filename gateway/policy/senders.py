"""May this authenticated identity send as this address? The sender rules.

An identity (a password login or a client certificate, both resolved to a
mailbox) may use as MAIL FROM and ``From:`` only its own mailbox or one
delegated to it. Nothing is relayed for anonymous clients.
"""

from __future__ import annotations

from directory.facts import SenderFacts
from gateway.core import replies as R
from gateway.policy.chain import Rule, evaluate
from gateway.policy.decision import Decision


def _syntax(f: SenderFacts) -> Decision | None:
    if f.valid_syntax:
        return None
    return Decision.refuse(R.S553_5_1_7_BAD_SENDER, "sender-syntax", f"not a valid sender address: {f.address}")


def _not_owned(f: SenderFacts) -> Decision | None:
    if f.owned or f.delegated:
        return None
    return Decision.refuse(
        R.S550_5_7_1_SENDER_NOT_OWNED,
        "sender-not-owned",
        f"{f.identity} may not send as {f.address}: not its mailbox nor delegated to it",
    )


def _inactive(f: SenderFacts) -> Decision | None:
    if f.address_active:
        return None
    return Decision.refuse(
        R.S550_5_7_1_SENDER_NOT_OWNED, "sender-inactive", f"{f.address} is deactivated in the health directory"
    )


def _accept(f: SenderFacts) -> Decision:
    how = "its own mailbox" if f.owned else "a mailbox delegated to it"
    return Decision.accept(R.S250_2_1_0_SENDER_OK, "sender-owned", f"{f.identity} sends as {how}")


SENDER_CHAIN: tuple[Rule[SenderFacts], ...] = (
    Rule("sender-syntax", "the address is well formed", _syntax),
    Rule("sender-not-owned", "own mailbox or delegated", _not_owned),
    Rule("sender-inactive", "the sending mailbox is active", _inactive),
)


def decide_sender(facts: SenderFacts) -> Decision:
    return evaluate(SENDER_CHAIN, facts, _accept)


def auth_required() -> Decision:
    return Decision.refuse(R.S530_5_7_0_AUTH_REQUIRED, "auth-required", "authentication required to submit mail")
