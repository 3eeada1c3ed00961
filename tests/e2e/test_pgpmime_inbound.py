"""PGP/MIME written by a mail client, relayed by A over mutual TLS, opened by B's inbound pipeline.

The client is a plain GnuPG home driven by the `gpg` command line, laying the message out as
Thunderbird/Enigmail do: a plain MIME body without a From inside the encryption (RFC 3156 §6.2),
or a multipart/signed body inside it (§6.1), encrypted to the recipient and to the sender's
own key.  B must deliver it with the outer From, an Authentication-Results an independent
reader (authres) accepts, and answer the MDN request; A's user then receives that MDN.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import authres  # type: ignore[import-untyped]
import pytest
from e2e_support import B_DOMAIN, CLINICIAN, PDF, PRACTITIONER, SUBJECT, Pair

from directory.db import transaction
from gateway.delivery.relay import Route


def gpg(home: Path, *args: str, stdin: bytes = b"") -> bytes:
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase",
                           "", "--trust-model", "always", *args], input=stdin, capture_output=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "thunderbird"
    home.mkdir(mode=0o700)
    gpg(home, "--quick-generate-key", f"Dr Martin <{CLINICIAN}>", "rsa2048", "sign,encrypt", "1y")
    yield home
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, check=False)


def body_part() -> bytes:
    """What Thunderbird encrypts: the MIME body only, no From, To or Subject."""
    return (b'Content-Type: multipart/mixed; boundary="------------mix"\r\n\r\n--------------mix\r\n'
            b"Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + "Bonjour, l'ordonnance est jointe (posologie inchangée).\r\n".encode()
            + b'\r\n--------------mix\r\nContent-Type: application/pdf; name="ordonnance.pdf"\r\n'
            b'Content-Disposition: attachment; filename="ordonnance.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
            + crlf(base64.encodebytes(PDF)) + b"\r\n--------------mix--\r\n")  # fmt: skip


def client_message(home: Path, layout: str, recipient_fpr: str) -> bytes:
    own = gpg(home, "--with-colons", "--list-secret-keys").decode()
    own_fpr = next(line.split(":")[9] for line in own.splitlines() if line.startswith("fpr:"))
    if layout == "6.2":
        armored = gpg(home, "--armor", "--sign", "--encrypt", "-r", recipient_fpr, "-r", own_fpr, stdin=body_part())
    else:
        part = body_part()
        sig = crlf(gpg(home, "--armor", "--detach-sign", stdin=part))
        signed = (b'Content-Type: multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature";'
                  b' boundary="------------sig"\r\n\r\n--------------sig\r\n' + part + b"\r\n--------------sig\r\n"
                  b"Content-Type: application/pgp-signature\r\n\r\n" + sig + b"\r\n--------------sig--\r\n")  # fmt: skip
        armored = gpg(home, "--armor", "--encrypt", "-r", recipient_fpr, "-r", own_fpr, stdin=signed)
    return (f"From: Dr Martin <{CLINICIAN}>\r\nTo: {PRACTITIONER}\r\nSubject: {SUBJECT}\r\n"
            f"Date: Tue, 03 Nov 2026 10:00:00 +0100\r\nMessage-ID: <tb-{layout}@a.mssante.test>\r\n"
            f"Disposition-Notification-To: {CLINICIAN}\r\nMIME-Version: 1.0\r\n").encode() + (
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="------------enc"\r\n'
        b"\r\n--------------enc\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
        b'--------------enc\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
        + crlf(armored) + b"\r\n--------------enc--\r\n")  # fmt: skip


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


@pytest.mark.parametrize("layout", ["6.2", "6.1"])
async def test_client_pgp_mime_is_delivered_with_its_outer_from(pair: Pair, client: Path, layout: str) -> None:
    from certs import service as certs
    from gateway.crypto.openpgp import OpenPgp

    a, b = pair.a, pair.b
    with transaction(b.sessions) as s:
        practitioner_fpr = certs.pgp_generate(s, b.settings, PRACTITIONER)
        certs.pgp_import(s, b.settings, CLINICIAN, gpg(client, "--armor", "--export", CLINICIAN))
    ring = OpenPgp(b.settings.gnupg_dir)
    try:
        gpg(client, "--import", stdin=ring.export_public(practitioner_fpr).encode())
    finally:
        ring.close()

    data = client_message(client, layout, practitioner_fpr)
    route = Route(B_DOMAIN, "127.0.0.1", pair.proxy.port, b.operator_dn)
    attempts = await a.workers.ctx.relay.send(route, CLINICIAN, [PRACTITIONER], data)  # type: ignore[attr-defined]
    assert attempts[0].ok, attempts
    await pair.flow()

    inbox = b.mailbox(PRACTITIONER)
    assert len(inbox) == 1, [m[:300] for m in inbox]
    got = parse(inbox[0])
    assert not got.defects
    assert got["From"].addresses[0].addr_spec == CLINICIAN and got["Subject"] == SUBJECT
    ar = " ".join(str(got["Authentication-Results"]).split())
    header = authres.core.AuthenticationResultsHeader(authres.FeatureContext(), strict=True)
    header._parse_text = ar
    header._parse()
    (res,) = header.results
    assert (res.method, res.result) == ("x-pgp", "pass"), ar
    assert [(p.type, p.name, p.value) for p in res.properties] == [("header", "from", CLINICIAN)]
    pdf = next(p for p in got.iter_attachments() if p.get_content_type() == "application/pdf")
    assert pdf.get_content() == PDF  # type: ignore[attr-defined]
    texts = [p.get_content() for p in got.walk() if p.get_content_type() == "text/plain"]  # type: ignore[attr-defined]
    assert texts[0].startswith("[Signé par ")  # the banner part (crypto.banner_language fr), then the client's text
    assert any("posologie inchangée" in t for t in texts[1:])

    # The MDN B owed the client reaches A's user as a disposition-notification report.
    mdns = [m for m in a.mailbox(CLINICIAN) if b"disposition-notification" in m]
    assert len(mdns) == 1
    report = parse(mdns[0])
    if report.get_content_type() == "multipart/signed":  # a signed local copy: the report is inside
        report = report.get_payload()[0].get_payload()[0]  # type: ignore[index,union-attr,assignment]
    assert report.get_content_type() == "multipart/report"
    fields: Any = report.get_payload()[1].get_payload()[0]  # type: ignore[index,union-attr]
    assert fields["Disposition"] == "automatic-action/MDN-sent-automatically; processed"
    assert fields["Original-Message-ID"] == f"<tb-{layout}@a.mssante.test>"
