"""PGP/MIME as mail clients send it (RFC 3156 §6.1 and §6.2), made by the `gpg` command line.

The sender side is a plain GnuPG home driven by the `gpg` CLI (the independent implementation);
the messages are laid out as Thunderbird/Enigmail write them: a plain MIME body with no From
(the outer header gives it), Thunderbird's protected headers, and our own message/rfc822
wrapper, each signed-and-encrypted in one OpenPGP message (§6.2) or as multipart/signed inside
the encryption (§6.1).  Python's `email` parser reads what `OpenPgp.open` delivers.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.crypto.openpgp import OpenPgp

SENDER = "dr.alice@a.test"
RECIPIENT = "sec@b.test"
PDF = b"%PDF-1.4\n% compte rendu\n" + bytes(range(256)) * 6 + b"\n%%EOF\n"
SUBJECT = "Compte rendu patient DUPONT"


@dataclass(frozen=True)
class Client:
    """A mail client's GnuPG home (the sender) and the gateway's keyring (the recipient)."""

    home: Path
    fpr: str
    stranger_home: Path  # a key the gateway has never seen
    gateway: OpenPgp
    gateway_fpr: str


def gpg(home: Path, *args: str, stdin: bytes = b"") -> bytes:
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase",
                           "", "--trust-model", "always", "--status-fd", "2", *args],
                          input=stdin, capture_output=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def _new_home(path: Path, uid: str) -> tuple[Path, str]:
    path.mkdir(mode=0o700)
    gpg(path, "--quick-generate-key", uid, "rsa2048", "sign,encrypt", "1y")
    out = gpg(path, "--with-colons", "--list-secret-keys").decode()
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    return path, fpr


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    base = tmp_path_factory.mktemp("pgpclients")
    home, fpr = _new_home(base / "thunderbird", f"Dr Alice <{SENDER}>")
    stranger, _ = _new_home(base / "stranger", f"Dr Alice (another key) <{SENDER}>")
    ring = OpenPgp(base / "gateway")
    gw_fpr = ring.generate_key(RECIPIENT, "Secretariat B")
    assert ring.import_key(gpg(home, "--armor", "--export", fpr)) == [fpr]
    pub = ring.export_public(gw_fpr).encode()
    gpg(home, "--import", stdin=pub)
    gpg(stranger, "--import", stdin=pub)
    yield Client(home, fpr, stranger, ring, gw_fpr)
    ring.close()
    for h in (home, stranger):
        subprocess.run(["gpgconf", "--homedir", str(h), "--kill", "gpg-agent"], capture_output=True, check=False)


# --- messages as clients lay them out ------------------------------------------------------------


def outer_header(from_addr: str = f"Dr Alice <{SENDER}>", subject: str = SUBJECT) -> bytes:
    return (f"From: {from_addr}\r\nTo: {RECIPIENT}\r\nSubject: {subject}\r\n"
            "Date: Tue, 03 Nov 2026 10:00:00 +0100\r\nMessage-ID: <tb-1@a.test>\r\n"
            f"Disposition-Notification-To: {SENDER}\r\n"
            "User-Agent: Mozilla/5.0 Thunderbird/115.0\r\nMIME-Version: 1.0\r\n").encode()  # fmt: skip


def mime_body(*, protected_headers: bool = False) -> bytes:
    """multipart/mixed with a text and a PDF, as Thunderbird composes it (optionally with v1 protected headers)."""
    pdf = base64.encodebytes(PDF).replace(b"\n", b"\r\n")
    head = b'Content-Type: multipart/mixed; boundary="------------mixed42"'
    if protected_headers:
        head += (b';\r\n protected-headers="v1"\r\n'
                 + f"From: Dr Alice <{SENDER}>\r\nTo: {RECIPIENT}\r\nMessage-ID: <tb-1@a.test>\r\n"
                 f"Subject: {SUBJECT}".encode())  # fmt: skip
    return head + (b"\r\n\r\nThis is a multi-part message in MIME format.\r\n--------------mixed42\r\n"
                   b"Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                   b"Bonjour,=0Aci-joint le compte rendu de M. DUPONT (r=C3=A9sultats).\r\n\r\n"
                   b"--------------mixed42\r\nContent-Type: application/pdf; name=\"cr.pdf\"\r\n"
                   b"Content-Disposition: attachment; filename=\"cr.pdf\"\r\n"
                   b"Content-Transfer-Encoding: base64\r\n\r\n") + pdf + b"\r\n--------------mixed42--\r\n"  # fmt: skip


def rfc822_wrapped() -> bytes:
    """A whole message inside message/rfc822 (the wrapper mssgw itself uses)."""
    return b"Content-Type: message/rfc822\r\n\r\n" + outer_header() + mime_body()


def multipart_signed(home: Path, signed_part: bytes, *, signer: str | None = None) -> bytes:
    """RFC 3156 §5: a detached ASCII-armored signature by `gpg` over the part's exact (canonical) bytes."""
    args = ["--armor", "--detach-sign", "--digest-algo", "SHA256"] + (["-u", signer] if signer else [])
    sig = gpg(home, *args, stdin=signed_part).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return (b'Content-Type: multipart/signed; micalg=pgp-sha256;\r\n protocol="application/pgp-signature";\r\n'
            b' boundary="------------signed7"\r\n\r\nThis is an OpenPGP/MIME signed message (RFC 4880 and 3156)\r\n'
            b"--------------signed7\r\n" + signed_part + b"\r\n--------------signed7\r\n"
            b'Content-Type: application/pgp-signature; name="OpenPGP_signature.asc"\r\n'
            b"Content-Description: OpenPGP digital signature\r\n"
            b'Content-Disposition: attachment; filename="OpenPGP_signature.asc"\r\n\r\n'
            + sig + b"\r\n--------------signed7--\r\n")  # fmt: skip


def encrypted(home: Path, payload: bytes, *, sign: bool, recipients: list[str], header: bytes | None = None) -> bytes:
    """multipart/encrypted as Thunderbird writes it around `gpg --encrypt [--sign]` output."""
    args = ["--armor", "--encrypt"] + (["--sign"] if sign else [])
    for r in recipients:
        args += ["-r", r]
    armored = gpg(home, *args, stdin=payload).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return (header or outer_header()) + (
        b'Content-Type: multipart/encrypted;\r\n protocol="application/pgp-encrypted";\r\n'
        b' boundary="------------enc0"\r\n\r\nThis is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n'
        b"--------------enc0\r\nContent-Type: application/pgp-encrypted\r\n"
        b"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n\r\n"
        b'--------------enc0\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n'
        b"Content-Description: OpenPGP encrypted message\r\n"
        b'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n' + armored + b"\r\n--------------enc0--\r\n"
    )  # fmt: skip


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def assert_readable(inner: bytes) -> EmailMessage:
    """What a mail client shows: sender, subject, text and the attachment, byte for byte."""
    msg = parse(inner)
    assert not msg.defects, msg.defects
    assert msg["From"].addresses[0].addr_spec == SENDER
    assert str(msg["Subject"]) == SUBJECT and msg["Message-ID"] == "<tb-1@a.test>"
    assert msg.get_content_type() == "multipart/mixed"
    text = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    assert "résultats" in text.get_content()  # type: ignore[attr-defined]
    pdf = next(msg.iter_attachments())
    assert pdf.get_content() == PDF  # type: ignore[attr-defined]
    return msg


# --- §6.2: one OpenPGP message, signed and encrypted ---------------------------------------------


@pytest.mark.parametrize("layout", ["plain-body", "protected-headers", "rfc822-wrapper"])
def test_62_combined_as_clients_send_it(client: Client, layout: str) -> None:
    payload = {"plain-body": mime_body(), "protected-headers": mime_body(protected_headers=True),
               "rfc822-wrapper": rfc822_wrapped()}[layout]  # fmt: skip
    data = encrypted(client.home, payload, sign=True, recipients=[client.gateway_fpr, client.fpr])
    inner, res = client.gateway.open(data)
    assert res.ok, res
    assert res.from_address == SENDER and res.signer_fingerprint == client.fpr and res.encrypted
    assert inner is not None
    msg = assert_readable(inner)
    assert msg["Disposition-Notification-To"] == SENDER  # the outer header is carried over
    assert b"multipart/encrypted" not in inner and b"BEGIN PGP" not in inner


def test_62_protected_headers_win_over_the_outer_ones(client: Client) -> None:
    """Thunderbird hides the Subject outside ("...") and puts the real one, signed, inside."""
    data = encrypted(client.home, mime_body(protected_headers=True), sign=True,
                     recipients=[client.gateway_fpr], header=outer_header(subject="..."))  # fmt: skip
    inner, res = client.gateway.open(data)
    assert res.ok, res
    assert inner is not None
    msg = assert_readable(inner)
    assert msg.get_all("Subject") == [SUBJECT]


def test_62_outer_from_must_be_a_user_id_of_the_signing_key(client: Client) -> None:
    """The outer From is unprotected: it is believed only when the signing key carries it."""
    data = encrypted(client.home, mime_body(), sign=True, recipients=[client.gateway_fpr],
                     header=outer_header(from_addr="Dr Bob <dr.bob@a.test>"))  # fmt: skip
    _inner, res = client.gateway.open(data)
    assert res.failure == "from-mismatch" and not res.ok
    assert res.from_address == "dr.bob@a.test" and res.signature_valid


def test_62_a_signed_inner_from_is_not_replaced_by_the_outer_one(client: Client) -> None:
    data = encrypted(client.home, mime_body(protected_headers=True), sign=True, recipients=[client.gateway_fpr],
                     header=outer_header(from_addr="Dr Bob <dr.bob@a.test>"))  # fmt: skip
    inner, res = client.gateway.open(data)
    assert res.ok, res
    assert inner is not None and parse(inner).get_all("From") == [f"Dr Alice <{SENDER}>"]


def test_encrypted_but_unsigned_is_reported_as_not_signed(client: Client) -> None:
    data = encrypted(client.home, mime_body(), sign=False, recipients=[client.gateway_fpr, client.fpr])
    _inner, res = client.gateway.open(data)
    assert res.failure == "not-signed" and res.decrypted_ok and not res.signed


# --- §6.1: multipart/signed inside the encryption -------------------------------------------------


@pytest.mark.parametrize("layout", ["plain-body", "protected-headers", "rfc822-wrapper"])
def test_61_signed_then_encrypted(client: Client, layout: str) -> None:
    part = {"plain-body": mime_body(), "protected-headers": mime_body(protected_headers=True),
            "rfc822-wrapper": rfc822_wrapped()}[layout]  # fmt: skip
    # Encrypted to the sender's own key too, as clients do: gpg then reports NO_SECKEY for it,
    # which is no statement about the signature.
    data = encrypted(client.home, multipart_signed(client.home, part), sign=False,
                     recipients=[client.gateway_fpr, client.fpr])  # fmt: skip
    inner, res = client.gateway.open(data)
    assert res.ok, res
    assert res.signer_fingerprint == client.fpr and res.signed and res.signature_valid
    assert inner is not None
    assert_readable(inner)
    assert b"application/pgp-signature" not in inner


def test_61_with_lf_line_ends_inside_the_encryption(client: Client) -> None:
    """The signature covers the canonical CRLF form (RFC 3156 §5); the plaintext may travel with LF."""
    signed = multipart_signed(client.home, mime_body())
    data = encrypted(client.home, signed.replace(b"\r\n", b"\n"), sign=False, recipients=[client.gateway_fpr])
    inner, res = client.gateway.open(data)
    assert res.ok, res
    assert inner is not None
    assert_readable(inner)


def test_61_altered_signed_part_is_a_bad_signature(client: Client) -> None:
    signed = multipart_signed(client.home, mime_body())
    altered = signed.replace(b"M. DUPONT", b"M. DURAND")
    assert altered != signed
    data = encrypted(client.home, altered, sign=False, recipients=[client.gateway_fpr])
    inner, res = client.gateway.open(data)
    assert res.failure == "bad-signature" and inner is None and not res.ok


def test_61_signature_by_a_key_we_do_not_hold(client: Client) -> None:
    data = encrypted(client.stranger_home, multipart_signed(client.stranger_home, mime_body()), sign=False,
                     recipients=[client.gateway_fpr])  # fmt: skip
    _inner, res = client.gateway.open(data)
    assert res.failure == "unknown-key" and not res.ok


def test_61_outer_from_checked_against_the_detached_signer(client: Client) -> None:
    data = encrypted(client.home, multipart_signed(client.home, mime_body()), sign=False,
                     recipients=[client.gateway_fpr], header=outer_header(from_addr="dr.bob@a.test"))  # fmt: skip
    _inner, res = client.gateway.open(data)
    assert res.failure == "from-mismatch" and res.signature_valid


def test_61_signature_part_of_another_type_is_malformed(client: Client) -> None:
    signed = multipart_signed(client.home, mime_body()).replace(
        b"Content-Type: application/pgp-signature; name=", b"Content-Type: text/plain; name=")
    data = encrypted(client.home, signed, sign=False, recipients=[client.gateway_fpr])
    inner, res = client.gateway.open(data)
    assert res.failure == "malformed-cms" and inner is None


# --- hostile plaintext ----------------------------------------------------------------------------


def test_a_compressed_bomb_stops_at_the_size_limit(client: Client) -> None:
    """5 MB of zeros compress to a few kilobytes; gpg stops writing at the limit (--max-output)."""
    data = encrypted(client.home, b"\0" * 5_000_000, sign=True, recipients=[client.gateway_fpr])
    assert len(data) < 100_000
    inner, res = client.gateway.open(data, max_size=1_000_000)
    assert res.failure == "too-large" and inner is None


def test_plaintext_that_is_no_mime_entity_is_malformed_not_a_traceback(client: Client) -> None:
    data = encrypted(client.home, b"\0" * 300_000, sign=True, recipients=[client.gateway_fpr])
    inner, res = client.gateway.open(data)
    assert res.failure == "malformed-cms" and inner is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; "
                                 b"boundary=\"b\"\r\n", b"Content-Type: message/rfc822\r\n", b"From: x@y\r\n",
                                 b"\r\n", b"--b\r\n", b"--b--\r\n", b"Content-Type: application/pgp-signature\r\n",
                                 b"x: \xff\r\n", b"\n", b" folded\r\n", b":\r\n"]), max_size=30),
       st.binary(max_size=64))  # fmt: skip
def test_decrypted_entity_parsers_never_raise_anything_but_mime_errors(pieces: list[bytes], tail: bytes) -> None:
    """What comes out of the decryption is attacker-chosen: MimeError (malformed-cms) or a result."""
    from gateway.crypto import _mime
    from gateway.crypto.openpgp import _compose, _detached_signature

    content = b"".join(pieces) + tail
    outer = _mime.parse_headers(outer_header())
    try:
        found = _detached_signature(content)
        entity = found[0] if found else content
        _compose(entity, outer)
    except _mime.MimeError:
        pass
