"""IHE XDM packages: read and checked from hand-built packages, and malformed ones refused for the right reason.

Zip bombs, path traversal, lying sizes, entity expansion, wrong hashes and INS keys: each is
built by the test with the standard library (or the ``zip`` tool), never by the code under test.
``unzip -t`` and ``openssl dgst -sha1`` judge what our writer produces.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.documents.cda import Author, CdaError, build_n1, read_header, wrapped_pdf
from gateway.documents.cda import Patient as CdaPatient
from gateway.documents.ins import parse_ins
from gateway.documents.scan import inspect_message
from gateway.documents.xdm import Limits, NewDocument, XdmError, read_package, safe_entries, write_package
from tests.gateway.documents.xdm_samples import NIR, PDF, TEST_OID, cda, message, metadata, package


def test_a_package_built_from_the_specification_is_read() -> None:
    pkg = read_package(package())
    (doc,) = pkg.documents
    assert doc.uri == "DOC0001.XML" and doc.type_code == "57833-6"
    assert doc.cda is not None and doc.cda.code == "57833-6" and doc.cda.author_rpps == "10000000009"
    assert doc.cda.ins == parse_ins(NIR, TEST_OID) and doc.cda.qualified_ins
    assert pkg.patient == parse_ins(NIR, TEST_OID) and pkg.problems == ()


def test_message_scan_finds_the_package_and_the_headers() -> None:
    found = inspect_message(message(package(), headers={"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "O"}))
    assert found.error is None and found.cda_codes == ("57833-6",) and found.qualified_ins
    assert found.header_codecda == ("57833-6",) and found.header_ins == "O"
    assert found.expected_headers() == [("X-MSS-CODECDA", "57833-6"), ("X-MSS-INS", "O")]
    assert inspect_message(message(None)).packages == ()


def test_a_zip_that_is_not_xdm_is_ignored() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("photos/radio.txt", "x")
    assert inspect_message(message(buffer.getvalue())).packages == ()


def _raw_zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as z:
        for name, content in entries.items():
            z.writestr(zipfile.ZipInfo(name), content, compress_type=compression)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "IHE_XDM/../../x", "IHE_XDM\\SUBSET01\\x",
                                  "C:/windows/x", "IHE_XDM/./x", "a\x01b"])
def test_path_traversal_and_odd_names_refused_before_extraction(name: str) -> None:
    data = _raw_zip({"IHE_XDM/SUBSET01/METADATA.XML": metadata([]), name: b"x"})
    with pytest.raises(XdmError, match="name"):
        safe_entries(data)


def test_zip_bomb_by_ratio_refused_before_inflating() -> None:
    data = _raw_zip({"IHE_XDM/SUBSET01/METADATA.XML": b"<x/>", "IHE_XDM/SUBSET01/B.XML": b"\0" * (20 * 1024 * 1024)})
    assert len(data) < 100 * 1024
    with pytest.raises(XdmError, match="zip bomb"):
        safe_entries(data)


def test_total_and_entry_bounds() -> None:
    entries = {f"IHE_XDM/SUBSET01/F{i}.BIN": bytes(range(256)) * 40 for i in range(5)}
    with pytest.raises(XdmError, match="expands to more than"):
        safe_entries(_raw_zip(entries), Limits(max_total_bytes=40_000))
    with pytest.raises(XdmError, match="larger than"):
        safe_entries(_raw_zip(entries), Limits(max_entry_bytes=1000))
    with pytest.raises(XdmError, match="more than 3 entries"):
        safe_entries(_raw_zip(entries), Limits(max_entries=3))


def test_a_lying_declared_size_stops_at_the_bound() -> None:
    """The central directory says 100 bytes; the data inflates to 1 MiB: reading stops, nothing more inflates."""
    data = bytearray(_raw_zip({"IHE_XDM/SUBSET01/METADATA.XML": b"A" * (1024 * 1024)}))
    cd = data.rfind(b"PK\x01\x02")
    lh = data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, cd + 24, 100)  # central directory: uncompressed size
    struct.pack_into("<I", data, lh + 22, 100)  # local header: uncompressed size
    with pytest.raises(XdmError):
        safe_entries(bytes(data))


def test_duplicate_names_and_encryption_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("IHE_XDM/SUBSET01/METADATA.XML", b"<a/>")
        z.writestr("ihe_xdm/subset01/metadata.xml", b"<b/>")
    with pytest.raises(XdmError, match="same name"):
        safe_entries(buffer.getvalue())
    (tmp_path / "IHE_XDM").mkdir()
    (tmp_path / "IHE_XDM" / "A.XML").write_bytes(b"<a/>")
    subprocess.run(["zip", "-q", "-P", "secret", "-r", "enc.zip", "IHE_XDM"], cwd=tmp_path, check=True)
    with pytest.raises(XdmError, match="encrypted"):
        safe_entries((tmp_path / "enc.zip").read_bytes())


def test_wrong_hash_and_wrong_size_refused() -> None:
    with pytest.raises(XdmError, match="hash"):
        read_package(package(bad_hash=True))
    with pytest.raises(XdmError, match="size"):
        read_package(package(size_delta=1))


def test_a_document_changed_after_its_metadata_is_refused() -> None:
    original = cda()
    meta = metadata([("DOC0001.XML", original, "text/xml")])
    with pytest.raises(XdmError, match=r"hash|size"):
        read_package(package(document=original.replace(b"Ordonnance", b"Ordonnancf"), meta=meta))


def test_missing_document_and_missing_metadata() -> None:
    meta = metadata([("DOC0002.XML", cda(), "text/xml")])
    with pytest.raises(XdmError, match="not in the package"):
        read_package(package(meta=meta))
    with pytest.raises(XdmError, match=r"METADATA\.XML"):
        read_package(_raw_zip({"IHE_XDM/SUBSET01/DOC0001.XML": cda()}))


BILLION_LAUGHS = """
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>"""
EXTERNAL = '\n<!DOCTYPE x [<!ENTITY ext SYSTEM "file:///etc/passwd">]>'


@pytest.mark.parametrize("prolog", [BILLION_LAUGHS, EXTERNAL, '\n<!DOCTYPE x SYSTEM "http://127.0.0.1:9/x.dtd">'])
def test_entities_and_dtds_refused_in_cda_and_metadata(prolog: str) -> None:
    with pytest.raises(CdaError, match="DTD or entity"):
        read_header(cda(prolog=prolog, extra="&lol3;" if "lol" in prolog else ""))
    bad_meta = metadata([("DOC0001.XML", cda(), "text/xml")]).replace(b"?>", b"?>" + prolog.encode(), 1)
    with pytest.raises(XdmError, match="DTD or entity"):
        read_package(package(meta=bad_meta))


def test_deep_nesting_and_malformed_xml() -> None:
    deep = b'<ClinicalDocument xmlns="urn:hl7-org:v3">' + b"<a>" * 200 + b"</a>" * 200 + b"</ClinicalDocument>"
    with pytest.raises(CdaError, match="deeper"):
        read_header(deep)
    with pytest.raises(CdaError, match="well-formed"):
        read_header(b"<ClinicalDocument xmlns='urn:hl7-org:v3'><code></ClinicalDocument>")


def test_wrong_ins_key_is_reported_not_trusted() -> None:
    wrong = NIR[:13] + "88"
    pkg = read_package(package(document=cda(nir=wrong), nir=wrong))
    assert pkg.documents[0].cda is not None and pkg.documents[0].cda.ins is None
    assert pkg.problems and all(wrong not in p and NIR[:13] not in p for p in pkg.problems)
    found = inspect_message(message(package(document=cda(nir=wrong), nir=wrong)))
    assert found.ins_problems and not found.qualified_ins


def test_cda_patient_differs_from_metadata_patient() -> None:
    other = "1" + NIR[1:13]
    other += f"{97 - int(other) % 97:02d}"
    with pytest.raises(XdmError, match="INS differs"):
        read_package(package(document=cda(nir=other)))


def test_ins_without_traits_is_not_qualified() -> None:
    pkg = read_package(package(document=cda(traits=False)))
    assert pkg.documents[0].cda is not None and not pkg.documents[0].cda.qualified_ins


def test_our_writer_passes_unzip_and_openssl(tmp_path: Path) -> None:
    ins = parse_ins(NIR, TEST_OID)
    doc = build_n1(PDF, patient=CdaPatient(ins, "Patiente-Test", "Jeanne", "19790328", "F"),
                   author=Author("10000000009"),
                   loinc="11488-4", title="Compte rendu")
    assert wrapped_pdf(doc) == PDF
    data = write_package([NewDocument("DOC0001.XML", doc, "text/xml", "11488-4")], ins,
                         source_oid="2.25.1", unique_root="2.25.2")
    path = tmp_path / "IHE_XDM.ZIP"
    path.write_bytes(data)
    tested = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True, check=False)
    assert tested.returncode == 0 and "No errors detected" in tested.stdout
    listing = subprocess.run(["unzip", "-Z1", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert listing == ["INDEX.HTM", "README.TXT", "IHE_XDM/SUBSET01/METADATA.XML", "IHE_XDM/SUBSET01/DOC0001.XML"]
    subprocess.run(["unzip", "-q", str(path), "-d", str(tmp_path / "out")], check=True)
    extracted = (tmp_path / "out" / "IHE_XDM" / "SUBSET01" / "DOC0001.XML").read_bytes()
    dgst = subprocess.run(["openssl", "dgst", "-sha1", "-r"], input=extracted, capture_output=True, check=True).stdout
    meta = (tmp_path / "out" / "IHE_XDM" / "SUBSET01" / "METADATA.XML").read_text()
    assert re.search(r'name="hash"><rim:ValueList><rim:Value>' + dgst.split()[0].decode(), meta)
    assert f'<rim:Value>{len(extracted)}</rim:Value>' in meta
    assert read_package(data).documents[0].cda is not None


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=4000), st.binary(min_size=1, max_size=8))
def test_fuzz_mutated_packages_never_crash(noise: bytes, offset: int, patch: bytes) -> None:
    """Random bytes and random corruptions of a valid package: a package or a clear XdmError, nothing else."""
    base = bytearray(package())
    at = offset % len(base)
    base[at:at + len(patch)] = patch
    for data in (noise, bytes(base)):
        with contextlib.suppress(XdmError):
            read_package(data, Limits(max_total_bytes=1024 * 1024))
        found = inspect_message(message(data))
        assert found.error is None or isinstance(found.error, str)


def test_sha1_of_metadata_is_sha1() -> None:
    doc = cda()
    meta = metadata([("DOC0001.XML", doc, "text/xml")]).decode()
    assert hashlib.sha1(doc).hexdigest() in meta  # noqa: S324 (the sample writer is independent)


def test_packages_found_in_nested_multiparts_and_any_transfer_encoding() -> None:
    """The scanner splits MIME itself (linear); the standard library writes the nesting and encodings."""
    from email.message import EmailMessage
    from email.policy import SMTP

    outer = EmailMessage(policy=SMTP)
    outer["From"] = "a@a.test"
    outer["Subject"] = "x"
    outer.set_content("texte")
    inner = EmailMessage(policy=SMTP)
    inner.set_content("alt")
    inner.add_alternative("<p>alt</p>", subtype="html")
    inner.add_attachment(package(), maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
    outer.add_attachment(inner)  # message/rfc822: a forwarded message's package is not ours to check
    nested = EmailMessage(policy=SMTP)
    nested.set_content("x")
    nested.add_attachment(package(), maintype="application", subtype="zip", filename="IHE_XDM.ZIP",
                          cte="quoted-printable")
    outer.attach(nested)
    found = inspect_message(outer.as_bytes())
    assert found.error is None and len(found.packages) == 1 and found.cda_codes == ("57833-6",)
    lf_only = message(package()).replace(b"\r\n", b"\n")
    assert len(inspect_message(lf_only).packages) == 1


_PART = st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n",
    b"--b1\r\nContent-Transfer-Encoding: base64\r\n\r\n",
    b"--b1--\r\n", b"--b1 \r\n", b"\r\n", b"UEsDBBQAAAAIAA==\r\n",
    b"Content-Type: multipart/alternative; boundary=\"b1\"\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nPK=03=04\r\n",
    b"X-MSS-INS: O\r\n", b"X-MSS-CODECDA: 11488-4\r\n", b"PK\x03\x04\x00\x00",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_PART, st.binary(max_size=64)), max_size=40))
def test_fuzz_mime_structures_never_crash(pieces: list[bytes]) -> None:
    """Random MIME-looking messages (nested boundaries, truncated parts, zip magic): facts, never an exception."""
    found = inspect_message(b"".join(pieces))
    assert found.error is None or isinstance(found.error, str)
    found.policy_facts()


def test_a_zip_version_zipfile_cannot_read_is_a_refused_package_not_a_crash() -> None:
    """Found by the fuzz test: zipfile raises NotImplementedError for an entry needing "version 6.4"."""
    data = bytearray(package())
    central = data.index(b"PK\x01\x02")
    data[central + 6:central + 8] = (64).to_bytes(2, "little")  # version needed to extract: 6.4
    found = inspect_message(message(bytes(data)))
    assert found.error is not None and "IHE XDM" in found.error
