"""What the clinician reads about a delivered message's documents, and what Authentication-Results says."""

from __future__ import annotations

from gateway.documents.describe import DocumentSummary, auth_results_method, banner_line, summarise
from tests.gateway.documents.xdm_samples import NIR, cda, message, package


def test_a_verified_package_in_words() -> None:
    summary = summarise(message(package(), headers={"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "O"}))
    assert summary is not None and summary.ok and summary.codes == ("57833-6",)
    line = banner_line(summary, {"10000000009": "Dr Anne Martin (RPPS 10000000009)"})
    assert line == ("[Health documents: Prescription de produits de sante (57833-6), "
                    "author Dr Anne Martin (RPPS 10000000009); IHE XDM package verified]")
    assert banner_line(summary).count("RPPS 10000000009") == 1
    assert auth_results_method(summary) == "x-mss-xdm=pass"
    assert line.isascii() and NIR not in line and "Ordonnance de test" not in line


def test_missing_fields_from_a_peer_are_no_failure() -> None:
    summary = summarise(message(package()))
    assert summary is not None and summary.ok


def test_a_failed_check_is_shown_not_hidden() -> None:
    summary = summarise(message(package(bad_hash=True)))
    assert summary is not None and not summary.ok and summary.rule == "xdm-invalid"
    assert banner_line(summary).startswith("[Health documents NOT verified: IHE XDM package refused")
    assert auth_results_method(summary).startswith('x-mss-xdm=fail reason="IHE XDM package refused')
    wrong = NIR[:13] + "88"
    bad_ins = summarise(message(package(document=cda(nir=wrong), nir=wrong)))
    assert bad_ins is not None and bad_ins.rule == "ins-malformed"
    assert wrong not in banner_line(bad_ins) and wrong not in auth_results_method(bad_ins)


def test_no_package() -> None:
    assert summarise(message(None)) is None
    assert auth_results_method(None) == "x-mss-xdm=none"


def test_the_documents_line_speaks_the_operators_language() -> None:
    """The banner is French for a French operator: its documents line too (it was English only)."""
    summary = DocumentSummary(True, "documents-consistent", "", ("57833-6",), ("10000000009",))
    line = banner_line(summary, language="fr")
    assert line.startswith("[Documents de sante: ") and "paquet IHE XDM verifie" in line and "auteur RPPS" in line
    assert banner_line(DocumentSummary(False, "xdm-invalid", "bad"), language="fr").startswith(
        "[Documents de sante NON verifies: bad]")
