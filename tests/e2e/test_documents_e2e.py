"""A health document from A's clinician to B's pharmacist: compose, protect, relay, open at the peer, and read.

The message is composed as ``mssgw message compose`` does (CDA level 1 wrapping the PDF in an
IHE XDM package), queued at A, protected and relayed by A's workers over mutual TLS, opened
at B. B checks the package as at submission: the clinician reads the document type in words
and the author as B's directory knows them; a package that fails its checks (sent by a peer
that did not check it) is delivered with the failure shown in the banner and in
Authentication-Results, never silently dropped. No INS in the logs or the audit trail of B.
"""

from __future__ import annotations

import logging

import pytest
from e2e_support import CLINICIAN, CLINICIAN_RPPS, PRACTITIONER, Pair, parse

from gateway.audit.trail import query
from gateway.documents.cda import Author, Patient
from gateway.documents.compose import ComposeRequest, compose
from gateway.documents.ins import parse_ins
from tests.gateway.documents.xdm_samples import NIR, PDF, message, package

BACKENDS = ("sqlite",)


def _composed() -> bytes:
    return compose(ComposeRequest(
        CLINICIAN, (PRACTITIONER,), PDF, "ordonnance.pdf",
        Patient(parse_ins(NIR, "test"), "Patiente-Test", "Jeanne", "19790328", "F"), "57833-6",
        author=Author(CLINICIAN_RPPS)))


async def test_document_opened_at_the_peer_names_type_and_author(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = pair.a, pair.b
    a.enqueue(_composed(), CLINICIAN, [PRACTITIONER])
    await pair.flow()
    inbox = b.mailbox(PRACTITIONER)
    assert len(inbox) == 1
    got = parse(inbox[0])
    assert "x-mss-xdm=pass" in str(got["Authentication-Results"]) and "smime=pass" in str(got["Authentication-Results"])
    assert got["X-MSS-CODECDA"] == "57833-6" and got["X-MSS-INS"] == "O"
    assert (b"[Documents de sante: Prescription de produits de sante (57833-6), auteur Dr Anne Martin "
            b"(RPPS 10000000009); paquet IHE XDM verifie]") in inbox[0]
    zips = [p for p in got.iter_attachments() if p.get_filename() == "IHE_XDM.ZIP"]
    assert len(zips) == 1
    with b.sessions() as db:
        records = query(db, limit=500)
    delivered = [r for r in records if r["event"] == "delivered-inbound"]
    assert delivered and "documents-consistent" in str(delivered[-1])
    for needle in (NIR, NIR[:13], "Patiente-Test"):
        assert needle not in caplog.text
        assert all(needle not in str(r) for r in records)


async def test_a_bad_package_from_a_peer_is_delivered_with_the_failure_shown(pair: Pair) -> None:
    a, b = pair.a, pair.b
    bad = message(package(bad_hash=True), sender=CLINICIAN, to=PRACTITIONER)
    a.enqueue(bad, CLINICIAN, [PRACTITIONER])  # as a peer that does not check packages would send it
    await pair.flow()
    inbox = b.mailbox(PRACTITIONER)
    assert len(inbox) == 1
    ar = " ".join(str(parse(inbox[0])["Authentication-Results"]).split())  # unfolded
    assert 'x-mss-xdm=fail reason="IHE XDM package refused' in ar and "hash" in ar
    assert b"[Documents de sante NON verifies: IHE XDM package refused" in inbox[0]
