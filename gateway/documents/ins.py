"""The INS (Identifiant National de Santé): check a NIR and its key, name the OID's assigning authority.

Sources:
- Référentiel Identifiant National de Santé (ANS), "liste des OID des autorités d'affectation
  des INS": the INS-NIR of a real person is assigned under ``1.2.250.1.213.1.4.8``, the
  INS-NIA (temporary number) under ``1.2.250.1.213.1.4.9``, the INS-NIR of fictitious test
  patients under ``1.2.250.1.213.1.4.10`` and of demonstration patients under
  ``1.2.250.1.213.1.4.11`` (the same values appear in the FR Core FHIR profile of Interop'Santé,
  identifier slices INS-NIR, INS-NIA, INS-NIR-TEST and INS-NIR-DEMO).
- The NIR (INSEE registration number): 13 characters (sex, year, month, department, commune,
  order), then a two-digit key equal to ``97 - (N mod 97)`` where N is the 13 characters read
  as a number; for Corsica the department ``2A`` counts as ``19`` and ``2B`` as ``18``.

Only the format and the key are checked here: whether the number belongs to the patient is the
identity server's business (INSi), never the gateway's. No function here logs anything; callers
that need to trace an INS use ``salted_hash``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from gateway.core.errors import ContentError
from gateway.policy.patients import nir_key as _policy_nir_key

#: OID of each assigning authority of an INS, and its kind.
OID_REAL = "1.2.250.1.213.1.4.8"
OID_NIA = "1.2.250.1.213.1.4.9"
OID_TEST = "1.2.250.1.213.1.4.10"
OID_DEMO = "1.2.250.1.213.1.4.11"
KINDS: dict[str, str] = {OID_REAL: "real", OID_NIA: "nia", OID_TEST: "test", OID_DEMO: "demo"}
#: The names a person may give for an OID on the command line.
OID_BY_NAME: dict[str, str] = {kind: oid for oid, kind in KINDS.items()}

_NIR = re.compile(r"^([12345678])(\d{2})(\d{2})(\d{2}|2[AB])(\d{3})(\d{3})(\d{2})$")


class InsError(ContentError, ValueError):
    """The INS is malformed; the message says what is wrong and never repeats the number."""


@dataclass(frozen=True)
class Ins:
    """A well-formed INS: the 15-character NIR (with its key) and the OID of its authority."""

    nir: str
    oid: str

    @property
    def kind(self) -> str:
        """``real``, ``nia``, ``test`` or ``demo``."""
        return KINDS[self.oid]

    def __repr__(self) -> str:  # never print the number by accident
        return f"Ins(kind={self.kind!r})"

    __str__ = __repr__


def nir_key(first13: str) -> int:
    """The key of a NIR's first 13 characters: 97 - (N mod 97), Corsica's 2A/2B as 19/18
    (the formula lives in ``gateway.policy.patients``, which routes patients' mailboxes by it)."""
    try:
        return _policy_nir_key(first13)
    except ValueError:
        raise InsError("a NIR has 13 characters before its key (digits; 2A or 2B for Corsica)") from None


def check_nir(value: str) -> str:
    """The NIR in canonical form (upper case, no spaces), or ``InsError`` saying why it is not one."""
    text = re.sub(r"[ .]", "", value or "").upper()
    if len(text) != 15:
        raise InsError(f"an INS has 15 characters (13 and a 2-digit key), not {len(text)}")
    match = _NIR.match(text)
    if match is None:
        raise InsError("an INS is a sex digit, year, month, department (2A/2B in Corsica), commune, order and key")
    if int(match.group(7)) != nir_key(text[:13]):
        raise InsError("the INS key does not match its first 13 characters (97 - N mod 97)")
    return text


def check_oid(oid: str) -> str:
    """The OID of an INS authority (a name such as ``test`` is accepted too), or ``InsError``."""
    value = OID_BY_NAME.get((oid or "").strip().lower(), (oid or "").strip())
    if value.startswith("urn:oid:"):
        value = value[len("urn:oid:"):]
    if value not in KINDS:
        raise InsError("the OID is not that of an INS authority (1.2.250.1.213.1.4.8, .9, .10 or .11)")
    return value


def parse_ins(nir: str, oid: str) -> Ins:
    """A checked INS, or ``InsError``."""
    return Ins(check_nir(nir), check_oid(oid))


def parse_cx(value: str) -> Ins:
    """An INS written as an HL7 v2 CX in XDS metadata: ``NIR^^^&OID&ISO`` (ITI TF-3 4.2.3.1.7)."""
    number, sep, rest = (value or "").strip().partition("^^^")
    parts = rest.split("&")
    if not sep or len(parts) < 3 or parts[2].split("^")[0] != "ISO":
        raise InsError("a patient identifier in XDS metadata is NIR^^^&OID&ISO")
    return parse_ins(number, parts[1])


def to_cx(ins: Ins) -> str:
    return f"{ins.nir}^^^&{ins.oid}&ISO"


def salted_hash(ins: Ins | str, salt: bytes) -> str:
    """A short keyed hash of an INS (HMAC-SHA-256, 16 hex digits): traces a patient across records
    without holding the number. The salt is per operator; without it the hash reveals nothing."""
    number = ins.nir if isinstance(ins, Ins) else ins
    return hmac.new(salt, number.encode("ascii", "replace"), hashlib.sha256).hexdigest()[:16]
