"""May this message go to a patient's mailbox? The rules of the national patient messaging, as decisions.

Mon Espace Santé gives each patient the address ``<INS>@patient.mssante.fr`` (Référentiel
socle MSSanté #2, 3.4.2.3; the MSSanté operators route it to the operator of that domain).
Only health professionals and organisations write there first: the sender must be a
practitioner's (PER) or an organisation's (ORG) mailbox, and the message must carry the
patient's INS in an IHE XDM package (the same INS as the address, with a real, test or demo
authority: a temporary NIA is not an INS a mailbox is opened for).

Rules (each returns a ``Decision``; reasons never repeat the address or the INS):

- ``patient-address``: the local part is a NIR with a valid key (97 - N mod 97; Corsica's
  2A/2B count as 19/18, INS referential) - at RCPT, in the recipient chain;
- ``patient-sender``: PER or ORG only - at RCPT, at the submission edge;
- ``patient-ins``: the message's package names this patient - at DATA.

Consumer domains never receive health data (the recipient chain refuses them at RCPT), so a
message carrying an INS can only reach mailboxes of the trust space.
"""

from __future__ import annotations

import re

from gateway.audit.redact import PATIENT_DOMAIN
from gateway.core import replies as R
from gateway.policy.decision import Decision

#: Mailbox types that may write to a patient (Ref. #2: professionals and organisations).
SENDER_TYPES = frozenset({"PER", "ORG"})
_NIR = re.compile(r"^[1-8][0-9]{4}(?:[0-9]{2}|2[AB])[0-9]{6}[0-9]{2}$")


def nir_key(first13: str) -> int:
    """The key of a NIR's first 13 characters: 97 - (N mod 97), Corsica's 2A/2B counted as 19/18."""
    digits = first13.upper()
    if digits[5:7] == "2A":
        digits = digits[:5] + "19" + digits[7:]
    elif digits[5:7] == "2B":
        digits = digits[:5] + "18" + digits[7:]
    if len(digits) != 13 or not digits.isdigit():
        raise ValueError("a NIR has 13 characters before its key")
    return 97 - int(digits) % 97


def valid_nir(text: str) -> bool:
    value = text.upper()
    return bool(_NIR.match(value)) and int(value[13:]) == nir_key(value[:13])


def is_patient_domain(address: str) -> bool:
    return address.rpartition("@")[2].strip().lower() == PATIENT_DOMAIN


def patient_nir(address: str) -> str | None:
    """The NIR of a patient's mailbox address (canonical, upper case), or None."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or domain.lower() != PATIENT_DOMAIN or not valid_nir(local):
        return None
    return local.upper()


def check_patient_address(address: str) -> Decision | None:
    """None for another domain; a refusal when the local part is not an INS with its key."""
    if not is_patient_domain(address):
        return None
    if patient_nir(address) is None:
        return Decision.refuse(R.S550_5_1_1_NOT_A_PATIENT, "patient-address",
                               f"not a patient's mailbox: an address at {PATIENT_DOMAIN} is an INS with its key")
    return None


def decide_patient_sender(mailbox_type: str | None) -> Decision:
    if mailbox_type in SENDER_TYPES:
        return Decision.accept(R.S250_2_1_5_RECIPIENT_OK, "patient-sender",
                               "practitioners' and organisations' mailboxes may write to patients")
    return Decision.refuse(R.S550_5_7_1_PATIENT_SENDER, "patient-sender",
                           "only a practitioner's (PER) or an organisation's (ORG) mailbox may write to a patient",
                           sender_type=mailbox_type or "unknown")


def decide_patient_documents(recipient_nirs: tuple[str, ...], message_nir: str | None, ins_kind: str) -> Decision:
    """At DATA: a message to patients carries the INS of each of them (one patient per message)."""
    if not recipient_nirs:
        return Decision.accept(R.S250_2_6_0_QUEUED, "patient-ins", "no patient recipient")
    if message_nir is None or ins_kind not in {"real", "test", "demo"}:
        return Decision.refuse(R.S554_5_6_0_PATIENT_INS, "patient-ins",
                               "a message to a patient's mailbox carries the patient's INS in an IHE XDM package "
                               "(CDA with an INS of a real, test or demo authority)")
    if any(nir != message_nir.upper() for nir in recipient_nirs):
        return Decision.refuse(R.S554_5_6_0_PATIENT_INS, "patient-ins",
                               "the INS in the IHE XDM package is not that of the patient's mailbox")
    return Decision.accept(R.S250_2_6_0_QUEUED, "patient-ins", "the package names the patient of the mailbox",
                           ins_kind=ins_kind)
