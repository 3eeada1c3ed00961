"""The health-document rules over facts read from real (hand-built) packages: which rule decides, and why."""

from __future__ import annotations

import io
import zipfile
from email import message_from_bytes
from email.policy import SMTP

import pytest

from gateway.documents.scan import inspect_message
from gateway.policy.documents import DocumentFacts, decide_documents
from tests.gateway.documents.xdm_samples import NIR, cda, corsica_nir, message, package


def decide(data: bytes, mode: str = "add") -> tuple[str, str, tuple[tuple[str, str], ...], str]:
    result = decide_documents(inspect_message(data).policy_facts(), missing_headers=mode)
    return result.decision.rule, result.decision.reply.short, result.add_headers, result.decision.reason


def test_no_package_no_fields() -> None:
    assert decide(message(None))[:2] == ("documents-none", "250 2.6.0")


def test_consistent_fields_pass() -> None:
    rule, reply, added, _ = decide(message(package(), headers={"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "O"}))
    assert (rule, reply, added) == ("documents-consistent", "250 2.6.0", ())


def test_missing_fields_added_or_refused() -> None:
    rule, reply, added, _ = decide(message(package()))
    assert rule == "x-mss-added" and added == (("X-MSS-CODECDA", "57833-6"), ("X-MSS-INS", "O"))
    rule, reply, added, reason = decide(message(package(), headers={"X-MSS-INS": "O"}), "refuse")
    assert (rule, reply, added) == ("x-mss-missing", "554 5.6.0", ()) and "X-MSS-CODECDA" in reason
    assert decide(message(package(document=cda(traits=False))))[2] == (("X-MSS-CODECDA", "57833-6"),
                                                                       ("X-MSS-INS", "N"))


@pytest.mark.parametrize(("headers", "rule"), [
    ({"X-MSS-CODECDA": "11488-4", "X-MSS-INS": "O"}, "x-mss-codecda-mismatch"),
    ({"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "N"}, "x-mss-ins-mismatch"),
    ({"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "yes"}, "x-mss-ins-mismatch"),
    ({"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "o"}, "x-mss-ins-mismatch"),  # a code: capital O or N only
])
def test_fields_contradicting_the_package_are_refused(headers: dict[str, str], rule: str) -> None:
    got_rule, reply, _, reason = decide(message(package(), headers=headers))
    assert (got_rule, reply) == (rule, "554 5.6.0") and "ECO.2.4" in reason


def test_an_o_without_a_qualified_ins_is_refused() -> None:
    data = message(package(document=cda(traits=False)), headers={"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "O"})
    assert decide(data)[0] == "x-mss-ins-mismatch"


def two_packages(second_nir: str) -> bytes:
    """Two IHE_XDM.ZIP attachments: one about NIR, one about ``second_nir``."""
    msg = message_from_bytes(message(package()), policy=SMTP)
    second = package(document=cda(nir=second_nir), nir=second_nir)
    msg.add_attachment(second, maintype="application", subtype="zip", filename="IHE_XDM.ZIP")  # type: ignore[attr-defined]
    return msg.as_bytes()


def test_documents_about_two_patients_are_refused() -> None:
    """One message, one patient: the banner and the clinician's filing name one INS."""
    data = two_packages(corsica_nir())
    found = inspect_message(data)
    assert len(found.packages) == 2 and len(found.patients) == 2
    rule, reply, _, reason = decide(data)
    assert (rule, reply) == ("documents-several-patients", "554 5.6.0") and "2 different patients" in reason
    assert NIR not in reason and corsica_nir() not in reason
    same = two_packages(NIR)  # two packages about the same patient: one patient, accepted
    assert len(inspect_message(same).patients) == 1 and decide(same)[0] == "x-mss-added"


def test_fields_without_a_package_and_duplicates() -> None:
    assert decide(message(None, headers={"X-MSS-INS": "N"}))[:2] == ("x-mss-without-document", "554 5.6.0")
    twice = message(package()).replace(b"Subject:", b"X-MSS-INS: O\r\nX-MSS-INS: O\r\nSubject:", 1)
    assert decide(twice)[0] == "x-mss-duplicate"


def test_malformed_ins_and_bad_package_refused_without_the_number() -> None:
    wrong = NIR[:13] + "88"
    rule, reply, _, reason = decide(message(package(document=cda(nir=wrong), nir=wrong)))
    assert (rule, reply) == ("ins-malformed", "554 5.6.0") and NIR[:13] not in reason
    rule, reply, _, reason = decide(message(package(bad_hash=True)))
    assert (rule, reply) == ("xdm-invalid", "554 5.6.0") and "hash" in reason


def test_a_cda_code_that_could_inject_a_header_is_refused() -> None:
    evil = cda(code="57833-6&#13;&#10;Bcc: x@evil.test")
    assert decide(message(package(document=evil, code="57833-6")))[0] == "xdm-invalid"


def test_a_zip_that_is_not_xdm_and_facts_hold_no_ins() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("photo.txt", "x")
    assert decide(message(buffer.getvalue()))[0] == "documents-none"
    result = decide_documents(inspect_message(message(package())).policy_facts())
    assert NIR not in repr(result) and NIR not in str(result.decision.as_dict())
    assert dict(result.decision.facts)["ins_kind"] == "test"
    assert DocumentFacts().expected_headers() == {}
