"""S/MIME interoperability with `openssl cms` as the independent oracle, in both directions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.crypto import _mime
from gateway.crypto.smime import encrypt_only, open_message, protect, sign_only

Openssl = Callable[..., bytes]


def _protect(world: Any, msg: bytes, **kw: Any) -> bytes:
    return protect(msg, signer_cert=world.alice.cert, signer_key=world.alice.key,
                   recipient_certs=[world.bob.cert], **kw)  # fmt: skip


def test_openssl_decrypts_and_verifies_ours(
    world: Any, openssl: Openssl, make_message: Callable[..., bytes]
) -> None:
    msg = make_message()
    out = _protect(world, msg)
    # Nothing of the original subject or body is visible outside the envelope.
    assert b"DUPONT" not in out and "résultats".encode() not in out
    block, _ = _mime.split_entity(out)
    names = [n for n, _, _ in _mime.parse_headers(block)]
    assert names[:5] == ["from", "to", "cc", "date", "message-id"]
    assert _mime.header_value(_mime.parse_headers(block), "subject") == "Message securise"

    for who in (world.bob, world.alice):  # recipient and sender copy
        decrypted = openssl("cms", "-decrypt", "-recip", str(who.cert_path), "-inkey", str(who.key_path),
                            stdin=out)  # fmt: skip
        assert decrypted.startswith(b"Content-Type: multipart/signed")
        verified = openssl("cms", "-verify", "-CAfile", str(world.pki.ca_cert), "-purpose", "smimesign",
                           stdin=decrypted)  # fmt: skip
        assert verified == b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + msg
    info = openssl("cms", "-cmsout", "-print", "-inform", "DER",
                   stdin=_mime.b64decode_body(_mime.split_entity(out)[1]))  # fmt: skip
    assert b"aes-256-gcm" in info  # the default since S/MIME 4.0 (RFC 8551 §2.7): crypto.content_encryption
    assert b"carol" not in info


def test_openssl_verifies_sign_only(world: Any, openssl: Openssl, make_message: Callable[..., bytes]) -> None:
    msg = make_message()
    out = sign_only(msg, signer_cert=world.alice.cert, signer_key=world.alice.key)
    assert b"Subject: Resultats patient DUPONT\r\n" in out
    verified = openssl("cms", "-verify", "-CAfile", str(world.pki.ca_cert), stdin=out)
    assert verified.endswith(msg)
    inner, res = open_message(out, recipient_cert=world.bob.cert, recipient_key=world.bob.key,
                              trust=world.trust, require_encryption=False)  # fmt: skip
    assert inner == msg and res.ok and not res.encrypted
    _, strict = open_message(
        out, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust
    )
    assert strict.failure == "not-encrypted" and strict.signature_valid and not strict.ok


def test_encrypt_only_is_not_signed(world: Any, openssl: Openssl, make_message: Callable[..., bytes]) -> None:
    msg = make_message()
    out = encrypt_only(msg, recipient_certs=[world.bob.cert])
    dec = openssl("cms", "-decrypt", "-recip", str(world.bob.cert_path), "-inkey", str(world.bob.key_path),
                  stdin=out)  # fmt: skip
    assert dec.endswith(msg)
    inner, res = open_message(
        out, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust
    )
    assert inner == msg and res.failure == "not-signed" and res.decrypted_ok and not res.ok


def _openssl_protect(world: Any, openssl: Openssl, msg: bytes, *, md: str = "sha256", oaep: bool = False,
                     detached: bool = True, signer: Any = None, cipher: str = "-aes256") -> bytes:  # fmt: skip
    signer = signer or world.alice
    wrapped = b"Content-Type: message/rfc822\r\n\r\n" + msg
    sign = [
        "cms",
        "-sign",
        "-signer",
        str(signer.cert_path),
        "-inkey",
        str(signer.key_path),
        "-md",
        md,
        "-binary",
    ]
    if not detached:
        sign.append("-nodetach")
    signed = openssl(*sign, stdin=wrapped)
    enc = ["cms", "-encrypt", cipher, "-recip", str(world.bob.cert_path), "-from", "dr.alice@a.test",
           "-to", "sec@b.test", "-subject", "Message securise"]  # fmt: skip
    if oaep:
        enc += ["-keyopt", "rsa_padding_mode:oaep"]
    return openssl(*enc, stdin=signed)


@pytest.mark.parametrize(("oaep", "detached", "cipher"), [
    (False, True, "-aes256"), (True, True, "-aes256"), (False, False, "-aes128"), (True, False, "-aes256"),
])  # fmt: skip
def test_we_open_openssl_output(world: Any, openssl: Openssl, make_message: Callable[..., bytes], oaep: bool,
                                detached: bool, cipher: str) -> None:  # fmt: skip
    msg = make_message()
    out = _openssl_protect(world, openssl, msg, oaep=oaep, detached=detached, cipher=cipher)
    inner, res = open_message(
        out, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust
    )
    assert res.ok, res
    assert inner == msg
    assert res.key_transport == ("rsa-oaep" if oaep else "rsa-pkcs1v15")
    assert res.content_algorithm == ("aes-256-cbc" if cipher == "-aes256" else "aes-128-cbc")
    assert res.signer_email == "dr.alice@a.test" and res.digest_algorithm == "sha256"
    assert res.crl_status == "good" and res.revoked is False


def test_openssl_sha1_signature_is_weak(
    world: Any, openssl: Openssl, make_message: Callable[..., bytes]
) -> None:
    out = _openssl_protect(world, openssl, make_message(), md="sha1")
    _inner, res = open_message(
        out, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust
    )
    assert res.failure == "weak-digest" and not res.ok and not res.signature_valid


def test_openssl_text_mode_lf_message(world: Any, openssl: Openssl) -> None:
    """openssl in text mode canonicalises to CRLF itself: we accept what it signed."""
    msg = b"From: dr.alice@a.test\nTo: sec@b.test\nSubject: lf\n\nline one\nline two\n"
    signed = openssl("cms", "-sign", "-signer", str(world.alice.cert_path), "-inkey", str(world.alice.key_path),
                     stdin=b"Content-Type: message/rfc822\n\n" + msg)  # fmt: skip
    out = openssl("cms", "-encrypt", "-aes256", "-recip", str(world.bob.cert_path), stdin=signed)
    inner, res = open_message(
        out, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust
    )
    assert res.ok, res
    assert inner == _mime.to_crlf(msg)
