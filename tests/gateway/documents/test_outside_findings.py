"""What an outside tester found in the health-document checks, kept as regression tests.

- A part named ``IHE_XDM.ZIP`` that is not a readable zip was taken for "no package" and the
  message got 250 with no warning: an announced package that cannot be read is a failed check.
- One 8 MiB attribute value in METADATA.XML cost 40 s of CPU before the 250 (the XML parser was
  fed 16 KiB at a time and rescanned the long token from its start each time).
- Patient mailbox addresses that are not a well-formed INS (a NIR without its key, a name) were
  kept in clear in the audit trail.
"""

from __future__ import annotations

import time
from pathlib import Path

from gateway.audit.redact import redact
from gateway.documents.cda import parse_tree
from gateway.documents.scan import inspect_message
from gateway.policy.documents import decide_documents

REPROS = Path(__file__).parent / "repros"


def test_a_corrupt_attachment_named_as_a_package_is_refused() -> None:
    found = inspect_message((REPROS / "case_notzip_noheaders.eml").read_bytes())
    assert found.error is not None and "IHE_XDM.ZIP" in found.error
    decision = decide_documents(found.policy_facts())
    assert not decision.decision.accepted
    assert decision.decision.reply.code == 554 and decision.decision.reply.enhanced.startswith("5.6.")


def test_a_long_xml_value_is_parsed_in_linear_time() -> None:
    """24 MiB in one attribute: about 30 s of CPU fed in 16 KiB chunks (quadratic), under a second
    in one piece: the bound sits far from both, so load on the machine does not matter."""
    xml = b'<a x="' + b"A" * (24 * 1024 * 1024) + b'"/>'
    started = time.process_time()
    parse_tree(xml, max_bytes=32 * 1024 * 1024)
    assert time.process_time() - started < 10.0


def test_every_patient_mailbox_address_is_pseudonymised() -> None:
    for local in ("2790351215189", "DUPONT.JEAN", "279035121518989", "x+y"):
        text = f"rcpt=<{local}@patient.mssante.fr> rule=patient"
        out = redact(text)
        assert local not in out and "@patient.mssante.fr" in out and "ins-" in out
        assert redact(out) == out  # a pseudonym stays as it is
    assert redact("anne.martin@a.mssante.test") == "anne.martin@a.mssante.test"


def test_a_document_type_code_never_carries_a_patient_number() -> None:
    """The code is copied into X-MSS-CODECDA and the banner: a name and a NIR passed as a 'code' were
    accepted; LOINC-shaped codes must have their check digit."""
    from gateway.documents.loinc import valid_code

    assert valid_code("57833-6") and valid_code("PRESC-BIO")
    assert not valid_code("DUPONTJEAN-279035121518989")
    assert not valid_code("57833-5")  # wrong LOINC check digit
    assert not valid_code("A" + "B" * 32)
