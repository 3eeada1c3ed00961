"""Patients' mailbox addresses: recognised by their INS key, pseudonymised wherever they would be recorded."""

from __future__ import annotations

import logging

import pytest

from gateway.audit.redact import install_log_redaction, pseudonym, redact, redact_value, set_salt
from gateway.audit.storable import storable
from gateway.audit.trail import AuditEvent
from gateway.policy.patients import decide_patient_documents, decide_patient_sender, patient_nir, valid_nir
from tests.gateway.documents.xdm_samples import NIR, corsica_nir

PATIENT = f"{NIR}@patient.mssante.fr"


def test_patient_addresses() -> None:
    assert patient_nir(PATIENT) == NIR and patient_nir(f"<{PATIENT.upper()}>") == NIR
    assert patient_nir(f"{corsica_nir().lower()}@patient.mssante.fr") == corsica_nir()
    assert patient_nir(f"{NIR[:13]}88@patient.mssante.fr") is None
    assert patient_nir(f"{NIR}@a.mssante.test") is None
    assert valid_nir(NIR) and not valid_nir("979035121518989")


def test_sender_types_and_documents() -> None:
    assert decide_patient_sender("PER").accepted and decide_patient_sender("ORG").accepted
    assert not decide_patient_sender("APP").accepted and not decide_patient_sender(None).accepted
    assert decide_patient_documents((NIR,), NIR, "test").accepted
    assert not decide_patient_documents((NIR,), None, "").accepted
    assert not decide_patient_documents((NIR,), NIR, "nia").accepted
    assert not decide_patient_documents((NIR, corsica_nir()), NIR, "real").accepted


def test_pseudonyms_are_salted_and_stable() -> None:
    set_salt(b"operator-secret-1")
    first = redact(f"to=<{PATIENT}> and {PATIENT.upper()}")
    assert NIR not in first and first.count(f"{pseudonym(NIR)}@patient.mssante.fr") == 2
    assert redact(PATIENT) == redact(PATIENT)
    set_salt(b"operator-secret-2")
    assert redact(PATIENT) != first.split()[0]
    assert redact("bob@a.mssante.test") == "bob@a.mssante.test"
    assert NIR not in str(redact_value({"to": [PATIENT], PATIENT: 1}))


def test_audit_events_never_store_an_ins() -> None:
    event = AuditEvent("rcpt", "accept", sender="sec@a.test", recipient=PATIENT, detail={"rcpts": [PATIENT]})
    stored = storable(event)
    assert NIR not in str(stored) and stored.recipient.endswith("@patient.mssante.fr")
    plain = AuditEvent("rcpt", "accept", recipient="bob@a.test")
    assert storable(plain) is plain


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    caplog.set_level(logging.INFO)
    logging.getLogger("mssgw.test").info("delivered to=<%s>", PATIENT)
    logging.getLogger("mail.log").info("recip: %s", PATIENT)
    assert NIR not in caplog.text and caplog.text.count("ins-") == 2
