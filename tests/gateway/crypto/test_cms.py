"""CMS structures made by ``openssl cms`` read by ``gateway.crypto.cms``: what we decode must be what openssl wrote.

Each structure is produced by an independent implementation (``openssl cms``), then checked two
ways: our decoder's answer, and openssl's own dump (``openssl cms -cmsout -print``) or
asn1crypto's parse of the same DER, so that a field we read wrongly (the signer, the digest, the
cipher, the key transport) fails here rather than as a puzzling verification failure later.
Every failure code of the module's contract is reached with real structures.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from asn1crypto import cms as acms
from cryptography.hazmat.primitives import hashes

from gateway.crypto.cms import CmsError, decrypt_enveloped, verify_signed

if TYPE_CHECKING:  # the session fixture's type (a conftest is never imported by name at run time)
    from tests.gateway.crypto.conftest import World

CONTENT = b"Content-Type: text/plain\r\n\r\nCompte rendu de consultation.\r\n"

Openssl = Callable[..., bytes]


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _sign(openssl: Openssl, world: World, tmp_path: Path, *extra: str, detached: bool = False) -> bytes:
    """SignedData (DER) by alice over CONTENT, made by openssl."""
    src = _write(tmp_path, "content.txt", CONTENT)
    args = ["cms", "-sign", "-binary", "-in", str(src), "-signer", str(world.alice.cert_path),
            "-inkey", str(world.alice.key_path), "-outform", "DER", *extra]  # fmt: skip
    if not detached:
        args.append("-nodetach")
    return openssl(*args)


def _encrypt(openssl: Openssl, world: World, tmp_path: Path, cipher: str, *extra: str) -> bytes:
    """EnvelopedData/AuthEnvelopedData (DER) for bob, made by openssl."""
    src = _write(tmp_path, "plain.txt", CONTENT)
    return openssl("cms", "-encrypt", "-binary", f"-{cipher}", "-in", str(src), "-outform", "DER",
                   "-recip", str(world.bob.cert_path), *extra)  # fmt: skip


def _print(openssl: Openssl, tmp_path: Path, der: bytes) -> str:
    path = _write(tmp_path, "structure.der", der)
    return openssl("cms", "-cmsout", "-print", "-inform", "DER", "-in", str(path)).decode()


# --- SignedData ------------------------------------------------------------------------------------


def test_signed_data_read_as_openssl_prints_it(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _sign(openssl, world, tmp_path)
    info = verify_signed(der)
    assert info.content == CONTENT
    assert info.signer == world.alice.cert
    assert info.digest_algorithm == "sha256"
    assert info.signature_algorithm == "rsa-pkcs1v15"
    dump = _print(openssl, tmp_path, der)
    assert "contentType: pkcs7-signedData" in dump
    # The signer openssl names (issuer and serial) is the certificate we return.
    serial = re.search(r"serialNumber: (0x[0-9A-Fa-f]+|\d+)", dump)
    assert serial is not None and int(serial.group(1), 0) == info.signer.serial_number
    assert re.search(r"digestAlgorithm:\s*\n\s*algorithm: sha256", dump)
    # asn1crypto's view of openssl's bytes agrees on the signed messageDigest.
    signer_info = acms.ContentInfo.load(der)["content"]["signer_infos"][0]
    digest = {a["type"].native: a["values"][0].native for a in signer_info["signed_attrs"]}["message_digest"]
    h = hashes.Hash(hashes.SHA256())
    h.update(CONTENT)
    assert digest == h.finalize()


def test_detached_signature_covers_the_bytes_given(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _sign(openssl, world, tmp_path, detached=True)
    assert acms.ContentInfo.load(der)["content"]["encap_content_info"]["content"].native is None
    assert verify_signed(der, CONTENT).content == CONTENT
    with pytest.raises(CmsError) as tampered:
        verify_signed(der, CONTENT.replace(b"consultation", b"Consultation"))
    assert tampered.value.code == "tampered-content"
    with pytest.raises(CmsError) as missing:
        verify_signed(der)  # no content anywhere
    assert missing.value.code == "malformed-cms"


def test_bare_lf_content_is_verified_in_its_canonical_form(world: World, openssl: Openssl, tmp_path: Path) -> None:
    """RFC 8551 3.1.1: a relay that turned CRLF into LF does not break a signature over CRLF."""
    der = _sign(openssl, world, tmp_path, detached=True)
    assert verify_signed(der, CONTENT.replace(b"\r\n", b"\n")).content == CONTENT


def test_sha1_signature_is_refused(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _sign(openssl, world, tmp_path, "-md", "sha1")
    assert "algorithm: sha1" in _print(openssl, tmp_path, der)
    with pytest.raises(CmsError) as err:
        verify_signed(der)
    assert err.value.code == "weak-digest"


def test_rsa_pss_signature_is_verified(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _sign(openssl, world, tmp_path, "-keyopt", "rsa_padding_mode:pss")
    assert "rsassaPss" in _print(openssl, tmp_path, der)
    assert verify_signed(der).signature_algorithm == "rsa-pss"


def test_signature_without_the_signer_certificate(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _sign(openssl, world, tmp_path, "-nocerts")
    assert acms.ContentInfo.load(der)["content"]["certificates"].native in (None, [])
    with pytest.raises(CmsError) as err:
        verify_signed(der)
    assert err.value.code == "no-signer-certificate"


def test_altered_signed_attributes_are_caught(world: World, openssl: Openssl, tmp_path: Path) -> None:
    """One bit changed in the signed attributes (the signing time): the signature over them fails."""
    der = _sign(openssl, world, tmp_path)
    ci = acms.ContentInfo.load(der)
    attrs = ci["content"]["signer_infos"][0]["signed_attrs"].dump()
    time_at = attrs.find(b"\x17\x0d")  # the UTCTime of signingTime
    assert time_at > 0
    forged = bytearray(der)
    offset = der.find(attrs) + time_at + 2
    forged[offset] = ord("0") if forged[offset] != ord("0") else ord("1")
    with pytest.raises(CmsError) as err:
        verify_signed(bytes(forged))
    assert err.value.code == "bad-signed-attributes"


def test_garbage_and_the_wrong_structure(world: World, openssl: Openssl, tmp_path: Path) -> None:
    for junk in (b"", b"\x30\x03\x02\x01", b"not DER at all", b"\x30\x80" * 50):
        with pytest.raises(CmsError) as err:
            verify_signed(junk)
        assert err.value.code == "malformed-cms"
    enveloped = _encrypt(openssl, world, tmp_path, "aes256")
    with pytest.raises(CmsError) as not_signed:
        verify_signed(enveloped)
    assert not_signed.value.code == "not-signed"
    with pytest.raises(CmsError) as not_encrypted:
        decrypt_enveloped(_sign(openssl, world, tmp_path), world.bob.cert, world.bob.key)
    assert not_encrypted.value.code == "not-encrypted"


# --- EnvelopedData and AuthEnvelopedData -------------------------------------------------------------


@pytest.mark.parametrize("cipher, expected", [("aes128", "aes-128-cbc"), ("aes256", "aes-256-cbc")])
def test_enveloped_data_decrypted(world: World, openssl: Openssl, tmp_path: Path, cipher: str, expected: str) -> None:
    der = _encrypt(openssl, world, tmp_path, cipher)
    dump = _print(openssl, tmp_path, der)
    assert "contentType: pkcs7-envelopedData" in dump and f"algorithm: {expected} (" in dump
    assert "algorithm: rsaEncryption" in dump  # PKCS#1 v1.5 key transport, as we report
    out = decrypt_enveloped(der, world.bob.cert, world.bob.key)
    assert (out.content, out.content_algorithm, out.key_transport) == (CONTENT, expected, "rsa-pkcs1v15")


def test_oaep_key_transport(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _encrypt(openssl, world, tmp_path, "aes256", "-keyopt", "rsa_padding_mode:oaep",
                   "-keyopt", "rsa_oaep_md:sha256")  # fmt: skip
    ri = acms.ContentInfo.load(der)["content"]["recipient_infos"][0].chosen
    assert ri["key_encryption_algorithm"]["algorithm"].native == "rsaes_oaep"
    out = decrypt_enveloped(der, world.bob.cert, world.bob.key)
    assert (out.content, out.key_transport) == (CONTENT, "rsa-oaep")


def test_auth_enveloped_gcm_checks_its_tag(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _encrypt(openssl, world, tmp_path, "aes-256-gcm")
    assert acms.ContentInfo.load(der)["content_type"].native == "authenticated_enveloped_data"
    out = decrypt_enveloped(der, world.bob.cert, world.bob.key)
    assert (out.content, out.content_algorithm) == (CONTENT, "aes-256-gcm")
    ci = acms.ContentInfo.load(der)
    mac = ci["content"]["mac"].native
    forged = der.replace(mac, bytes([mac[0] ^ 1]) + mac[1:])
    with pytest.raises(CmsError) as err:
        decrypt_enveloped(forged, world.bob.cert, world.bob.key)
    assert err.value.code == "decrypt-failed"


def test_not_addressed_to_us(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _encrypt(openssl, world, tmp_path, "aes256")
    with pytest.raises(CmsError) as err:
        decrypt_enveloped(der, world.carol.cert, world.carol.key)
    assert err.value.code == "wrong-recipient"


def test_wrong_key_for_our_certificate_reveals_no_padding_detail(world: World, openssl: Openssl,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    """Our certificate, someone else's key: one code (decrypt-failed), whatever failed inside."""
    der = _encrypt(openssl, world, tmp_path, "aes256")
    with pytest.raises(CmsError) as err:
        decrypt_enveloped(der, world.bob.cert, world.carol.key)
    assert err.value.code == "decrypt-failed"


def test_triple_des_is_refused(world: World, openssl: Openssl, tmp_path: Path) -> None:
    der = _encrypt(openssl, world, tmp_path, "des3")
    assert "des-ede3-cbc" in _print(openssl, tmp_path, der).lower()
    with pytest.raises(CmsError) as err:
        decrypt_enveloped(der, world.bob.cert, world.bob.key)
    assert err.value.code == "weak-cipher"
