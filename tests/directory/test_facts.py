"""What the gateway reads from the directory (``directory.facts``): recipient and sender facts, signer labels,
Sent copies, and the trust-list counters that tell the running gateway to reload (both databases)."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from directory import admin, facts
from directory.db import transaction
from tests.directory.directory_world import ANNE, BOB, RPPS, SECRETARIAT


def test_recipient_facts(people: sessionmaker[Session]) -> None:
    with people() as s:
        local = facts.recipient_facts(s, "anne.martin@a.mssante.test")
        assert (local.domain_kind, local.mailbox_known, local.mailbox_local) == ("local", True, True)
        remote = facts.recipient_facts(s, "bob@b.mssante.test")
        assert remote.domain_kind == "trusted" and remote.operator_dn == "CN=mx.b" and not remote.mailbox_local
        gmail = facts.recipient_facts(s, "x@gmail.com")
        assert gmail.domain_kind == "blocked" and gmail.consumer_pattern == "gmail.com"
        yahoo = facts.recipient_facts(s, "x@yahoo.fr")
        assert yahoo.domain_kind == "blocked" and yahoo.consumer_pattern == "yahoo.*"
        unknown = facts.recipient_facts(s, "x@nowhere.example")
        assert unknown.domain_kind is None and not unknown.mailbox_known
        assert not facts.recipient_facts(s, "not an address").valid_syntax


def test_sender_facts(people: sessionmaker[Session]) -> None:
    with transaction(people) as s:
        assert facts.sender_facts(s, ANNE, ANNE).owned
        assert not facts.sender_facts(s, ANNE, SECRETARIAT).delegated
        admin.delegate(s, SECRETARIAT, ANNE)
        found = facts.sender_facts(s, "Anne.Martin@a.mssante.test", SECRETARIAT)
        assert found.delegated and found.address_active and not found.owned and found.identity == ANNE
        assert not facts.sender_facts(s, BOB, SECRETARIAT).delegated
        assert not facts.sender_facts(s, ANNE, "no address").valid_syntax


def test_signer_label(people: sessionmaker[Session]) -> None:
    with people() as s:
        assert facts.signer_label(s, ANNE) == f"Dr Anne Martin (RPPS {RPPS})"
        assert facts.signer_label(s, SECRETARIAT) == f"Secrétariat <{SECRETARIAT}>"
        assert facts.signer_label(s, BOB) is None  # no name known
        assert facts.signer_label(s, "nobody@a.mssante.test") is None
        assert facts.signer_label(s, "not an address") is None


def test_wants_sent_copy(people: sessionmaker[Session]) -> None:
    """Mail clients keep their own Sent copy: by default only software (APP) and the HTTP API get one."""
    with transaction(people) as s:
        admin.add_mailbox(s, "software@a.mssante.test", type="APP")

        def ask(address: str, origin: str = "submission") -> bool:
            return facts.wants_sent_copy(s, address, default_types=("app",), origin=origin)

        assert not ask(ANNE) and ask(ANNE, "api") and ask("software@a.mssante.test")
        assert not ask(BOB, "api") and not ask("not an address")  # not one of our mailboxes
        admin.set_sent_copy(s, ANNE, True)
        assert ask(ANNE)
        admin.set_sent_copy(s, "software@a.mssante.test", False)
        assert not ask("software@a.mssante.test", "api")  # the mailbox's own choice wins


def test_trust_counter_and_signature_move_with_the_trust_list(people: sessionmaker[Session]) -> None:
    with people() as s:
        counter, digest = facts.trust_counter(s), facts.trust_signature(s)
        assert facts.trust_counter(s) == counter and facts.trust_signature(s) == digest  # reads only
    with transaction(people) as s:
        admin.trust_domain(s, "b.mssante.test", relay="mx2.b.test:25")
    with people() as s:
        moved = facts.trust_signature(s)
        assert facts.trust_counter(s) != counter
    assert {k for k in digest if digest[k] != moved.get(k)} == {"b.mssante.test"}  # only that peer changed
    with transaction(people) as s:
        admin.trust_domain(s, "c.mssante.test", relay="mx.c.test:25")
    with people() as s:
        assert "c.mssante.test" in facts.trust_signature(s) and facts.ANCHORS_KEY not in facts.trust_signature(s)
