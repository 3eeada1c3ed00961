"""Find the IHE XDM packages of a message, check them, and say what they carry (without content).

A package is a MIME leaf whose decoded body is a zip naming an ``IHE_XDM/`` folder (Référentiel
socle MSSanté #2 names the attachment ``IHE_XDM.ZIP``; the name is not relied on, the central
directory is). The message's ``X-MSS-CODECDA`` and ``X-MSS-INS`` fields (Ref. #2 ECO.2.4.1,
ECO.2.4.2: the CDA type codes, comma-separated; ``O`` when a qualified INS is in the package,
else ``N``) are read alongside, so that policy can compare what the client announced with what
the package holds.

The result (``MessageDocuments``) holds codes, kinds and booleans, and the INS only inside
``Ins`` values whose ``repr`` hides the number: it can be logged by mistake without leaking.
Parsing the MIME tree and inflating zips is CPU work: callers run ``inspect_message`` off the
event loop; the caller bounds the message size, this module bounds everything inside it.
"""

from __future__ import annotations

import binascii
import io
import re
import zipfile
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from gateway.documents.ins import Ins
from gateway.documents.xdm import (
    DEFAULT_LIMITS,
    ZIP_ERRORS,
    Limits,
    XdmError,
    XdmPackage,
    is_xdm,
    read_package,
)
from gateway.policy.documents import DocumentFacts

#: At most this many packages are read in one message; more is refused as a whole.
MAX_PACKAGES = 8
#: A zip attachment is only opened when its decoded size is under the package bound.
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class MessageDocuments:
    """What the XDM packages of one message carry, and what its X-MSS fields announce."""

    packages: tuple[XdmPackage, ...] = ()
    error: str | None = None  # the first package that failed its checks, and why (no content)
    ins_problems: tuple[str, ...] = ()  # malformed INS found in packages
    header_codecda: tuple[str, ...] | None = None  # None: the field is absent
    header_ins: str | None = None
    codecda_fields: int = 0  # X-MSS-CODECDA fields present (at most one is allowed)
    ins_fields: int = 0

    @property
    def cda_codes(self) -> tuple[str, ...]:
        """The CDA type codes in order of appearance, without repeats."""
        codes: list[str] = []
        for package in self.packages:
            for doc in package.cda_documents:
                assert doc.cda is not None
                if doc.cda.code and doc.cda.code not in codes:
                    codes.append(doc.cda.code)
        return tuple(codes)

    @property
    def has_cda(self) -> bool:
        return any(p.cda_documents for p in self.packages)

    @property
    def qualified_ins(self) -> bool:
        return any(doc.cda is not None and doc.cda.qualified_ins for p in self.packages for doc in p.cda_documents)

    @property
    def patients(self) -> tuple[Ins, ...]:
        """Every patient the packages name (submission sets, documents' metadata, CDA headers),
        each once: one message is about one patient, so more than one is a fact policy refuses."""
        found: list[Ins] = []
        for package in self.packages:
            named = [package.patient, *(d.patient for d in package.documents),
                     *(d.cda.ins for d in package.documents if d.cda is not None)]  # fmt: skip
            found.extend(ins for ins in named if ins is not None and ins not in found)
        return tuple(found)

    @property
    def patient(self) -> Ins | None:
        """The one patient of the packages (metadata or CDA), or None."""
        patients = self.patients
        return patients[0] if patients else None

    @property
    def authors(self) -> tuple[str, ...]:
        """RPPS numbers of the CDA documents' authors."""
        return tuple(dict.fromkeys(d.cda.author_rpps for p in self.packages for d in p.cda_documents
                                   if d.cda is not None and d.cda.author_rpps))

    def policy_facts(self) -> DocumentFacts:
        """The facts ``gateway.policy.documents`` decides on (codes, counts and kinds; no INS)."""
        patient = self.patient
        return DocumentFacts(
            packages=len(self.packages), documents=sum(len(p.documents) for p in self.packages), error=self.error,
            ins_problems=self.ins_problems, has_cda=self.has_cda, cda_codes=self.cda_codes,
            qualified_ins=self.qualified_ins, ins_kind=patient.kind if patient is not None else "",
            header_codecda=self.header_codecda, header_ins=self.header_ins, codecda_fields=self.codecda_fields,
            ins_fields=self.ins_fields, patient_nir=patient.nir if patient is not None else None,
            patients=len(self.patients))

    def expected_headers(self) -> list[tuple[str, str]]:
        """The X-MSS fields Ref. #2 ECO.2.4.1/2 asks for, from the packages (none without a CDA)."""
        return list(self.policy_facts().expected_headers().items())


def _header_values(message: Message, name: str) -> list[str]:
    return [str(v) for v in (message.get_all(name) or [])]


#: Bounds of the MIME walk (the edge's content rules bound the same shapes earlier).
MAX_DEPTH = 16
MAX_LEAVES = 2000


def _split_entity(entity: bytes) -> tuple[Message, bytes]:
    """(headers, body) of one MIME entity; only the header block goes through the email parser."""
    if entity.startswith(b"\r\n"):
        return BytesHeaderParser(policy=compat32).parsebytes(b""), entity[2:]
    end = entity.find(b"\r\n\r\n")
    block, body = (entity, b"") if end < 0 else (entity[:end + 2], entity[end + 4:])
    return BytesHeaderParser(policy=compat32).parsebytes(block), body


def _parts(body: bytes, boundary: str) -> list[bytes]:
    """The body parts of a multipart body (RFC 2046 5.1.1), found with bytes.find (linear, in C)."""
    delim = b"--" + boundary.encode("ascii", "replace")
    parts: list[bytes] = []
    start: int | None = None
    pos = 0
    while True:
        at = body.find(delim, pos)
        if at < 0:
            break
        pos = at + len(delim)
        if at and body[at - 2:at] != b"\r\n":
            continue
        eol = body.find(b"\r\n", pos)
        rest = body[pos:eol if eol >= 0 else len(body)]
        closing = rest.startswith(b"--")
        if rest.strip(b" \t") and not closing:
            continue  # a line that only starts like the delimiter
        if start is not None:
            parts.append(body[start:max(start, at - 2)])
        if closing or eol < 0:
            break
        start = eol + 2
        pos = start
    return parts


def _leaves(entity: bytes, depth: int, out: list[tuple[Message, bytes]]) -> None:
    headers, body = _split_entity(entity)
    if headers.get_content_maintype() == "multipart":
        boundary = headers.get_boundary()
        if boundary and depth < MAX_DEPTH:
            for part in _parts(body, boundary):
                if len(out) >= MAX_LEAVES:
                    return
                _leaves(part, depth + 1, out)
        return
    out.append((headers, body))


def _zip_payload(headers: Message, body: bytes) -> bytes | None:
    """The decoded body when it is a zip, without decoding anything else."""
    cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        if body.lstrip()[:5] != b"UEsDB":
            return None
        return binascii.a2b_base64(body)
    if cte == "quoted-printable":
        decoded = binascii.a2b_qp(body)
        return decoded if decoded.startswith(_ZIP_MAGIC) else None
    return body if body.startswith(_ZIP_MAGIC) else None


#: The attachment name Référentiel socle MSSanté #2 gives the package.
XDM_ATTACHMENT = "IHE_XDM.ZIP"
_NAME_PARAM = re.compile(r'(?i)\b(?:file)?name\*?=\s*"?([^";\r\n]*)')


def _named_package(headers: Message) -> bool:
    """Whether a leaf calls itself ``IHE_XDM.ZIP`` (Content-Disposition filename or Content-Type name)."""
    for field in ("content-disposition", "content-type"):
        for match in _NAME_PARAM.finditer(str(headers.get(field, ""))):
            if match.group(1).strip().rsplit("'", 1)[-1].upper() == XDM_ATTACHMENT:
                return True
    return False


def _readable_zip(payload: bytes | None) -> bool:
    """Whether ``payload`` is a zip whose central directory can be read (a valid zip of other files
    is simply not a package; bytes that are no zip at all under the package's name are a failure)."""
    if payload is None:
        return False
    try:
        zipfile.ZipFile(io.BytesIO(payload)).close()
    except ZIP_ERRORS:  # also NotImplementedError: a zip "version" zipfile does not read
        return False
    return True


def inspect_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> MessageDocuments:
    """The packages of a message, checked; never raises for bad content (the error is a fact)."""
    if b"\r\n" not in data:
        data = data.replace(b"\n", b"\r\n")  # an opened message may come back with bare LF
    leaves: list[tuple[Message, bytes]] = []
    _leaves(data, 0, leaves)
    message, _ = _split_entity(data)
    codecda = _header_values(message, "X-MSS-CODECDA")
    ins_fields = _header_values(message, "X-MSS-INS")
    header_codecda = None
    if codecda:
        header_codecda = tuple(c.strip() for value in codecda for c in value.replace("\r\n", "").split(",")
                               if c.strip())
    header_ins = " ".join(v.strip() for v in ins_fields) if ins_fields else None
    packages: list[XdmPackage] = []
    problems: list[str] = []
    error: str | None = None
    found = 0
    for headers, body in leaves:
        payload = _zip_payload(headers, body)
        if payload is None or not is_xdm(payload):
            if _named_package(headers) and not _readable_zip(payload):  # announced, and corrupt: a failed check
                found += 1
                error = f"package {found}: the attachment named {XDM_ATTACHMENT} is not a readable IHE XDM zip"
                break
            continue
        found += 1
        if found > MAX_PACKAGES:
            error = f"more than {MAX_PACKAGES} IHE XDM packages in one message"
            break
        try:
            package = read_package(payload, limits)
        except XdmError as exc:
            error = f"package {found}: {exc}"
            break
        packages.append(package)
        problems.extend(f"package {found}: {p}" for p in package.problems)
    return MessageDocuments(tuple(packages), error, tuple(problems), header_codecda, header_ins, len(codecda),
                            len(ins_fields))
