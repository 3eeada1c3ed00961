"""The sender chain (``gateway.policy.senders``) over facts the directory gives: who may send as whom.

The facts come from a real directory on each database (``sender_facts``), so a rule and the
query feeding it are tested together: own mailbox, a delegated one, someone else's, a
deactivated one, a malformed address, and the refusal for anonymous clients.
"""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from directory import admin, facts
from directory.db import transaction
from directory.facts import SenderFacts
from gateway.policy.senders import SENDER_CHAIN, auth_required, decide_sender

SECRETARIAT = "secretariat@a.mssante.test"
DOCTOR = "dr.martin@a.mssante.test"
OTHER = "dr.other@a.mssante.test"
CLOSED = "closed@a.mssante.test"


@pytest.fixture
def directory(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with transaction(factory) as s:
        for address in (SECRETARIAT, DOCTOR, OTHER, CLOSED):
            admin.add_mailbox(s, address, type="ORG")
        admin.delegate(s, SECRETARIAT, DOCTOR)  # the doctor may send as the secretariat
        admin.delegate(s, CLOSED, DOCTOR)
        admin.set_active(s, CLOSED, False)
    return factory


CASES = [
    # identity, MAIL FROM, accepted, reply, rule
    (DOCTOR, DOCTOR, True, "250 2.1.0", "sender-owned"),
    (DOCTOR, "Dr.Martin@A.mssante.test", True, "250 2.1.0", "sender-owned"),  # case does not matter
    (DOCTOR, SECRETARIAT, True, "250 2.1.0", "sender-owned"),
    (SECRETARIAT, DOCTOR, False, "550 5.7.1", "sender-not-owned"),  # delegation is one way
    (DOCTOR, OTHER, False, "550 5.7.1", "sender-not-owned"),
    (DOCTOR, CLOSED, False, "550 5.7.1", "sender-inactive"),
    (DOCTOR, "nobody@a.mssante.test", False, "550 5.7.1", "sender-not-owned"),
    (DOCTOR, "not an address", False, "553 5.1.7", "sender-syntax"),
]


def test_sender_decisions(directory: sessionmaker[Session]) -> None:
    with directory() as s:
        for identity, address, accepted, short, rule in CASES:
            decision = decide_sender(facts.sender_facts(s, identity, address))
            assert (decision.accepted, decision.reply.short, decision.rule) == (accepted, short, rule), address


def test_reasons_name_the_rule_not_the_content(directory: sessionmaker[Session]) -> None:
    with directory() as s:
        own = decide_sender(facts.sender_facts(s, DOCTOR, DOCTOR))
        delegated = decide_sender(facts.sender_facts(s, DOCTOR, SECRETARIAT))
        refused = decide_sender(facts.sender_facts(s, DOCTOR, OTHER))
    assert own.reason.endswith("its own mailbox") and delegated.reason.endswith("a mailbox delegated to it")
    assert refused.reason == f"{DOCTOR} may not send as {OTHER}: not its mailbox nor delegated to it"
    assert str(refused.reply) == f"550 5.7.1 {refused.reason}"  # the reply carries the reason
    assert refused.as_dict()["rule"] == "sender-not-owned" and refused.as_dict()["decision"] == "refuse"


def test_deactivating_the_owner_stops_its_delegates_too(directory: sessionmaker[Session]) -> None:
    with transaction(directory) as s:
        admin.set_active(s, SECRETARIAT, False)
    with directory() as s:
        assert decide_sender(facts.sender_facts(s, DOCTOR, SECRETARIAT)).rule == "sender-inactive"
        assert decide_sender(facts.sender_facts(s, SECRETARIAT, SECRETARIAT)).rule == "sender-inactive"


def test_chain_order_decides_which_reason_is_given() -> None:
    """Syntax first, then ownership, then activity: a stranger learns nothing about a mailbox's state."""
    assert [r.name for r in SENDER_CHAIN] == ["sender-syntax", "sender-not-owned", "sender-inactive"]
    stranger = SenderFacts(identity=OTHER, address=CLOSED, valid_syntax=True, address_active=False)
    assert decide_sender(stranger).rule == "sender-not-owned"


def test_anonymous_clients_are_told_to_authenticate() -> None:
    decision = auth_required()
    assert not decision.accepted and not decision.temporary
    assert (decision.reply.short, decision.rule) == ("530 5.7.0", "auth-required")
