"""The admins' operations (``directory.admin``): practitioners, mailboxes, delegations, domains (both databases)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from directory import admin
from directory.db import transaction
from gateway.core.errors import DirectoryError
from tests.directory.directory_world import ANNE, BOB, PASSWORD, RPPS, SECRETARIAT


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


def test_delegation(people: sessionmaker[Session]) -> None:
    with transaction(people) as s:
        admin.delegate(s, SECRETARIAT, ANNE)
        assert admin.delegated_to(s, admin.get_mailbox(s, ANNE)) == [SECRETARIAT]
        assert admin.delegates_of(s, admin.get_mailbox(s, SECRETARIAT)) == [ANNE]
        with pytest.raises(DirectoryError, match="itself"):
            admin.delegate(s, SECRETARIAT, SECRETARIAT)
        with pytest.raises(DirectoryError, match="between mailboxes of this operator"):
            admin.delegate(s, SECRETARIAT, BOB)
        admin.delegate(s, SECRETARIAT, ANNE, revoke=True)
        assert admin.delegates_of(s, admin.get_mailbox(s, SECRETARIAT)) == []
        with pytest.raises(DirectoryError, match="has no delegation"):
            admin.delegate(s, SECRETARIAT, ANNE, revoke=True)
