"""Test packages written by hand from the specifications, independent of ``gateway.documents``' writer.

A CDA R2 header as the CI-SIS "structuration minimale" describes it, and an IHE XDM zip
(ITI TF-2b 3.32: INDEX.HTM, README.TXT, IHE_XDM/SUBSET01/METADATA.XML with an ebRIM
SubmitObjectsRequest whose ExtrinsicObjects carry URI, size and SHA-1 hash slots). Each knob
makes one thing wrong so that a test can show the checker notices exactly that.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from email.message import EmailMessage
from email.policy import SMTP

#: A test patient's NIR (key 89 = 97 - 2790351215189 mod 97) and the test INS authority.
NIR = "279035121518989"
TEST_OID = "1.2.250.1.213.1.4.10"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def corsica_nir() -> str:
    """A NIR born in Corse-du-Sud: the key counts department 2A as 19 (INS referential)."""
    first = "18502" + "2A" + "123456"  # sex, year, month, department 2A, commune and order
    key = 97 - int(first.replace("2A", "19")) % 97
    return f"{first}{key:02d}"


def cda(*, nir: str = NIR, oid: str = TEST_OID, code: str = "57833-6", traits: bool = True,
        rpps: str = "10000000009", extra: str = "", prolog: str = "") -> bytes:
    patient = ("<name><given>Jeanne</given><family qualifier=\"BR\">Patiente-Test</family></name>"
               "<administrativeGenderCode code=\"F\" codeSystem=\"2.16.840.1.113883.5.1\"/>"
               "<birthTime value=\"19790328\"/>") if traits else "<name><given>Jeanne</given></name>"
    text = f"""<?xml version="1.0" encoding="UTF-8"?>{prolog}
<ClinicalDocument xmlns="urn:hl7-org:v3">
  <realmCode code="FR"/>
  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
  <templateId root="1.2.250.1.213.1.1.1.1"/>
  <id root="1.2.3.4" extension="1"/>
  <code code="{code}" codeSystem="2.16.840.1.113883.6.1" displayName="Prescription"/>
  <title>Ordonnance de test{extra}</title>
  <effectiveTime value="20261129120000+0100"/>
  <confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>
  <recordTarget><patientRole><id root="{oid}" extension="{nir}"/><patient>{patient}</patient></patientRole></recordTarget>
  <author><time value="20261129120000+0100"/><assignedAuthor>
    <id root="1.2.250.1.71.4.2.1" extension="8{rpps}"/></assignedAuthor></author>
  <component><nonXMLBody><text mediaType="application/pdf" representation="B64">{base64.b64encode(PDF).decode()}</text></nonXMLBody></component>
</ClinicalDocument>
"""
    return text.encode()


def metadata(files: list[tuple[str, bytes, str]], *, nir: str = NIR, oid: str = TEST_OID, code: str = "57833-6",
             size_delta: int = 0, bad_hash: bool = False) -> bytes:
    """METADATA.XML for (uri, content, mime) files, the first one typed ``code``."""
    entries = []
    for number, (uri, content, mime) in enumerate(files, start=1):
        digest = hashlib.sha1(content).hexdigest()  # noqa: S324 (XDS's document hash is SHA-1)
        if bad_hash:
            digest = "0" * 40
        type_code = (f'<rim:Classification id="t{number}" classificationScheme="urn:uuid:f0306f51-975f-434e-a61c-c59651d33983" '
                     f'classifiedObject="Doc{number}" nodeRepresentation="{code}"><rim:Slot name="codingScheme">'
                     f'<rim:ValueList><rim:Value>2.16.840.1.113883.6.1</rim:Value></rim:ValueList></rim:Slot>'
                     f'</rim:Classification>') if number == 1 else ""
        entries.append(f"""
  <rim:ExtrinsicObject id="Doc{number}" mimeType="{mime}" objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1">
    <rim:Slot name="hash"><rim:ValueList><rim:Value>{digest}</rim:Value></rim:ValueList></rim:Slot>
    <rim:Slot name="size"><rim:ValueList><rim:Value>{len(content) + size_delta}</rim:Value></rim:ValueList></rim:Slot>
    <rim:Slot name="URI"><rim:ValueList><rim:Value>{uri}</rim:Value></rim:ValueList></rim:Slot>
    {type_code}
    <rim:ExternalIdentifier id="p{number}" registryObject="Doc{number}" identificationScheme="urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427" value="{nir}^^^&amp;{oid}&amp;ISO"/>
  </rim:ExtrinsicObject>""")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<lcm:SubmitObjectsRequest xmlns:lcm="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0" xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0">
 <rim:RegistryObjectList>{''.join(entries)}
  <rim:RegistryPackage id="SS">
    <rim:ExternalIdentifier id="ssp" registryObject="SS" identificationScheme="urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446" value="{nir}^^^&amp;{oid}&amp;ISO"/>
  </rim:RegistryPackage>
 </rim:RegistryObjectList>
</lcm:SubmitObjectsRequest>
""".encode()


def package(*, document: bytes | None = None, meta: bytes | None = None, extra: dict[str, bytes] | None = None,
            **meta_args: object) -> bytes:
    """An IHE_XDM.ZIP with one CDA document (DOC0001.XML)."""
    doc = document if document is not None else cda()
    meta = meta if meta is not None else metadata([("DOC0001.XML", doc, "text/xml")], **meta_args)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("INDEX.HTM", "<html><body>IHE XDM</body></html>")
        z.writestr("README.TXT", "IHE XDM test package")
        z.writestr("IHE_XDM/SUBSET01/METADATA.XML", meta)
        z.writestr("IHE_XDM/SUBSET01/DOC0001.XML", doc)
        for name, content in (extra or {}).items():
            z.writestr(name, content)
    return buffer.getvalue()


def message(zip_bytes: bytes | None = None, *, headers: dict[str, str] | None = None,
            sender: str = "anne.martin@a.mssante.test", to: str = "secretariat@a.mssante.test") -> bytes:
    """A submission-ready message carrying ``zip_bytes`` as IHE_XDM.ZIP (or none)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "Document"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content("Document joint.\n", cte="quoted-printable")
    if zip_bytes is not None:
        msg.add_attachment(zip_bytes, maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
    return msg.as_bytes()
