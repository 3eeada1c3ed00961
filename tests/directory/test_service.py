"""The directory service: practitioners, mailboxes, passwords, delegations, facts for policy (both databases)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from directory import admin, facts, passwords
from directory.db import transaction
from directory.identifiers import InvalidIdentifier, check_rpps, luhn_valid, normalise_address
from gateway.core.errors import DirectoryError

PASSWORD = "a long passphrase here"


def valid_rpps(body: str) -> str:
    return next(body + k for k in "0123456789" if luhn_valid(body + k))


RPPS = valid_rpps("1000000000")


@pytest.fixture
def people(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with transaction(factory) as s:
        admin.add_practitioner(s, identifier=RPPS, last_name="Martin", first_name="Anne", profession_code="10")
        admin.add_mailbox(s, "Anne.Martin@A.mssante.test", type="PER", rpps=RPPS, password=PASSWORD)
        admin.add_mailbox(s, "secretariat@a.mssante.test", type="ORG", display_name="Secrétariat")
        admin.trust_domain(s, "b.mssante.test", relay="mx.b.test:25", operator_dn="CN=mx.b")
        admin.add_mailbox(s, "bob@b.mssante.test", type="ORG")
    return factory


def test_identifiers() -> None:
    assert check_rpps("8" + RPPS) == RPPS
    with pytest.raises(InvalidIdentifier, match="Luhn"):
        check_rpps(RPPS[:-1] + str((int(RPPS[-1]) + 1) % 10))
    with pytest.raises(InvalidIdentifier, match="11 digits"):
        check_rpps("123")
    assert normalise_address(" <Anne@Example.ORG> ") == "anne@example.org"


def test_practitioner_upsert(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        first = admin.add_practitioner(s, identifier=RPPS, last_name="Martin", first_name="Anne")
        again = admin.add_practitioner(s, identifier="8" + RPPS, last_name="Martin-Durand", first_name="Anne")
        assert first.id == again.id and again.last_name == "Martin-Durand" and again.national_id == "8" + RPPS
    with factory() as s, pytest.raises(DirectoryError, match="last name"):
        admin.add_practitioner(s, identifier=RPPS, last_name=" ", first_name="x")


def test_mailboxes(people: sessionmaker[Session]) -> None:
    with people() as s:
        box = admin.get_mailbox(s, "anne.martin@a.mssante.test")
        assert box.local and box.display_name == "Anne Martin" and box.password_hash.startswith("$argon2id$")
        assert not admin.get_mailbox(s, "bob@b.mssante.test").local
        with pytest.raises(DirectoryError, match="give --rpps"):
            admin.add_mailbox(s, "x@a.mssante.test", type="PER")
        with pytest.raises(DirectoryError, match="neither one of our domains"):
            admin.add_mailbox(s, "x@gmail.com", type="ORG")
        with pytest.raises(DirectoryError, match="only local mailboxes have a password"):
            admin.set_password(s, "bob@b.mssante.test", PASSWORD)
        with pytest.raises(DirectoryError, match="no mailbox"):
            admin.get_mailbox(s, "nobody@a.mssante.test")


def test_passwords(people: sessionmaker[Session]) -> None:
    with transaction(people) as s:
        assert passwords.verify_password(s, "ANNE.MARTIN@a.mssante.test", PASSWORD) is not None
        assert passwords.verify_password(s, "anne.martin@a.mssante.test", PASSWORD + "x") is None
        assert passwords.verify_password(s, "nobody@a.mssante.test", PASSWORD) is None
        assert passwords.verify_password(s, "not an address", PASSWORD) is None
        assert passwords.verify_password(s, "secretariat@a.mssante.test", PASSWORD) is None  # no password set
        with pytest.raises(DirectoryError, match="12 characters"):
            admin.set_password(s, "secretariat@a.mssante.test", "short")
        admin.set_active(s, "anne.martin@a.mssante.test", False)
        assert passwords.verify_password(s, "anne.martin@a.mssante.test", PASSWORD) is None


def test_password_hashes_use_light_argon2id_and_old_ones_are_upgraded(people: sessionmaker[Session]) -> None:
    from argon2 import PasswordHasher, extract_parameters

    with transaction(people) as s:
        box = admin.get_mailbox(s, "anne.martin@a.mssante.test")
        params = extract_parameters(box.password_hash)
        assert (params.type.name, params.time_cost, params.memory_cost, params.parallelism) == ("ID", 2, 19456, 1)
        box.password_hash = PasswordHasher().hash(PASSWORD)  # an older, heavier hash (64 MiB, 3 passes)
    with transaction(people) as s:
        assert passwords.verify_password(s, "anne.martin@a.mssante.test", PASSWORD) is not None
    with transaction(people) as s:
        params = extract_parameters(admin.get_mailbox(s, "anne.martin@a.mssante.test").password_hash)
        assert (params.time_cost, params.memory_cost) == (2, 19456)  # rehashed at that login
        assert passwords.verify_password(s, "anne.martin@a.mssante.test", PASSWORD) is not None


def test_delegation_and_sender_facts(people: sessionmaker[Session]) -> None:
    with transaction(people) as s:
        admin.delegate(s, "secretariat@a.mssante.test", "anne.martin@a.mssante.test")
        found = facts.sender_facts(s, "anne.martin@a.mssante.test", "secretariat@a.mssante.test")
        assert found.delegated and found.address_active and not found.owned
        assert facts.sender_facts(s, "anne.martin@a.mssante.test", "anne.martin@a.mssante.test").owned
        assert not facts.sender_facts(s, "bob@b.mssante.test", "secretariat@a.mssante.test").delegated
        with pytest.raises(DirectoryError, match="itself"):
            admin.delegate(s, "secretariat@a.mssante.test", "secretariat@a.mssante.test")
        with pytest.raises(DirectoryError, match="between mailboxes of this operator"):
            admin.delegate(s, "secretariat@a.mssante.test", "bob@b.mssante.test")
        admin.delegate(s, "secretariat@a.mssante.test", "anne.martin@a.mssante.test", revoke=True)
        with pytest.raises(DirectoryError, match="has no delegation"):
            admin.delegate(s, "secretariat@a.mssante.test", "anne.martin@a.mssante.test", revoke=True)


def test_domains(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        with pytest.raises(DirectoryError, match="our own"):
            admin.trust_domain(s, "a.mssante.test")
        with pytest.raises(DirectoryError, match="HOST:PORT"):
            admin.trust_domain(s, "c.mssante.test", relay="nope")
        admin.block_domain(s, "evil.*", reason="phishing")
        kinds = {row["domain"]: row["kind"] for row in admin.list_domains(s)}
        assert kinds["evil.*"] == "blocked" and kinds["a.mssante.test"] == "local" and kinds["gmail.com"] == "blocked"
        assert admin.seed_consumer_domains(s) == 0  # idempotent
        with pytest.raises(DirectoryError, match="no domain"):
            admin.remove_domain(s, "never.example")


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
