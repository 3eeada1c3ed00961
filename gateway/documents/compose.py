"""Compose a standard MSSanté message carrying a health document in an IHE XDM package.

What other MSSanté clients expect (Référentiel socle MSSanté #2, ECO.2.4 and its annex on IHE
XDM): a ``multipart/mixed`` message with a text part for the reader, the document itself (the
PDF, so that any mail client shows it) and ``IHE_XDM.ZIP`` holding the CDA R2 document (CI-SIS
structuration minimale; a level 1 CDA wrapping the PDF when no CDA is given) and its
METADATA.XML; header fields ``X-MSS-CODECDA`` (the CDA's type code) and ``X-MSS-INS`` (``O``
when the INS is qualified: INS, its OID and the four identity traits; else ``N``). A message to
a patient's mailbox (``<INS>@patient.mssante.fr``, Ref. #2 3.4.2.3) may carry
``X-MSS-MES: FIN`` to block the patient's reply.

The output is RFC 5322 with CRLF line ends, ready for ``mssgw message protect`` or submission.
``ComposeError`` says what is wrong with the inputs (never echoing an INS).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from gateway.core.errors import ContentError
from gateway.documents.cda import Author, CdaError, Patient, build_n1, read_header
from gateway.documents.ins import Ins
from gateway.documents.loinc import label, loinc_check_digit_ok, valid_code
from gateway.documents.xdm import NewDocument, write_package

#: The domain of the national patient messaging (Mon Espace Santé).
PATIENT_DOMAIN = "patient.mssante.fr"
#: Our OID arc for submission set sources and unique ids of documents composed here (2.25: UUID).
UUID_ROOT = "2.25"


class ComposeError(ContentError, ValueError):
    """The inputs cannot make a valid message; the text says why."""


@dataclass(frozen=True)
class ComposeRequest:
    sender: str
    recipients: tuple[str, ...]
    pdf: bytes
    pdf_name: str
    patient: Patient
    loinc: str
    subject: str = ""
    cda: bytes | None = None
    author: Author = field(default_factory=Author)
    body: str = ""
    block_reply: bool = False  # X-MSS-MES: FIN towards a patient's mailbox


def _safe_filename(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[:64].strip("._") or "document"
    return cleaned if cleaned.lower().endswith(".pdf") else cleaned + ".pdf"


def compose(request: ComposeRequest, *, now: datetime | None = None) -> bytes:
    """The message's bytes (CRLF), or ``ComposeError``."""
    moment = now or datetime.now(UTC)
    if not request.pdf.startswith(b"%PDF-"):
        raise ComposeError("the document is not a PDF (it does not start with %PDF-)")
    if not valid_code(request.loinc) or not loinc_check_digit_ok(request.loinc):
        raise ComposeError("the LOINC code is malformed (digits, a hyphen and a valid check digit)")
    title = request.subject or label(request.loinc)
    ins: Ins = request.patient.ins
    if request.cda is not None:
        try:
            header = read_header(request.cda)
        except CdaError as exc:
            raise ComposeError(f"the CDA document is refused: {exc}") from None
        if header.code != request.loinc:
            raise ComposeError("the CDA document's code differs from --loinc")
        if header.ins != ins:
            raise ComposeError("the CDA document's patient INS differs from --ins")
        cda, qualified = request.cda, header.qualified_ins
    else:
        cda = build_n1(request.pdf, patient=request.patient, author=request.author, loinc=request.loinc,
                       title=title, now=moment)
        qualified = read_header(cda).qualified_ins
    pdf_name = _safe_filename(request.pdf_name)
    package = write_package(
        [NewDocument("DOC0001.XML", cda, "text/xml", request.loinc, title)],
        ins, source_oid=f"{UUID_ROOT}.{uuid.uuid4().int}", unique_root=f"{UUID_ROOT}.{uuid.uuid4().int}",
        now=moment, author_rpps=request.author.rpps)
    message = EmailMessage(policy=SMTP)
    message["From"] = request.sender
    message["To"] = ", ".join(request.recipients)
    message["Subject"] = title
    message["Date"] = format_datetime(moment)
    message["Message-ID"] = make_msgid(domain=request.sender.rpartition("@")[2] or None)
    message["X-MSS-CODECDA"] = request.loinc
    message["X-MSS-INS"] = "O" if qualified else "N"
    if request.block_reply and any(r.lower().endswith("@" + PATIENT_DOMAIN) for r in request.recipients):
        message["X-MSS-MES"] = "FIN"
    body = request.body or f"Document joint : {label(request.loinc)}.\n"
    message.set_content(body, cte="quoted-printable")
    message.add_attachment(request.pdf, maintype="application", subtype="pdf", filename=pdf_name)
    message.add_attachment(package, maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
    return message.as_bytes()
