"""``mssgw message compose``: a standard MSSanté message with an IHE XDM package, protected and opened.

Oracles: the standard library's email parser and ``unzip -t`` read what compose wrote, the
XDM reader of the tests' own samples module is not used (the package is checked against the
specification's layout and hashes by ``unzip`` and ``openssl dgst``), and ``openssl cms``
decrypts what ``message protect`` made of it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import zipfile
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from email.policy import default
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.gateway.documents.xdm_samples import NIR, PDF, cda

RPPS = "10000000009"
ANNE = "anne.martin@a.mssante.test"
SECRETARIAT = "secretariat@a.mssante.test"


@dataclass
class Done:
    returncode: int
    stdout: bytes
    stderr: bytes


def mssgw(home: Path, *args: str, input: bytes | None = None) -> Done:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args], input=input)
    return Done(result.exit_code, result.stdout_bytes, result.stderr_bytes)


@pytest.fixture
def home(sqlite_home: Path) -> Path:
    assert mssgw(sqlite_home, "directory", "add-practitioner", "--rpps", RPPS, "--last-name", "Martin",
                 "--first-name", "Anne").returncode == 0
    assert mssgw(sqlite_home, "directory", "add-mailbox", ANNE, "--type", "PER", "--rpps", RPPS).returncode == 0
    assert mssgw(sqlite_home, "directory", "add-mailbox", SECRETARIAT, "--type", "ORG", "--name", "Sec").returncode == 0
    for address in (ANNE, SECRETARIAT):
        assert mssgw(sqlite_home, "certs", "issue", address).returncode == 0
    return sqlite_home


@pytest.fixture
def pdf(tmp_path: Path) -> Path:
    path = tmp_path / "ordonnance.pdf"
    path.write_bytes(PDF)
    return path


def _compose(home: Path, pdf: Path, *extra: str) -> Done:
    return mssgw(home, "message", "compose", "--from", ANNE, "--to", SECRETARIAT, "--pdf", str(pdf), "--ins", NIR,
                 "--ins-oid", "test", "--loinc", "57833-6", "--patient-family", "Patiente-Test",
                 "--patient-given", "Jeanne", "--birth-date", "19790328", "--gender", "F", *extra)


def _package_of(message: Message) -> bytes:
    for part in message.walk():
        if part.get_filename() == "IHE_XDM.ZIP":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload
    raise AssertionError("no IHE_XDM.ZIP attachment")


def test_compose_writes_a_standard_xdm_message(home: Path, pdf: Path, tmp_path: Path) -> None:
    done = _compose(home, pdf)
    assert done.returncode == 0, done.stderr
    assert b"\r\n" in done.stdout and b"\n" not in done.stdout.replace(b"\r\n", b"")
    message = message_from_bytes(done.stdout, policy=default)
    assert message["X-MSS-CODECDA"] == "57833-6" and message["X-MSS-INS"] == "O"
    assert message["From"] == ANNE and message["To"] == SECRETARIAT
    assert NIR not in str(message["Subject"])
    attached_pdf = [p for p in message.walk() if p.get_content_type() == "application/pdf"]
    assert attached_pdf and attached_pdf[0].get_payload(decode=True) == PDF
    zip_path = tmp_path / "IHE_XDM.ZIP"
    zip_path.write_bytes(_package_of(message))
    tested = subprocess.run(["unzip", "-t", str(zip_path)], capture_output=True, text=True, check=False)
    assert tested.returncode == 0, tested.stdout
    with zipfile.ZipFile(zip_path) as z:
        assert {"INDEX.HTM", "README.TXT", "IHE_XDM/SUBSET01/METADATA.XML"} <= set(z.namelist())
        document = z.read("IHE_XDM/SUBSET01/DOC0001.XML")
        meta = z.read("IHE_XDM/SUBSET01/METADATA.XML").decode()
    digest = subprocess.run(["openssl", "dgst", "-sha1", "-r"], input=document, capture_output=True,
                            check=True).stdout.split()[0].decode()
    assert f"<rim:Value>{digest}</rim:Value>" in meta and f"<rim:Value>{len(document)}</rim:Value>" in meta
    # the CDA (level 1) wraps the very PDF, names the patient's INS under the test authority and the author
    text = document.decode()
    assert 'code="57833-6"' in text and f'root="1.2.250.1.213.1.4.10" extension="{NIR}"' in text
    assert f'extension="8{RPPS}"' in text and "<family>Martin</family>" in text
    wrapped = re.search(r'representation="B64">([^<]+)<', text)
    assert wrapped is not None and base64.b64decode(wrapped.group(1)) == PDF
    assert hashlib.sha1(document).hexdigest() == digest  # noqa: S324 (XDS hash)


def test_compose_then_protect_then_open_round_trip(home: Path, pdf: Path, tmp_path: Path) -> None:
    composed = _compose(home, pdf).stdout
    protected = mssgw(home, "message", "protect", "--from", ANNE, "--to", SECRETARIAT, input=composed)
    assert protected.returncode == 0, protected.stderr
    assert b"IHE_XDM" not in protected.stdout and NIR.encode() not in protected.stdout
    listed = json.loads(mssgw(home, "certs", "show", SECRETARIAT, "--json", "--pem").stdout)[0]
    cert, p12, key = tmp_path / "sec.pem", tmp_path / "sec.p12", tmp_path / "sec.key"
    cert.write_text(listed["pem"])
    # The key as its owner gets it (the gateway keeps it sealed in its database), opened by openssl.
    assert mssgw(home, "certs", "export", SECRETARIAT, "--pkcs12", str(p12), input=b"oracle-passphrase\n").returncode == 0
    key.write_bytes(subprocess.run(["openssl", "pkcs12", "-in", str(p12), "-nocerts", "-nodes", "-passin",
                                    "pass:oracle-passphrase"], capture_output=True, check=True).stdout)  # fmt: skip
    decrypted = subprocess.run(["openssl", "cms", "-decrypt", "-recip", str(cert), "-inkey", str(key)],
                               input=protected.stdout, capture_output=True, check=True).stdout
    assert b"IHE_XDM.ZIP" in decrypted
    opened = mssgw(home, "message", "open", "--to", SECRETARIAT, "--json", input=protected.stdout)
    assert opened.returncode == 0, opened.stderr
    inner = message_from_bytes(opened.stdout, policy=default)
    assert inner["X-MSS-CODECDA"] == "57833-6"
    with zipfile.ZipFile(io.BytesIO(_package_of(inner))) as z:
        assert z.testzip() is None


def test_compose_with_a_given_cda(home: Path, pdf: Path, tmp_path: Path) -> None:
    given = tmp_path / "doc.xml"
    given.write_bytes(cda())
    done = _compose(home, pdf, "--cda", str(given))
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(io.BytesIO(_package_of(message_from_bytes(done.stdout, policy=default)))) as z:
        assert z.read("IHE_XDM/SUBSET01/DOC0001.XML") == cda()
    other = tmp_path / "other.xml"
    other.write_bytes(cda(code="11488-4"))
    refused = _compose(home, pdf, "--cda", str(other))
    assert refused.returncode != 0 and b"differs from --loinc" in refused.stderr


@pytest.mark.parametrize(("args", "reason"), [
    (("--ins", NIR[:13] + "88"), b"key does not match"),
    (("--ins-oid", "1.2.250.1.213.1.4.2"), b"not that of an INS authority"),
    (("--loinc", "57833-5"), b"LOINC code is malformed"),
    (("--birth-date", "1979-03-28"), b"YYYYMMDD"),
])
def test_bad_inputs_are_clear_errors_without_the_number(home: Path, pdf: Path, args: tuple[str, str],
                                                        reason: bytes) -> None:
    done = _compose(home, pdf, *args)
    assert done.returncode != 0
    assert reason in done.stderr and b"Traceback" not in done.stderr
    assert NIR[:13].encode() not in done.stderr


def test_not_a_pdf_and_entities_in_the_cda(home: Path, tmp_path: Path, pdf: Path) -> None:
    fake = tmp_path / "x.pdf"
    fake.write_bytes(b"MZ\x90\x00")
    done = _compose(home, fake)
    assert done.returncode != 0 and b"not a PDF" in done.stderr
    evil = tmp_path / "evil.xml"
    evil.write_bytes(cda(prolog='\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'))
    done = _compose(home, pdf, "--cda", str(evil))
    assert done.returncode != 0 and b"DTD or entity" in done.stderr
