"""Read, check and write IHE XDM packages (``IHE_XDM.ZIP``) as MSSanté messages carry them.

Sources: IHE ITI TF-1 16 and TF-2b 3.32 (XDM, Distribute Document Set on Media): the zip holds
``INDEX.HTM`` and ``README.TXT`` at its root and one folder per submission set,
``IHE_XDM/SUBSET01/``, with ``METADATA.XML`` (an ebRIM 3.0 ``lcm:SubmitObjectsRequest``, ITI
TF-3 4.2) and the documents it lists. Each document entry (``rim:ExtrinsicObject``) names its
file in the ``URI`` slot and states its ``size`` (bytes) and ``hash`` (SHA-1, hex; ITI TF-3
4.2.3.2.11 and 4.2.3.2.18); the patient is the ``XDSDocumentEntry.patientId`` external
identifier (``NIR^^^&OID&ISO``). Référentiel socle MSSanté #2 (ECO.2.4) and its annex on IHE
XDM make this the envelope of health documents between MSSanté clients; the CDA inside
follows the CI-SIS (``gateway.documents.cda``).

A zip is untrusted input: its central directory is checked *before* anything is inflated
(entry count, declared sizes, compression ratio, names: no absolute path, no ``..``, no
backslash, no drive, no control character, no duplicate; no encryption; stored or deflated
only), then each entry is read in bounded chunks that stop at the declared size and at the
package's total, so a lying header cannot inflate more than the bounds. Problems raise
``XdmError`` whose text names the rule and never a file name or content.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.etree.ElementTree import Element, SubElement, tostring  # writing; parsing is defusedxml's

from gateway.core.errors import ContentError
from gateway.documents.cda import CdaError, CdaHeader, parse_tree, read_header
from gateway.documents.ins import Ins, InsError, parse_cx
from gateway.documents.loinc import valid_code

LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
_R = f"{{{RIM}}}"
#: ITI TF-3 4.2.5: the objectType of a stable DocumentEntry, and identification schemes.
DOCUMENT_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
DE_TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
SS_CLASSIFICATION = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_CONTENT_TYPE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
SUBSET = "IHE_XDM/SUBSET01/"
METADATA = SUBSET + "METADATA.XML"


@dataclass(frozen=True)
class Limits:
    """Bounds of one package, checked on the central directory and again while reading."""

    max_entries: int = 256
    max_entry_bytes: int = 32 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024
    max_ratio: int = 100  # uncompressed / compressed, for entries over ratio_floor bytes
    ratio_floor: int = 64 * 1024
    max_name_length: int = 255
    chunk: int = 64 * 1024


DEFAULT_LIMITS = Limits()


#: What the standard library may raise on a corrupt archive (zipfile, zlib, struct, name decoding).
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, zlib.error, struct.error,
               NotImplementedError, RuntimeError, KeyError)


class XdmError(ContentError, ValueError):
    """The package is unsafe or inconsistent; the message names the rule (never content)."""


@dataclass(frozen=True)
class XdmDocument:
    """One document of the package as its metadata describes it and as it was found."""

    uri: str
    mime_type: str
    size: int
    sha1: str
    type_code: str | None  # XDSDocumentEntry.typeCode (LOINC)
    patient: Ins | None
    cda: CdaHeader | None  # for text/xml documents that are CDA R2


@dataclass(frozen=True)
class XdmPackage:
    documents: tuple[XdmDocument, ...]
    patient: Ins | None  # the submission set's patient
    entries: int
    total_bytes: int
    problems: tuple[str, ...] = field(default=())  # malformed INS found (the package is still readable)

    @property
    def cda_documents(self) -> tuple[XdmDocument, ...]:
        return tuple(d for d in self.documents if d.cda is not None)


_DRIVE = re.compile(r"^[A-Za-z]:")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def check_name(name: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """An entry name safe to write anywhere, or ``XdmError`` (path traversal, absolute, backslash)."""
    if not name or len(name) > limits.max_name_length:
        raise XdmError("zip entry name empty or too long")
    if _BAD_CHARS.search(name):
        raise XdmError("zip entry name with a backslash or a control character")
    if name.startswith("/") or _DRIVE.match(name):
        raise XdmError("zip entry name is an absolute path")
    if any(part in ("..", ".") for part in name.split("/")):
        raise XdmError("zip entry name with '..' or '.' (path traversal)")


def _directory(data: bytes, limits: Limits) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive and its entries once the central directory passes every bound."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except ZIP_ERRORS:
        raise XdmError("not a readable zip archive") from None
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise XdmError(f"zip has more than {limits.max_entries} entries")
    seen: set[str] = set()
    total = 0
    for info in infos:
        check_name(info.filename, limits)
        folded = info.filename.lower()
        if folded in seen:
            raise XdmError("zip has two entries with the same name")
        seen.add(folded)
        if info.flag_bits & 0x1:
            raise XdmError("zip entry is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise XdmError("zip entry uses a compression method other than stored or deflate")
        if info.file_size > limits.max_entry_bytes:
            raise XdmError(f"zip entry larger than {limits.max_entry_bytes} bytes")
        if info.file_size > limits.ratio_floor and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise XdmError(f"zip entry compressed more than {limits.max_ratio} to 1 (zip bomb)")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise XdmError(f"zip expands to more than {limits.max_total_bytes} bytes")
    return archive, infos


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, limits: Limits) -> bytes:
    """An entry's bytes, read in chunks and never past its declared size or the package budget."""
    allowed = min(info.file_size, budget)
    out = bytearray()
    try:
        with archive.open(info) as stream:
            while True:
                chunk = stream.read(limits.chunk)
                if not chunk:
                    break
                out += chunk
                if len(out) > allowed:
                    raise XdmError("zip entry inflates past its declared size or the package bound")
    except XdmError:
        raise
    except ZIP_ERRORS:
        raise XdmError("zip entry is corrupt (bad data or CRC)") from None
    return bytes(out)


def is_xdm(data: bytes) -> bool:
    """A zip whose central directory names an ``IHE_XDM/`` folder (cheap: nothing is inflated)."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except ZIP_ERRORS:
        return False
    return any(n.upper().startswith("IHE_XDM/") for n in names[:DEFAULT_LIMITS.max_entries + 1])


def safe_entries(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """Every entry of a zip, checked and read under ``limits`` (name -> bytes), or ``XdmError``."""
    archive, infos = _directory(data, limits)
    out: dict[str, bytes] = {}
    budget = limits.max_total_bytes
    with archive:
        for info in infos:
            if info.is_dir():
                continue
            content = _read_entry(archive, info, budget, limits)
            budget -= len(content)
            out[info.filename] = content
    return out


def _slot(element: object, name: str) -> list[str]:
    from xml.etree.ElementTree import Element

    assert isinstance(element, Element)
    for slot in element.findall(f"{_R}Slot"):
        if slot.get("name") == name:
            return [(v.text or "").strip() for v in slot.findall(f"{_R}ValueList/{_R}Value")]
    return []


def read_package(data: bytes, limits: Limits = DEFAULT_LIMITS) -> XdmPackage:
    """A checked XDM package: safe zip, well-formed METADATA.XML, documents matching sizes and hashes."""
    entries = safe_entries(data, limits)
    by_upper = {name.upper(): name for name in entries}
    meta_name = by_upper.get(METADATA)
    if meta_name is None:
        raise XdmError("package has no IHE_XDM/SUBSET01/METADATA.XML")
    try:
        root = parse_tree(entries[meta_name])
    except CdaError as exc:
        raise XdmError(f"METADATA.XML: {exc}") from None
    if root.tag != f"{{{LCM}}}SubmitObjectsRequest":
        raise XdmError("METADATA.XML is not an ebRIM SubmitObjectsRequest")
    objects = root.find(f"{_R}RegistryObjectList")
    if objects is None:
        raise XdmError("METADATA.XML has no RegistryObjectList")
    problems: list[str] = []
    documents: list[XdmDocument] = []
    for number, extrinsic in enumerate(objects.findall(f"{_R}ExtrinsicObject"), start=1):
        documents.append(_document(extrinsic, number, entries, by_upper, problems))
    if not documents:
        raise XdmError("METADATA.XML lists no document")
    set_patient = None
    for package in objects.findall(f"{_R}RegistryPackage"):
        for ext in package.findall(f"{_R}ExternalIdentifier"):
            if ext.get("identificationScheme") == SS_PATIENT_ID:
                try:
                    set_patient = parse_cx(ext.get("value", ""))
                except InsError as exc:
                    problems.append(f"submission set patient: {exc}")
    patients = {d.patient for d in documents if d.patient is not None} | ({set_patient} if set_patient else set())
    if len(patients) > 1:
        raise XdmError("METADATA.XML names more than one patient")
    for doc in documents:
        if doc.cda is not None and doc.cda.ins is not None and doc.patient is not None and doc.cda.ins != doc.patient:
            raise XdmError("a CDA document's INS differs from its metadata's patient")
    return XdmPackage(tuple(documents), set_patient, len(entries), sum(map(len, entries.values())), tuple(problems))


def _document(extrinsic: object, number: int, entries: dict[str, bytes], by_upper: dict[str, str],
              problems: list[str]) -> XdmDocument:
    from xml.etree.ElementTree import Element

    assert isinstance(extrinsic, Element)
    where = f"document {number}"
    uris = _slot(extrinsic, "URI")
    if len(uris) != 1 or not uris[0]:
        raise XdmError(f"{where}: metadata has no URI slot")
    uri = uris[0]
    try:
        check_name(uri)
    except XdmError as exc:
        raise XdmError(f"{where}: URI {exc}") from None
    name = by_upper.get((SUBSET + uri).upper())
    if name is None:
        raise XdmError(f"{where}: the file its metadata names is not in the package")
    content = entries[name]
    sizes, hashes = _slot(extrinsic, "size"), _slot(extrinsic, "hash")
    if len(sizes) != 1 or not sizes[0].isdigit() or int(sizes[0]) != len(content):
        raise XdmError(f"{where}: size in METADATA.XML differs from the file's")
    sha1 = hashlib.sha1(content, usedforsecurity=False).hexdigest()
    if len(hashes) != 1 or hashes[0].lower() != sha1:
        raise XdmError(f"{where}: hash in METADATA.XML differs from the file's SHA-1")
    type_code = None
    for classification in extrinsic.findall(f"{_R}Classification"):
        if classification.get("classificationScheme") == DE_TYPE_CODE:
            type_code = classification.get("nodeRepresentation")
    patient = None
    for ext in extrinsic.findall(f"{_R}ExternalIdentifier"):
        if ext.get("identificationScheme") == DE_PATIENT_ID:
            try:
                patient = parse_cx(ext.get("value", ""))
            except InsError as exc:
                problems.append(f"{where} patient: {exc}")
    mime = extrinsic.get("mimeType", "")
    cda = None
    if mime in ("text/xml", "application/xml") or uri.upper().endswith(".XML"):
        try:
            cda = read_header(content)
        except CdaError as exc:
            if "not a CDA R2 document" not in str(exc):
                raise XdmError(f"{where}: {exc}") from None
        if cda is not None:
            if cda.code is not None and not valid_code(cda.code):
                raise XdmError(f"{where}: the CDA code is not a document type code (LOINC or CI-SIS)")
            if cda.ins_error:
                problems.append(f"{where} CDA patient: {cda.ins_error}")
            if type_code and cda.code and type_code != cda.code:
                raise XdmError(f"{where}: typeCode in METADATA.XML differs from the CDA code")
    return XdmDocument(uri, mime, len(content), sha1, type_code, patient, cda)


# --- writing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewDocument:
    """A document to put into a package: its file name in SUBSET01, bytes, media type, LOINC type."""

    filename: str
    content: bytes
    mime_type: str
    type_code: str | None = None
    title: str = ""


def _add_slot(parent: Element, name: str, *values: str) -> None:
    slot = SubElement(parent, "rim:Slot", name=name)
    value_list = SubElement(slot, "rim:ValueList")
    for value in values:
        SubElement(value_list, "rim:Value").text = value


def _add_classification(parent: Element, scheme: str, obj: str, code: str, system: str, display: str,
                        number: int) -> None:
    cls = SubElement(parent, "rim:Classification", id=f"cl{number:02d}", classificationScheme=scheme,
                     classifiedObject=obj, nodeRepresentation=code)
    _add_slot(cls, "codingScheme", system)
    SubElement(SubElement(cls, "rim:Name"), "rim:LocalizedString", value=display)


def metadata_xml(documents: list[NewDocument], patient: Ins, *, source_oid: str, unique_root: str,
                 now: datetime | None = None, author_rpps: str | None = None) -> bytes:
    """METADATA.XML for ``documents`` (ITI TF-3 4.2): one submission set, one DocumentEntry each."""
    from gateway.documents.ins import to_cx
    from gateway.documents.loinc import LOINC_OID, label

    moment = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    cx = to_cx(patient)
    root = Element("lcm:SubmitObjectsRequest", {"xmlns:lcm": LCM, "xmlns:rim": RIM})
    objects = SubElement(root, "rim:RegistryObjectList")
    counter = 0
    for number, doc in enumerate(documents, start=1):
        doc_id = f"Document{number:02d}"
        extrinsic = SubElement(objects, "rim:ExtrinsicObject", id=doc_id, mimeType=doc.mime_type,
                               objectType=DOCUMENT_ENTRY)
        _add_slot(extrinsic, "creationTime", moment)
        _add_slot(extrinsic, "hash", hashlib.sha1(doc.content, usedforsecurity=False).hexdigest())
        _add_slot(extrinsic, "languageCode", "fr-FR")
        _add_slot(extrinsic, "size", str(len(doc.content)))
        _add_slot(extrinsic, "sourcePatientId", cx)
        _add_slot(extrinsic, "URI", doc.filename)
        if doc.title:
            SubElement(SubElement(extrinsic, "rim:Name"), "rim:LocalizedString", value=doc.title)
        if author_rpps:
            counter += 1
            author = SubElement(extrinsic, "rim:Classification", id=f"cl{counter:02d}",
                                classificationScheme="urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d",
                                classifiedObject=doc_id, nodeRepresentation="")
            _add_slot(author, "authorPerson", f"8{author_rpps}^^^^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^^IDNPS")
        if doc.type_code:
            counter += 1
            _add_classification(extrinsic, DE_TYPE_CODE, doc_id, doc.type_code, LOINC_OID, label(doc.type_code),
                                counter)
        counter += 1
        # XDS-SD for a CDA wrapping a PDF (CI-SIS N1); a bare file is described by its mime type (ITI TF-3 4.2.3.2.9).
        fmt = "urn:ihe:iti:xds-sd:pdf:2008" if doc.type_code else "urn:ihe:iti:xds:2017:mimeTypeSufficient"
        _add_classification(extrinsic, DE_FORMAT_CODE, doc_id, fmt, "1.3.6.1.4.1.19376.1.2.3", fmt, counter)
        SubElement(extrinsic, "rim:ExternalIdentifier", id=f"ei{number:02d}p", registryObject=doc_id,
                   identificationScheme=DE_PATIENT_ID, value=cx)
        SubElement(extrinsic, "rim:ExternalIdentifier", id=f"ei{number:02d}u", registryObject=doc_id,
                   identificationScheme=DE_UNIQUE_ID, value=f"{unique_root}.{number}")
    package = SubElement(objects, "rim:RegistryPackage", id="SubmissionSet01")
    _add_slot(package, "submissionTime", moment)
    counter += 1
    SubElement(package, "rim:Classification", id=f"cl{counter:02d}", classifiedObject="SubmissionSet01",
               classificationNode=SS_CLASSIFICATION)
    SubElement(package, "rim:ExternalIdentifier", id="eiSSp", registryObject="SubmissionSet01",
               identificationScheme=SS_PATIENT_ID, value=cx)
    SubElement(package, "rim:ExternalIdentifier", id="eiSSu", registryObject="SubmissionSet01",
               identificationScheme=SS_UNIQUE_ID, value=f"{unique_root}.0")
    SubElement(package, "rim:ExternalIdentifier", id="eiSSs", registryObject="SubmissionSet01",
               identificationScheme=SS_SOURCE_ID, value=source_oid)
    for number in range(1, len(documents) + 1):
        assoc = SubElement(objects, "rim:Association", id=f"as{number:02d}", associationType=HAS_MEMBER,
                           sourceObject="SubmissionSet01", targetObject=f"Document{number:02d}")
        _add_slot(assoc, "SubmissionSetStatus", "Original")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + bytes(tostring(root, encoding="utf-8", xml_declaration=False))


README = """This archive follows IHE ITI XDM (Cross-Enterprise Document Media Interchange).
Documents and their metadata are in IHE_XDM/SUBSET01; METADATA.XML describes them.
Produced by mssgw (MSSanté gateway).
"""

INDEX = """<!DOCTYPE html>
<html lang="fr"><head><meta charset="utf-8"><title>IHE XDM</title></head>
<body><p>Contenu : <a href="README.TXT">README.TXT</a>, <a href="IHE_XDM/SUBSET01/METADATA.XML">METADATA.XML</a></p>
<ul>{items}</ul></body></html>
"""


def write_package(documents: list[NewDocument], patient: Ins, *, source_oid: str, unique_root: str,
                  now: datetime | None = None, author_rpps: str | None = None) -> bytes:
    """The bytes of ``IHE_XDM.ZIP`` holding ``documents`` (deflated, names checked)."""
    for doc in documents:
        check_name(doc.filename)
        if "/" in doc.filename:
            raise XdmError("document file names in SUBSET01 have no folder")
    metadata = metadata_xml(documents, patient, source_oid=source_oid, unique_root=unique_root, now=now,
                            author_rpps=author_rpps)
    items = "".join(f'<li><a href="IHE_XDM/SUBSET01/{d.filename}">{d.filename}</a></li>' for d in documents)
    buffer = io.BytesIO()
    stamp = (now or datetime.now(UTC)).timetuple()[:6]
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        def put(name: str, content: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)

        put("INDEX.HTM", INDEX.format(items=items).encode())
        put("README.TXT", README.encode())
        put(METADATA, metadata)
        for doc in documents:
            put(SUBSET + doc.filename, doc.content)
    return buffer.getvalue()
