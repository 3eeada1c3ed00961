"""The people the directory tests share: a practitioner with her mailbox and password, a secretariat, a peer's mailbox.

Imported by name (``tests.directory.directory_world``): a conftest imported by name would shadow
another directory's. ``populate`` is what the ``people`` fixture of ``conftest.py`` runs.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from directory import admin
from directory.identifiers import luhn_valid

PASSWORD = "a long passphrase here"
ANNE = "anne.martin@a.mssante.test"
SECRETARIAT = "secretariat@a.mssante.test"
BOB = "bob@b.mssante.test"


def valid_rpps(body: str) -> str:
    """``body`` (10 digits) completed with its Luhn check digit."""
    return next(body + k for k in "0123456789" if luhn_valid(body + k))


RPPS = valid_rpps("1000000000")


def populate(s: Session) -> None:
    admin.add_practitioner(s, identifier=RPPS, last_name="Martin", first_name="Anne", profession_code="10")
    admin.add_mailbox(s, "Anne.Martin@A.mssante.test", type="PER", rpps=RPPS, password=PASSWORD)
    admin.add_mailbox(s, SECRETARIAT, type="ORG", display_name="Secrétariat")
    admin.trust_domain(s, "b.mssante.test", relay="mx.b.test:25", operator_dn="CN=mx.b")
    admin.add_mailbox(s, BOB, type="ORG")
