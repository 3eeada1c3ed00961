"""The recipient chain (``gateway.policy.recipients``) over directory facts: what ``mssgw domains check`` prints."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from directory import admin, facts
from directory.db import transaction
from directory.facts import RecipientFacts
from gateway.core import replies as R
from gateway.policy.chain import Rule, evaluate
from gateway.policy.decision import Decision
from gateway.policy.recipients import INBOUND_CHAIN, SUBMISSION_CHAIN, decide_recipient


@pytest.fixture
def directory(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with transaction(factory) as s:
        admin.add_mailbox(s, "ann@a.mssante.test", type="ORG")
        admin.add_mailbox(s, "gone@a.mssante.test", type="ORG")
        admin.set_active(s, "gone@a.mssante.test", False)
        admin.trust_domain(s, "b.mssante.test", relay="mx.b.test:25", operator_dn="CN=mx.b.mssante.test")
        admin.add_mailbox(s, "bob@b.mssante.test", type="ORG")
        admin.trust_domain(s, "c.mssante.test", relay="mx.c.test:25")  # no operator identity, no certificate
        admin.add_mailbox(s, "carl@c.mssante.test", type="ORG")
    return factory


CASES = [
    ("ann@a.mssante.test", True, "250 2.1.5", "known-recipient"),
    ("bob@b.mssante.test", True, "250 2.1.5", "known-recipient"),
    ("x@gmail.com", False, "550 5.7.1", "consumer-domain"),
    ("x@yahoo.fr", False, "550 5.7.1", "consumer-domain"),
    ("x@nowhere.example", False, "550 5.7.1", "untrusted-domain"),
    ("nobody@b.mssante.test", False, "550 5.1.1", "unknown-mailbox"),
    ("gone@a.mssante.test", False, "550 5.1.1", "inactive-mailbox"),
    ("carl@c.mssante.test", False, "550 5.7.1", "no-protection"),
    ("not an address", False, "501 5.1.3", "address-syntax"),
]


def test_submission_decisions(directory: sessionmaker[Session]) -> None:
    with directory() as s:
        for address, accepted, short, rule in CASES:
            decision = decide_recipient(facts.recipient_facts(s, address))
            assert (decision.accepted, decision.reply.short, decision.rule) == (accepted, short, rule), address
    with directory() as s:
        gmail = decide_recipient(facts.recipient_facts(s, "x@gmail.com"))
    assert gmail.reason == "consumer mailbox: health data may not be sent to gmail.com"
    assert str(gmail.reply).endswith(gmail.reason)


def test_inbound_decisions(directory: sessionmaker[Session]) -> None:
    with directory() as s:
        assert decide_recipient(facts.recipient_facts(s, "ann@a.mssante.test"), inbound=True).accepted
        relay = decide_recipient(facts.recipient_facts(s, "bob@b.mssante.test"), inbound=True)
        gone = decide_recipient(facts.recipient_facts(s, "gone@a.mssante.test"), inbound=True)
    assert relay.rule == "not-local" and gone.rule == "inactive-mailbox"


def test_chains_are_tables_of_named_rules() -> None:
    assert [r.name for r in SUBMISSION_CHAIN][:3] == ["address-syntax", "consumer-domain", "blocked-domain"]
    assert all(r.description for r in (*SUBMISSION_CHAIN, *INBOUND_CHAIN))
    assert len({r.name for r in SUBMISSION_CHAIN}) == len(SUBMISSION_CHAIN)


def test_first_rule_that_decides_wins() -> None:
    seen: list[str] = []

    def rule(name: str, decides: bool) -> Rule[RecipientFacts]:
        def check(_f: RecipientFacts) -> Decision | None:
            seen.append(name)
            return Decision.refuse(R.S550_5_7_1_BLOCKED_DOMAIN, name, name) if decides else None
        return Rule(name, name, check)

    subject = RecipientFacts(address="x@y.z", valid_syntax=True)
    decision = evaluate([rule("a", False), rule("b", True), rule("c", True)], subject,
                        lambda f: Decision.accept(R.S250_2_1_5_RECIPIENT_OK, "default", "ok"))
    assert decision.rule == "b" and seen == ["a", "b"]
    assert evaluate([], subject, lambda f: Decision.accept(R.S250_2_1_5_RECIPIENT_OK, "default", "ok")).accepted
