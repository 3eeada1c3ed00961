"""May this message's health documents go on? The XDM/INS/X-MSS rules, as a readable table over facts.

The facts (``DocumentFacts``) come from ``gateway.documents.scan.inspect_message`` (packages
checked under bounds, INS checked, header fields read) through ``MessageDocuments.policy_facts``;
this module only decides, and imports nothing from the floors above it. Rules, top to bottom, the first
that hits decides:

1. ``xdm-invalid``: a package fails its checks (zip safety, METADATA.XML, sizes, hashes, CDA XML).
2. ``ins-malformed``: an INS in a package has a bad format, key or authority OID.
   ``documents-several-patients``: the packages name more than one patient (INS): one message
   concerns one patient (an XDM submission set has one patient, IHE ITI TF-3 §4.2.3.2; a
   clinician reading a banner naming one patient must not file another's document with it).
3. ``x-mss-duplicate``: ``X-MSS-CODECDA`` or ``X-MSS-INS`` appears more than once.
4. ``x-mss-without-document``: X-MSS fields without a CDA in an IHE XDM package (Référentiel
   socle MSSanté #2 ECO.2.4.1/2: "l'entête ne DOIT pas être positionné").
5. ``x-mss-codecda-mismatch`` / ``x-mss-ins-mismatch``: the fields differ from the package
   (ECO.2.4.1: the CDA ``code`` values, comma-separated; ECO.2.4.2: ``O`` when a qualified INS
   is present, else ``N``, exactly these capitals: the field is a code, not text).
6. ``x-mss-missing``: fields absent; with ``documents.missing_headers = "add"`` the message is
   accepted and the fields the package implies are returned to be added, else refused.

Refusals are 554 5.6.0 with a reason naming the rule; reasons and audit facts hold codes,
counts and kinds, never an INS, a name or a title.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.core import replies as R
from gateway.policy.decision import Decision


@dataclass(frozen=True)
class DocumentFacts:
    """What a message's IHE XDM packages carry and what its X-MSS fields say (codes and counts only)."""

    packages: int = 0
    documents: int = 0
    error: str | None = None  # the first package check that failed (no content)
    ins_problems: tuple[str, ...] = ()
    has_cda: bool = False
    cda_codes: tuple[str, ...] = ()
    qualified_ins: bool = False
    ins_kind: str = ""  # real, test, demo, nia or empty
    header_codecda: tuple[str, ...] | None = None
    header_ins: str | None = None
    codecda_fields: int = 0
    ins_fields: int = 0
    #: The patient's NIR, only to compare with a patient's mailbox address (never printed or recorded).
    patient_nir: str | None = field(default=None, repr=False)
    patients: int = 0  # distinct patients (INS) the packages name

    def expected_headers(self) -> dict[str, str]:
        """The X-MSS fields Ref. #2 ECO.2.4.1/2 asks for (none without a CDA)."""
        if not self.has_cda:
            return {}
        return {"X-MSS-CODECDA": ",".join(self.cda_codes), "X-MSS-INS": "O" if self.qualified_ins else "N"}


@dataclass(frozen=True)
class DocumentsDecision:
    decision: Decision
    add_headers: tuple[tuple[str, str], ...] = ()  # fields to add to the message before queueing


def _facts(found: DocumentFacts) -> dict[str, str]:
    return {"xdm_packages": str(found.packages), "xdm_documents": str(found.documents),
            "cda_codes": ",".join(found.cda_codes), "ins_kind": found.ins_kind}


def _refuse(reply: R.Reply, rule: str, reason: str, found: DocumentFacts) -> DocumentsDecision:
    return DocumentsDecision(Decision.refuse(reply, rule, reason, **_facts(found)))


def decide_documents(found: DocumentFacts, *, missing_headers: str = "add") -> DocumentsDecision:
    """The decision for one message's documents, and the X-MSS fields to add when allowed."""
    if found.error is not None:
        return _refuse(R.S554_5_6_0_XDM_INVALID, "xdm-invalid", f"IHE XDM package refused: {found.error}", found)
    if found.ins_problems:
        return _refuse(R.S554_5_6_0_INS_MALFORMED, "ins-malformed",
                       f"Patient INS malformed in the IHE XDM package: {found.ins_problems[0]}", found)
    if found.patients > 1:
        return _refuse(R.S554_5_6_0_XDM_INVALID, "documents-several-patients",
                       f"the IHE XDM documents concern {found.patients} different patients: "
                       "send one message per patient", found)
    if found.codecda_fields > 1 or found.ins_fields > 1:
        return _refuse(R.S554_5_6_0_XMSS_MISMATCH, "x-mss-duplicate",
                       "X-MSS-CODECDA and X-MSS-INS may each appear once", found)
    has_fields = found.header_codecda is not None or found.header_ins is not None
    if not found.has_cda:
        if has_fields:
            return _refuse(R.S554_5_6_0_XMSS_MISMATCH, "x-mss-without-document",
                           "X-MSS-CODECDA/X-MSS-INS set but no CDA document in an IHE XDM package "
                           "(MSSante Ref. #2 ECO.2.4)", found)
        rule = "documents-none" if not found.packages else "documents-no-cda"
        return DocumentsDecision(Decision.accept(R.S250_2_6_0_QUEUED, rule, "no CDA document to check",
                                                 **_facts(found)))
    expected = found.expected_headers()
    if found.header_codecda is not None and set(found.header_codecda) != set(found.cda_codes):
        return _refuse(R.S554_5_6_0_XMSS_MISMATCH, "x-mss-codecda-mismatch",
                       f"X-MSS-CODECDA does not match the CDA document type(s) {expected['X-MSS-CODECDA']} "
                       "(MSSante Ref. #2 ECO.2.4.1)", found)
    if found.header_ins is not None and found.header_ins.strip() != expected["X-MSS-INS"]:
        return _refuse(R.S554_5_6_0_XMSS_MISMATCH, "x-mss-ins-mismatch",
                       f"X-MSS-INS must be {expected['X-MSS-INS']} for this package: O only with a qualified INS "
                       "(MSSante Ref. #2 ECO.2.4.2)", found)
    missing = tuple((name, value) for name, value in expected.items()
                    if (name == "X-MSS-CODECDA" and found.header_codecda is None)
                    or (name == "X-MSS-INS" and found.header_ins is None))
    if missing and missing_headers != "add":
        return _refuse(R.S554_5_6_0_XMSS_MISSING, "x-mss-missing",
                       f"{' and '.join(n for n, _ in missing)} missing for an IHE XDM package "
                       "(MSSante Ref. #2 ECO.2.4)", found)
    if missing:
        return DocumentsDecision(Decision.accept(R.S250_2_6_0_QUEUED, "x-mss-added",
                                                 "X-MSS fields added from the IHE XDM package", **_facts(found)),
                                 missing)
    return DocumentsDecision(Decision.accept(R.S250_2_6_0_QUEUED, "documents-consistent",
                                             "X-MSS fields match the IHE XDM package", **_facts(found)))
