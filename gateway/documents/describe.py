"""What a delivered message's health documents are, in words for the clinician and in a result for machines.

Inbound messages from peers are checked like submitted ones (``scan.inspect_message`` and
``gateway.policy.documents``), but a failure is shown rather than refused at that point: the
message already passed a peer's edge and is signed; dropping it would lose mail silently.
The verification banner names the document type in words (LOINC, ``loinc.label``) and the
author as the directory knows them; ``Authentication-Results`` (RFC 8601) gets a result for the
method ``x-mss-xdm`` (pass, fail, none) with a reason naming the failed rule.

The banner part is US-ASCII (it is inserted into messages of any charset), so labels are
written without accents. Nothing here holds the INS, a patient's name or a document title.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.documents.loinc import label
from gateway.documents.scan import inspect_message
from gateway.policy.documents import decide_documents


@dataclass(frozen=True)
class DocumentSummary:
    ok: bool
    rule: str  # the policy rule that decided (``documents-consistent``, ``xdm-invalid``...)
    reason: str  # for a failure: the policy's reason (no content)
    codes: tuple[str, ...] = ()  # document type codes of the CDA documents
    authors: tuple[str, ...] = ()  # RPPS numbers of their authors


def may_carry_documents(message: bytes) -> bool:
    """A cheap test (no parsing): a zip attachment (base64 ``UEsDB`` or raw ``PK``) or an X-MSS field."""
    end = message.find(b"\r\n\r\n")
    head = message[: end if end >= 0 else 65536].lower()
    return b"UEsDB" in message or b"PK\x03\x04" in message or b"x-mss-" in head


def summarise(message: bytes) -> DocumentSummary | None:
    """The documents of a (decrypted) message checked as at submission; None when it carries no package.

    Missing X-MSS fields are no failure here (a peer's client may predate Ref. #2); fields that
    contradict the package are. An unexpected error reading a package is a failed check (shown
    to the reader), never an exception that would hold the message back.
    """
    try:
        found = inspect_message(message)
    except Exception as exc:  # a bug reading untrusted bytes must not stop delivery
        return DocumentSummary(False, "xdm-unreadable", f"IHE XDM package could not be read ({type(exc).__name__})")
    if not found.packages and found.error is None:
        return None
    decided = decide_documents(found.policy_facts(), missing_headers="add").decision
    return DocumentSummary(decided.accepted, decided.rule, "" if decided.accepted else decided.reason,
                           found.cda_codes, found.authors)


def ascii_words(text: str) -> str:
    """Accents dropped ("Médicaments" -> "Medicaments"), anything else non-ASCII replaced."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return plain.encode("ascii", "replace").decode("ascii")


#: The banner line's words in the operator's language (``crypto.banner_language``).
_WORDS = {
    "en": {"failed": "Health documents NOT verified", "title": "Health documents", "none": "no CDA document",
           "author": "author", "verified": "IHE XDM package verified"},
    "fr": {"failed": "Documents de sante NON verifies", "title": "Documents de sante", "none": "aucun document CDA",
           "author": "auteur", "verified": "paquet IHE XDM verifie"},
}


def banner_line(summary: DocumentSummary, authors: Mapping[str, str] | None = None, *, language: str = "en") -> str:
    """One line for the banner: the document types in words and their authors, or the failed check."""
    words = _WORDS.get(language, _WORDS["en"])
    if not summary.ok:
        return ascii_words(f"[{words['failed']}: {summary.reason}]")
    kinds = ", ".join(f"{label(code)} ({code})" for code in summary.codes) or words["none"]
    names = [(authors or {}).get(rpps) or f"RPPS {rpps}" for rpps in summary.authors]
    by = f", {words['author']} {', '.join(names)}" if names else ""
    return ascii_words(f"[{words['title']}: {kinds}{by}; {words['verified']}]")


def auth_results_method(summary: DocumentSummary | None) -> str:
    """The ``x-mss-xdm`` result for Authentication-Results (RFC 8601 2.2 resinfo)."""
    if summary is None:
        return "x-mss-xdm=none"
    if summary.ok:
        return "x-mss-xdm=pass"
    reason = summary.reason.replace("\\", "").replace('"', "'")
    return f'x-mss-xdm=fail reason="{ascii_words(reason)[:200]}"'
