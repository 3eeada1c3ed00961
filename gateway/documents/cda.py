"""Read the header of a CDA R2 document safely, and write a CI-SIS "structuration minimale" N1 document.

Sources: HL7 CDA R2 (ClinicalDocument, recordTarget, author, nonXMLBody); CI-SIS "Volet
Structuration minimale de documents de santé" (ANS): header templateId
``1.2.250.1.213.1.1.1.1``, document type in ``code`` (3.5.5.5, LOINC from JDV_J07), patient
INS in ``recordTarget/patientRole/id`` with the INS authority's OID as ``root``, author's
national identifier (``8`` + RPPS) under root ``1.2.250.1.71.4.2.1``, and the level 1 body: a
``nonXMLBody`` whose ``text`` is the PDF in base64 (mediaType ``application/pdf``).

The parser is hardened: ``defusedxml`` refuses any DTD (so no entity, internal or external, and
no network), and the document is read as a stream of events with bounds on bytes, element
count and depth, so neither a "billion laughs" nor a deeply nested tree costs more than the
bounds. Errors (``CdaError``) describe the problem and never quote the document.
"""

from __future__ import annotations

import base64
import io
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from xml.etree.ElementTree import Element, ParseError, SubElement, tostring

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse

from gateway.core.errors import ContentError
from gateway.documents.ins import KINDS, Ins, InsError, parse_ins
from gateway.documents.loinc import LOINC_OID, label

NS = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
_V3 = f"{{{NS}}}"
#: CI-SIS: conformity of the header to the "structuration minimale" volume.
CISIS_HEADER_TEMPLATE = "1.2.250.1.213.1.1.1.1"
#: National identifier of health professionals (IdNat_PS): ``8`` + RPPS.
RPPS_ROOT = "1.2.250.1.71.4.2.1"

#: Bounds of one XML document read by this module (a CDA with its PDF, or METADATA.XML).
MAX_XML_BYTES = 64 * 1024 * 1024
MAX_ELEMENTS = 200_000
MAX_DEPTH = 64


class CdaError(ContentError, ValueError):
    """The XML is unsafe, malformed or not a CDA R2 document; the message says which."""


@dataclass(frozen=True)
class CdaHeader:
    """What the gateway needs from a CDA header (nothing here is logged)."""

    code: str | None
    code_system: str | None
    title_present: bool
    ins: Ins | None  # the patient's INS when an id under an INS authority's OID is present
    ins_error: str | None  # why the INS under an INS authority's OID is malformed
    identity_traits: bool  # birth name, first given name, birth date and sex all present
    author_rpps: str | None
    nonxml_media_type: str | None  # level 1: the wrapped document's type

    @property
    def qualified_ins(self) -> bool:
        """An INS with its OID and the four identity traits (Ref. #2 ECO.2.4.2: ``X-MSS-INS: O``)."""
        return self.ins is not None and self.ins.kind != "nia" and self.identity_traits

    @property
    def type_label(self) -> str:
        return label(self.code or "")


def _local(tag: str) -> str:
    return tag[len(_V3):] if tag.startswith(_V3) else tag


class _WholeBuffer(io.BytesIO):
    """The document handed to the parser in one piece.

    ``iterparse`` reads its source 16 KiB at a time, and expat rescans a token that spans chunks
    from its start at every chunk: one 8 MiB attribute value cost 40 s of CPU (quadratic).  The
    bytes are in memory and bounded already (``max_bytes``), so one feed keeps parsing linear."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read()


def parse_tree(data: bytes, *, max_bytes: int = MAX_XML_BYTES, max_elements: int = MAX_ELEMENTS,
               max_depth: int = MAX_DEPTH) -> Element:
    """The root of an XML document read under bounds, or ``CdaError`` (no DTD, no entity, no network)."""
    if len(data) > max_bytes:
        raise CdaError(f"XML document larger than {max_bytes} bytes")
    depth = elements = 0
    root: Element | None = None
    try:
        for event, element in iterparse(_WholeBuffer(data), events=("start", "end"), forbid_dtd=True,
                                        forbid_entities=True, forbid_external=True):
            if event == "start":
                depth += 1
                elements += 1
                if root is None:
                    root = element
                if depth > max_depth:
                    raise CdaError(f"XML nested deeper than {max_depth} elements")
                if elements > max_elements:
                    raise CdaError(f"XML has more than {max_elements} elements")
            else:
                depth -= 1
    except DefusedXmlException:
        raise CdaError("XML with a DTD or entity declarations is refused (no entities, no external references)") from None
    except ParseError as exc:
        raise CdaError(f"XML is not well-formed (line {exc.position[0]})") from None
    if root is None:
        raise CdaError("XML document is empty")
    return root


def read_header(data: bytes) -> CdaHeader:
    """The header facts of a CDA R2 document, or ``CdaError``."""
    root = parse_tree(data)
    if root.tag != f"{_V3}ClinicalDocument":
        raise CdaError("not a CDA R2 document (root element is not urn:hl7-org:v3 ClinicalDocument)")
    code_el = root.find(f"{_V3}code")
    code = code_el.get("code") if code_el is not None else None
    system = code_el.get("codeSystem") if code_el is not None else None
    title = root.find(f"{_V3}title")
    ins: Ins | None = None
    ins_error: str | None = None
    traits = False
    role = root.find(f"{_V3}recordTarget/{_V3}patientRole")
    if role is not None:
        for ident in role.findall(f"{_V3}id"):
            oid = ident.get("root", "")
            if oid in KINDS:
                try:
                    candidate = parse_ins(ident.get("extension", ""), oid)
                except InsError as exc:
                    ins_error = str(exc)
                    continue
                if ins is None or (ins.kind == "nia" and candidate.kind != "nia"):
                    ins = candidate
        patient = role.find(f"{_V3}patient")
        if patient is not None:
            traits = _has_traits(patient)
    rpps = None
    for ident in root.findall(f"{_V3}author/{_V3}assignedAuthor/{_V3}id"):
        ext = ident.get("extension", "")
        if ident.get("root") == RPPS_ROOT and len(ext) == 12 and ext.startswith("8") and ext.isdigit():
            rpps = ext[1:]
            break
    media = None
    body = root.find(f"{_V3}component/{_V3}nonXMLBody/{_V3}text")
    if body is not None:
        media = body.get("mediaType")
    return CdaHeader(code, system, title is not None and bool((title.text or "").strip()), ins, ins_error,
                     traits, rpps, media)


def _has_traits(patient: Element) -> bool:
    birth_name = given = False
    for name in patient.findall(f"{_V3}name"):
        for family in name.findall(f"{_V3}family"):
            if (family.text or "").strip() and family.get("qualifier", "BR") in ("BR", "SP"):
                birth_name = True
        if any((g.text or "").strip() for g in name.findall(f"{_V3}given")):
            given = True
    gender = patient.find(f"{_V3}administrativeGenderCode")
    birth = patient.find(f"{_V3}birthTime")
    return (birth_name and given and gender is not None and bool(gender.get("code"))
            and birth is not None and bool(birth.get("value")))


@dataclass(frozen=True)
class Patient:
    """The patient's identity as the INS referential lists its traits (for a qualified INS)."""

    ins: Ins
    family: str = ""  # birth name
    given: str = ""  # first given name
    birth_date: str = ""  # YYYYMMDD
    gender: str = ""  # M, F or U


@dataclass(frozen=True)
class Author:
    rpps: str | None = None
    family: str = ""
    given: str = ""
    organisation: str = ""


def build_n1(pdf: bytes, *, patient: Patient, author: Author, loinc: str, title: str,
             now: datetime | None = None, document_id: str | None = None) -> bytes:
    """A CDA R2 document of level 1 (CI-SIS structuration minimale) wrapping ``pdf``."""
    moment = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S+0000")
    doc_id = document_id or str(uuid.uuid4())
    ET_NS = {"xmlns": NS, "xmlns:xsi": XSI}
    root = Element("ClinicalDocument", ET_NS)
    SubElement(root, "realmCode", code="FR")
    SubElement(root, "typeId", root="2.16.840.1.113883.1.3", extension="POCD_HD000040")
    SubElement(root, "templateId", root=CISIS_HEADER_TEMPLATE)
    SubElement(root, "id", root="2.25", extension=str(uuid.UUID(doc_id).int))
    SubElement(root, "code", code=loinc, codeSystem=LOINC_OID, displayName=label(loinc))
    SubElement(root, "title").text = title
    SubElement(root, "effectiveTime", value=moment)
    SubElement(root, "confidentialityCode", code="N", codeSystem="2.16.840.1.113883.5.25")
    SubElement(root, "languageCode", code="fr-FR")
    SubElement(root, "setId", root="2.25", extension=str(uuid.UUID(doc_id).int))
    SubElement(root, "versionNumber", value="1")
    role = SubElement(SubElement(root, "recordTarget"), "patientRole")
    SubElement(role, "id", root=patient.ins.oid, extension=patient.ins.nir)
    person = SubElement(role, "patient")
    name = SubElement(person, "name")
    if patient.given:
        SubElement(name, "given").text = patient.given
    if patient.family:
        SubElement(name, "family", qualifier="BR").text = patient.family
    if patient.gender:
        SubElement(person, "administrativeGenderCode", code=patient.gender, codeSystem="2.16.840.1.113883.5.1")
    if patient.birth_date:
        SubElement(person, "birthTime", value=patient.birth_date)
    author_el = SubElement(root, "author")
    SubElement(author_el, "time", value=moment)
    assigned = SubElement(author_el, "assignedAuthor")
    if author.rpps:
        SubElement(assigned, "id", root=RPPS_ROOT, extension="8" + author.rpps)
    else:
        SubElement(assigned, "id", nullFlavor="UNK")
    if author.family or author.given:
        who = SubElement(SubElement(assigned, "assignedPerson"), "name")
        if author.given:
            SubElement(who, "given").text = author.given
        if author.family:
            SubElement(who, "family").text = author.family
    custodian = SubElement(SubElement(SubElement(root, "custodian"), "assignedCustodian"),
                           "representedCustodianOrganization")
    SubElement(custodian, "id", nullFlavor="UNK")
    if author.organisation:
        SubElement(custodian, "name").text = author.organisation
    body = SubElement(SubElement(root, "component"), "nonXMLBody")
    text = SubElement(body, "text", mediaType="application/pdf", representation="B64")
    text.text = base64.b64encode(pdf).decode("ascii")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + bytes(tostring(root, encoding="utf-8", xml_declaration=False))


def wrapped_pdf(data: bytes) -> bytes | None:
    """The PDF inside a level 1 CDA, or None (used by tests and by readers of the package)."""
    root = parse_tree(data)
    text = root.find(f"{_V3}component/{_V3}nonXMLBody/{_V3}text")
    if text is None or text.get("mediaType") != "application/pdf" or text.get("representation") != "B64":
        return None
    return base64.b64decode("".join((text.text or "").split()))
