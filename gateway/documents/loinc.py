"""Document types in words: the LOINC codes (and CI-SIS codes) of French health documents.

The CDA header's ``code`` (CI-SIS "Structuration minimale de documents de santé", 3.5.5.5) is
the document type; it is what ``X-MSS-CODECDA`` carries (Référentiel socle MSSanté #2, ECO.2.4.1)
and what a clinician wants to read in the banner. The labels follow the ANS terminology
TRE_A04-Loinc (JDV_J07-XdsTypeCode-CISIS, https://mos.esante.gouv.fr/NOS/TRE_A04-Loinc),
shortened where the official label is long. An unknown code is shown as the code itself.
"""

from __future__ import annotations

import re

#: OID of LOINC (HL7 code system 2.16.840.1.113883.6.1), the codeSystem of a CDA document type.
LOINC_OID = "2.16.840.1.113883.6.1"

#: A LOINC code: digits, a hyphen and the check digit; CI-SIS also defines a few upper-case codes.
_CODE = re.compile(r"^(?:\d{1,7}-\d|[A-Z][A-Z0-9_-]{1,31})$")

LABELS: dict[str, str] = {
    "10213-7": "Compte rendu d'anesthésie",
    "11369-6": "Historique des vaccinations",
    "11488-4": "Compte rendu de consultation",
    "11490-0": "Lettre de liaison à la sortie d'un établissement de soins",
    "11493-4": "Compte rendu hospitalier (séjour)",
    "11502-2": "Compte rendu d'examens biologiques",
    "11505-5": "Compte rendu d'acte thérapeutique",
    "11506-3": "Compte rendu de suivi de soins par auxiliaire médical",
    "11526-1": "Compte rendu d'anatomie et de cytologie pathologiques",
    "11528-7": "Compte rendu d'imagerie médicale",
    "15507-7": "Compte rendu de passage aux urgences",
    "15508-5": "Compte rendu d'accouchement",
    "18748-4": "Compte rendu d'imagerie médicale",
    "18761-7": "Note de transfert",
    "18776-5": "Plan personnalisé de soins",
    "24611-6": "Compte rendu de télé-consultation",
    "27899-4": "Compte rendu d'acte diagnostique",
    "29274-8": "Mesures de signes vitaux",
    "29550-1": "Dispensation médicamenteuse",
    "29551-9": "Prescription de médicaments",
    "34112-3": "Compte rendu d'hospitalisation",
    "34133-9": "Synthèse d'épisode de soins",
    "34874-8": "Compte rendu opératoire",
    "57832-8": "Prescription d'examens",
    "57833-6": "Prescription de produits de santé",
    "60591-5": "Synthèse médicale",
    "PRESC-BIO": "Prescription d'actes de biologie médicale",
    "PRESC-KINE": "Prescription d'actes de kinésithérapie",
    "PRESC-INF": "Prescription d'actes infirmiers",
}


#: A run of digits as long as a NIR (13): a document type never carries one, a patient's number does.
_NIR_LIKE = re.compile(r"\d{13}")


def valid_code(code: str) -> bool:
    """A syntactically plausible document type code (what may go into a header and the banner): a
    LOINC code (``NNNNN-N``) with its check digit, or a CI-SIS code of at most 32 characters that
    carries no NIR-shaped run of digits (a code is copied into X-MSS-CODECDA and shown to people)."""
    if not _CODE.match(code or "") or len(code) > 32 or _NIR_LIKE.search(code):
        return False
    return loinc_check_digit_ok(code) if re.fullmatch(r"\d{1,7}-\d", code) else True


def loinc_check_digit_ok(code: str) -> bool:
    """LOINC's mod 10 check digit (the Luhn variant LOINC uses); CI-SIS codes pass."""
    if not re.fullmatch(r"\d{1,7}-\d", code):
        return valid_code(code)
    body, check = code.split("-")
    total = 0
    for position, char in enumerate(reversed(body)):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            digit = digit - 9 if digit > 9 else digit
        total += digit
    return (10 - total % 10) % 10 == int(check)


def label(code: str) -> str:
    """The document type in words (the code itself when unknown)."""
    return LABELS.get(code, f"document de type {code}" if valid_code(code) else "document de type inconnu")
