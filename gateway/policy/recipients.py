"""May this recipient receive? The recipient rules, as a readable table.

Submission (our users sending): the recipient must be an active mailbox of one
of our domains, or of a trusted operator's domain that we can protect mail for.
Inbound (peer operators sending to us): only our own active mailboxes.
Consumer and unknown domains are refused with a reason a person understands.
A patient's mailbox (``<INS>@patient.mssante.fr``, ``gateway.policy.patients``) is in no
directory: its domain must be trusted (routed to the operator of the national patient
messaging) and its local part an INS with a valid key.
"""

from __future__ import annotations

from directory.facts import RecipientFacts
from gateway.core import replies as R
from gateway.policy.chain import Rule, evaluate
from gateway.policy.decision import Decision
from gateway.policy.patients import check_patient_address, is_patient_domain

Facts = RecipientFacts


def _syntax(f: Facts) -> Decision | None:
    if f.valid_syntax:
        return None
    return Decision.refuse(R.S501_5_1_3_BAD_ADDRESS, "address-syntax", f"not a valid mail address: {f.address}")


def _consumer(f: Facts) -> Decision | None:
    if f.consumer_pattern is None or f.domain_kind in {"local", "trusted"}:
        return None
    return Decision.refuse(
        R.S550_5_7_1_CONSUMER_DOMAIN,
        "consumer-domain",
        f"consumer mailbox: health data may not be sent to {f.domain}",
    )


def _blocked(f: Facts) -> Decision | None:
    if f.domain_kind != "blocked":
        return None
    return Decision.refuse(
        R.S550_5_7_1_BLOCKED_DOMAIN, "blocked-domain", f"{f.domain} is blocked by the operator: {f.domain_reason}"
    )


def _untrusted(f: Facts) -> Decision | None:
    if f.domain_kind in {"local", "trusted"}:
        return None
    return Decision.refuse(
        R.S550_5_7_1_UNTRUSTED_DOMAIN,
        "untrusted-domain",
        f"{f.domain} is not a mail domain of the health trust space (no trusted operator)",
    )


def _unknown(f: Facts) -> Decision | None:
    if f.mailbox_known:
        return None
    where = "this operator" if f.domain_kind == "local" else f"the operator of {f.domain}"
    return Decision.refuse(
        R.S550_5_1_1_UNKNOWN_RECIPIENT,
        "unknown-mailbox",
        f"{f.address} is not a mailbox of {where} in the health directory",
    )


def _inactive(f: Facts) -> Decision | None:
    if f.mailbox_active:
        return None
    return Decision.refuse(
        R.S550_5_1_1_INACTIVE_RECIPIENT, "inactive-mailbox", f"{f.address} is deactivated in the health directory"
    )


def _not_our_domain(f: Facts) -> Decision | None:
    if f.domain_kind == "local":
        return None
    return Decision.refuse(
        R.S550_5_7_1_NOT_LOCAL, "not-local", f"{f.address} is not served by this operator (relaying denied)"
    )


def protection_for(f: Facts) -> str | None:
    """How mail to this recipient would be protected, or None when it cannot be."""
    if f.domain_kind == "local":
        return "local"
    if f.has_openpgp_key and f.prefers_openpgp:
        return "openpgp"
    if f.has_certificate:
        return "smime"
    if f.has_openpgp_key:
        return "openpgp"
    if f.domain_has_certificate:
        return "smime-domain"
    if f.operator_dn:
        return "mtls-signed"
    return None


def _unprotectable(f: Facts) -> Decision | None:
    if protection_for(f) is not None:
        return None
    return Decision.refuse(
        R.S550_5_7_1_NO_PROTECTION,
        "no-protection",
        f"no certificate or OpenPGP key for {f.address} and no operator identity for {f.domain}: "
        "mail cannot be protected for this recipient",
    )


def _patient(f: Facts) -> Decision | None:
    """A patient's mailbox: an INS with its key, protected for the domain's operator (no directory entry)."""
    refused = check_patient_address(f.address)
    if refused is not None or not is_patient_domain(f.address):
        return refused
    protection = protection_for(f)
    if protection is None:
        return _unprotectable(f)
    return Decision.accept(R.S250_2_1_5_RECIPIENT_OK, "patient-mailbox",
                           "a patient's mailbox of the national patient messaging", protection=protection)


def _accept(f: Facts) -> Decision:
    kind = "local mailbox" if f.domain_kind == "local" else f"mailbox of trusted operator {f.domain}"
    return Decision.accept(
        R.S250_2_1_5_RECIPIENT_OK,
        "known-recipient",
        f"{f.address} is an active {kind}",
        protection=protection_for(f) or "",
    )


SUBMISSION_CHAIN: tuple[Rule[Facts], ...] = (
    Rule("address-syntax", "the address is well formed", _syntax),
    Rule("consumer-domain", "consumer mail providers never receive health data", _consumer),
    Rule("blocked-domain", "domains the operator blocked", _blocked),
    Rule("untrusted-domain", "only our domains and trusted operators' domains", _untrusted),
    Rule("patient-mailbox", "a patient's mailbox is an INS with its key at the patient messaging domain", _patient),
    Rule("unknown-mailbox", "the mailbox is in the health directory", _unknown),
    Rule("inactive-mailbox", "the mailbox is active", _inactive),
    Rule("no-protection", "mail can be signed and encrypted (or sent over pinned mTLS) for it", _unprotectable),
)

INBOUND_CHAIN: tuple[Rule[Facts], ...] = (
    Rule("address-syntax", "the address is well formed", _syntax),
    Rule("not-local", "peers may only send to our own domains", _not_our_domain),
    Rule("unknown-mailbox", "the mailbox is in the health directory", _unknown),
    Rule("inactive-mailbox", "the mailbox is active", _inactive),
)


def decide_recipient(facts: Facts, *, inbound: bool = False) -> Decision:
    return evaluate(INBOUND_CHAIN if inbound else SUBMISSION_CHAIN, facts, _accept)
