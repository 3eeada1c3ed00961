"""Identifiers (``directory.identifiers``): RPPS with its Luhn key, the 8 + RPPS national form, addresses."""

from __future__ import annotations

import pytest

from directory.identifiers import InvalidIdentifier, check_rpps, normalise_address
from tests.directory.directory_world import RPPS


def test_identifiers() -> None:
    assert check_rpps("8" + RPPS) == RPPS
    with pytest.raises(InvalidIdentifier, match="Luhn"):
        check_rpps(RPPS[:-1] + str((int(RPPS[-1]) + 1) % 10))
    with pytest.raises(InvalidIdentifier, match="11 digits"):
        check_rpps("123")
    assert normalise_address(" <Anne@Example.ORG> ") == "anne@example.org"
