"""Mailbox passwords (``directory.passwords``): Argon2id, one answer for every kind of failure, rehash on login."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from directory import admin, passwords
from directory.db import transaction
from gateway.core.errors import DirectoryError
from tests.directory.directory_world import PASSWORD


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


def test_hash_refuses_short_passwords_and_salts_each_hash() -> None:
    with pytest.raises(DirectoryError, match="12 characters"):
        passwords.hash_password("elevenchars")
    first, second = passwords.hash_password(PASSWORD), passwords.hash_password(PASSWORD)
    assert first != second and first.startswith("$argon2id$") and PASSWORD not in first
