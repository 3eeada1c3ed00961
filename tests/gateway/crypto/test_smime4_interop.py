"""S/MIME 4.0 interoperability matrix with `openssl cms` (OpenSSL 3.0) as the independent oracle.

Both directions, parametrised over what OpenSSL 3.0 can produce or open:
- OpenSSL builds, we open: AES-256-CBC / AES-128-GCM / AES-256-GCM x RSA PKCS#1 v1.5 / RSA-OAEP /
  ECDH P-256 (SHA-1 and SHA-256 KDF) / ECDH P-384 x RSA / RSA-PSS / ECDSA signer x detached /
  opaque x sign-then-encrypt / encrypt-then-sign, plus triple wrapping.
- We build, OpenSSL opens: the same ciphers x RSA v1.5 / OAEP / ECDH x RSA / PSS / ECDSA signers.
- Ed25519: OpenSSL 3.0 can neither sign nor verify CMS with it ("invalid digest"), so the
  SignedData is assembled here from RFC 8419 with asn1crypto, signed by `openssl pkeyutl -rawin`
  and parsed by `openssl cms -cmsout` before we verify it.  X25519 (RFC 8418) is absent: `openssl cms` 3.0 cannot encrypt to it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms as acms
from asn1crypto import core
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.pki import load_private_key
from gateway.crypto import _mime
from gateway.crypto.smime import SmimeError, open_message, protect, sign_only

Openssl = Callable[..., bytes]


@dataclass(frozen=True)
class Who:
    email: str
    cert: x509.Certificate
    key: Any
    cert_path: Path
    key_path: Path


def _issue(world: Any, name: str, email: str, key: Any, *, agreement: bool = True,
           encipher: bool = False) -> Who:  # fmt: skip
    """A mailbox certificate from the test CA for a non-RSA key, with the profile RFC 8550 and
    RFC 5480 §3 give it: digitalSignature, keyAgreement for ECDH keys."""
    ca = world.ca
    ca_key = load_private_key(world.pki.ca_key)
    now = dt.datetime.now(dt.UTC)
    ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=encipher,
                       data_encipherment=False, key_agreement=agreement, key_cert_sign=False, crl_sign=False,
                       encipher_only=False, decipher_only=False)  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, email)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    d: Path = world.directory
    cp, kp = d / f"{name}.pem", d / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))  # fmt: skip
    kp.chmod(0o600)
    return Who(email, cert, key, cp, kp)


@dataclass(frozen=True)
class Ec:
    alice: Who  # ECDSA P-256 signer at a.test
    bob: Who  # ECDH P-256 recipient at b.test
    bob384: Who  # ECDH P-384 recipient at b.test
    ed: Who  # Ed25519 signer at a.test


@pytest.fixture(scope="session")
def ecw(world: Any) -> Ec:
    return Ec(
        alice=_issue(world, "ec-alice", "ec.alice@a.test", ec.generate_private_key(ec.SECP256R1())),
        bob=_issue(world, "ec-bob", "ec.bob@b.test", ec.generate_private_key(ec.SECP256R1())),
        bob384=_issue(world, "ec-bob384", "ec.bob384@b.test", ec.generate_private_key(ec.SECP384R1())),
        ed=_issue(world, "ed-alice", "ed.alice@a.test", ed25519.Ed25519PrivateKey.generate(), agreement=False),
    )


def _rsa(world: Any, name: str) -> Who:
    i = getattr(world, name)
    return Who(i.email, i.cert, i.key, i.cert_path, i.key_path)


# --- OpenSSL builds, we open ----------------------------------------------------------------------

CIPHERS = {"aes-256-cbc": "-aes-256-cbc", "aes-128-gcm": "-aes-128-gcm", "aes-256-gcm": "-aes-256-gcm"}
#: key management name -> (recipient, openssl -keyopt options, key_transport reported by us)
KEY_MGMT: dict[str, tuple[str, list[str], str]] = {
    "kt-rsa15": ("bob", [], "rsa-pkcs1v15"),
    "kt-oaep": ("bob", ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"], "rsa-oaep"),
    "ka-p256-sha1kdf": ("ec.bob", [], "ecdh-secp256r1"),
    "ka-p256-sha256kdf": ("ec.bob", ["-keyopt", "ecdh_kdf_md:sha256"], "ecdh-secp256r1"),
    "ka-p384-sha384kdf": ("ec.bob384", ["-keyopt", "ecdh_kdf_md:sha384"], "ecdh-secp384r1"),
}
#: signer name -> (signer, openssl -keyopt options, signature_algorithm reported by us)
SIGNERS: dict[str, tuple[str, list[str], str]] = {
    "sig-rsa15": ("alice", [], "rsa-pkcs1v15"),
    "sig-pss": ("alice", ["-keyopt", "rsa_padding_mode:pss"], "rsa-pss"),
    "sig-ecdsa": ("ec.alice", [], "ecdsa"),
}
FORMS = ("detached", "opaque")
ORDERS = ("sign-then-encrypt", "encrypt-then-sign")


def _who(world: Any, ecw: Ec, name: str) -> Who:
    if name.startswith("ec."):
        return getattr(ecw, name[3:])  # type: ignore[no-any-return]
    return _rsa(world, name)


def _message(sender: str, to: str) -> bytes:
    return (f"From: Dr Sender <{sender}>\r\nTo: {to}\r\nSubject: Resultats patient DUPONT\r\n"
            "Date: Tue, 02 Jan 2024 10:00:00 +0100\r\nMessage-ID: <m4@a.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            ).encode() + "Bonjour, voici les résultats.\r\n".encode()  # fmt: skip


def _ossl_sign(openssl: Openssl, signer: Who, keyopts: list[str], form: str, content: bytes) -> bytes:
    args = ["cms", "-sign", "-signer", str(signer.cert_path), "-inkey", str(signer.key_path), *keyopts,
            "-md", "sha256", "-binary"]  # fmt: skip
    if form == "opaque":
        args.append("-nodetach")
    return openssl(*args, stdin=content)


def _ossl_encrypt(openssl: Openssl, cipher: str, recipient: Who, keyopts: list[str], content: bytes) -> bytes:
    return openssl("cms", "-encrypt", CIPHERS[cipher], "-binary", "-recip", str(recipient.cert_path), *keyopts,
                   stdin=content)  # fmt: skip


MATRIX_IN = list(itertools.product(CIPHERS, KEY_MGMT, SIGNERS, FORMS, ORDERS))


@pytest.mark.parametrize(("cipher", "kmgmt", "signer_name", "form", "order"), MATRIX_IN,
                         ids=["-".join(c) for c in MATRIX_IN])  # fmt: skip
def test_smime4_openssl_builds_we_open(world: Any, ecw: Ec, openssl: Openssl, cipher: str, kmgmt: str,
                                       signer_name: str, form: str, order: str) -> None:  # fmt: skip
    rname, enc_opts, transport = KEY_MGMT[kmgmt]
    sname, sig_opts, sig_alg = SIGNERS[signer_name]
    recipient, signer = _who(world, ecw, rname), _who(world, ecw, sname)
    msg = _message(signer.email, recipient.email)
    wrapped = b"Content-Type: message/rfc822\r\n\r\n" + msg
    if order == "sign-then-encrypt":
        out = _ossl_encrypt(openssl, cipher, recipient, enc_opts, _ossl_sign(openssl, signer, sig_opts, form, wrapped))
    else:
        out = _ossl_sign(openssl, signer, sig_opts, form, _ossl_encrypt(openssl, cipher, recipient, enc_opts, wrapped))
    inner, res = open_message(out, recipient_cert=recipient.cert, recipient_key=recipient.key, trust=world.trust)
    assert res.ok, res
    assert inner == msg
    assert (res.content_algorithm, res.key_transport, res.signature_algorithm) == (cipher, transport, sig_alg)
    assert res.signer_email == signer.email and res.digest_algorithm == "sha256"


@pytest.mark.parametrize("cipher", ["aes-256-cbc", "aes-256-gcm"])
def test_smime4_openssl_triple_wrapped_we_open(world: Any, ecw: Ec, openssl: Openssl, cipher: str) -> None:
    """RFC 8551 §3.7 / RFC 2634 §1.1: signed (the author, ECDSA), encrypted (ECDH), signed again
    (a relaying agent, RSA).  Both signatures must hold; the author's is the one reported."""
    msg = _message(ecw.alice.email, ecw.bob.email)
    inner_signed = _ossl_sign(openssl, ecw.alice, [], "detached", b"Content-Type: message/rfc822\r\n\r\n" + msg)
    enc = _ossl_encrypt(openssl, cipher, ecw.bob, [], inner_signed)
    out = _ossl_sign(openssl, _rsa(world, "carol"), [], "opaque", enc)
    inner, res = open_message(out, recipient_cert=ecw.bob.cert, recipient_key=ecw.bob.key, trust=world.trust)
    assert res.ok, res
    assert inner == msg and res.signer_email == ecw.alice.email and res.signature_algorithm == "ecdsa"
    assert res.content_algorithm == cipher

    # An outer signature by a certificate we do not trust fails the message, though the author's holds.
    foreign = _rsa(world, "foreign")
    bad = _ossl_sign(openssl, foreign, [], "opaque", enc)
    _, res2 = open_message(bad, recipient_cert=ecw.bob.cert, recipient_key=ecw.bob.key, trust=world.trust)
    assert not res2.ok and res2.failure == "untrusted-ca" and "outer signature" in res2.detail


def test_smime4_tampered_gcm_is_decrypt_failed(world: Any, ecw: Ec, openssl: Openssl) -> None:
    """The GCM tag covers every ciphertext byte (RFC 5083 §2.1): one flipped bit is refused."""
    msg = _message(ecw.alice.email, ecw.bob.email)
    signed = _ossl_sign(openssl, ecw.alice, [], "detached", b"Content-Type: message/rfc822\r\n\r\n" + msg)
    der = openssl("cms", "-encrypt", "-aes-256-gcm", "-binary", "-outform", "DER", "-recip",
                  str(ecw.bob.cert_path), stdin=signed)  # fmt: skip
    ci = acms.ContentInfo.load(der)
    eci = ci["content"]["auth_encrypted_content_info"]
    ct = bytearray(eci["encrypted_content"].native)
    ct[len(ct) // 2] ^= 0x01
    eci["encrypted_content"] = bytes(ct)
    bad = (b"Content-Type: application/pkcs7-mime; smime-type=authEnveloped-data\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + _mime.b64_lines(ci.dump(force=True)))  # fmt: skip
    inner, res = open_message(bad, recipient_cert=ecw.bob.cert, recipient_key=ecw.bob.key, trust=world.trust)
    assert inner is None and res.failure == "decrypt-failed" and not res.ok
    # Addressed to an EC key, opened with an RSA one: not ours, said so.
    _, res3 = open_message(bad, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust)
    assert res3.failure == "wrong-recipient"


# --- Ed25519 (RFC 8419) -----------------------------------------------------------------------------


def _ed25519_signed(world: Any, who: Who, content: bytes) -> bytes:
    """multipart/signed with an RFC 8419 SignerInfo: SHA-512 messageDigest, PureEdDSA over the DER
    of the signed attributes, produced by `openssl pkeyutl -sign -rawin` (not by our code)."""
    attrs = acms.CMSAttributes([
        acms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        acms.CMSAttribute({"type": "signing_time", "values": [acms.Time(name="utc_time", value=dt.datetime.now(dt.UTC))]}),
        acms.CMSAttribute({"type": "message_digest", "values": [hashlib.sha512(content).digest()]}),
    ])  # fmt: skip
    to_sign = attrs.dump()  # a SET OF: tag 0x31, as RFC 5652 §5.4 requires for the signature input
    # OpenSSL 3.0 reads -rawin input for EdDSA from a file only (one-shot signing).
    with tempfile.NamedTemporaryFile(dir=who.key_path.parent, suffix=".tbs") as tbs:
        tbs.write(to_sign)
        tbs.flush()
        proc = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(who.key_path), "-in", tbs.name],
                              capture_output=True, check=True)  # fmt: skip
    acert = ax509.Certificate.load(who.cert.public_bytes(serialization.Encoding.DER))
    si = acms.SignerInfo({
        "version": "v1",
        "sid": acms.SignerIdentifier(name="issuer_and_serial_number", value=acms.IssuerAndSerialNumber(
            {"issuer": acert.issuer, "serial_number": acert.serial_number})),
        "digest_algorithm": {"algorithm": "sha512"},
        "signed_attrs": attrs,
        "signature_algorithm": {"algorithm": "ed25519"},
        "signature": proc.stdout,
    })  # fmt: skip
    sd = acms.SignedData({
        "version": "v1",
        "digest_algorithms": [{"algorithm": "sha512"}],
        "encap_content_info": {"content_type": "data"},
        "certificates": [acert],
        "signer_infos": [si],
    })  # fmt: skip
    der = acms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()
    b = b"=_ed25519_boundary"
    return b"".join([
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-512;'
        b' boundary="', b, b'"\r\n\r\n--', b, b"\r\n", content, b"\r\n--", b, b"\r\n",
        b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64\r\n\r\n",
        _mime.b64_lines(der), b"\r\n--", b, b"--\r\n",
    ])  # fmt: skip


@pytest.mark.parametrize("cipher", ["aes-256-cbc", "aes-256-gcm"])
def test_smime4_ed25519_signature_verified(world: Any, ecw: Ec, openssl: Openssl, cipher: str) -> None:
    msg = _message(ecw.ed.email, world.bob.email)
    wrapped = b"Content-Type: message/rfc822\r\n\r\n" + msg
    signed = _ed25519_signed(world, ecw.ed, wrapped)
    # OpenSSL parses the structure as CMS (its 3.0 `cms -verify` fails on any EdDSA SignerInfo with
    # "invalid digest", the same bug that stops `cms -sign`, so it cannot judge the signature).
    printed = openssl("cms", "-cmsout", "-print", stdin=signed)
    assert b"ED25519" in printed and b"sha512" in printed and b"messageDigest" in printed
    out = openssl("cms", "-encrypt", CIPHERS[cipher], "-binary", "-recip", str(world.bob.cert_path), stdin=signed)
    inner, res = open_message(out, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust)
    assert res.ok, res
    assert inner == msg and res.signature_algorithm == "ed25519" and res.digest_algorithm == "sha512"
    # One byte changed in the content: the SHA-512 messageDigest no longer matches.
    tampered = signed.replace("résultats".encode(), b"resultats!")
    _, bad = open_message(tampered, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust,
                          require_encryption=False)  # fmt: skip
    assert bad.failure == "tampered-content" and not bad.ok


# --- We build, OpenSSL opens -------------------------------------------------------------------------

#: recipient name -> (recipient, openssl -cmsout marker of the recipient info)
OUT_KEY_MGMT: dict[str, tuple[str, str, bytes]] = {
    "kt-rsa15": ("bob", "pkcs1v15", b"rsaEncryption"),
    "kt-oaep": ("bob", "oaep", b"rsaesOaep"),
    "ka-p256": ("ec.bob", "pkcs1v15", b"dhSinglePass-stdDH-sha256kdf-scheme"),
    "ka-p384": ("ec.bob384", "pkcs1v15", b"dhSinglePass-stdDH-sha384kdf-scheme"),
}
OUT_SIGNERS: dict[str, tuple[str, str, bytes]] = {
    "sig-rsa15": ("alice", "pkcs1v15", b"sha256WithRSAEncryption"),
    "sig-pss": ("alice", "pss", b"rsassaPss"),
    "sig-ecdsa": ("ec.alice", "pkcs1v15", b"ecdsa-with-SHA256"),
}
MATRIX_OUT = list(itertools.product(CIPHERS, OUT_KEY_MGMT, OUT_SIGNERS))


@pytest.mark.parametrize(("cipher", "kmgmt", "signer_name"), MATRIX_OUT, ids=["-".join(c) for c in MATRIX_OUT])
def test_smime4_we_build_openssl_opens(world: Any, ecw: Ec, openssl: Openssl, cipher: str, kmgmt: str,
                                       signer_name: str) -> None:  # fmt: skip
    rname, transport, ri_marker = OUT_KEY_MGMT[kmgmt]
    sname, rsa_sig, sig_marker = OUT_SIGNERS[signer_name]
    recipient, signer = _who(world, ecw, rname), _who(world, ecw, sname)
    msg = _message(signer.email, recipient.email)
    out = protect(msg, signer_cert=signer.cert, signer_key=signer.key, recipient_certs=[recipient.cert],
                  content_encryption=cipher, rsa_key_transport=transport, rsa_signature=rsa_sig)  # type: ignore[arg-type]
    assert b"smime-type=" + (b"authEnveloped-data" if "gcm" in cipher else b"enveloped-data") in out
    for who in (recipient, signer):  # the recipient and the sender's own copy
        dec = openssl("cms", "-decrypt", "-recip", str(who.cert_path), "-inkey", str(who.key_path), stdin=out)
        verified = openssl("cms", "-verify", "-CAfile", str(world.pki.ca_cert), "-purpose", "smimesign", stdin=dec)
        assert verified == b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + msg
    der = _mime.b64decode_body(_mime.split_entity(out)[1])
    info = openssl("cms", "-cmsout", "-print", "-inform", "DER", stdin=der)
    assert cipher.encode() in info and ri_marker in info
    sig_info = openssl("cms", "-cmsout", "-print", stdin=dec)
    assert sig_marker in sig_info
    # And we open our own output the same way we open OpenSSL's.
    inner, res = open_message(out, recipient_cert=recipient.cert, recipient_key=recipient.key, trust=world.trust)
    assert res.ok and inner == msg and res.content_algorithm == cipher


@pytest.mark.parametrize(("signer_name", "form"), list(itertools.product(OUT_SIGNERS, FORMS)))
def test_smime4_we_sign_openssl_verifies(world: Any, ecw: Ec, openssl: Openssl, signer_name: str,
                                         form: str) -> None:  # fmt: skip
    opaque = form == "opaque"
    sname, rsa_sig, sig_marker = OUT_SIGNERS[signer_name]
    signer = _who(world, ecw, sname)
    msg = _message(signer.email, "sec@b.test")
    out = sign_only(msg, signer_cert=signer.cert, signer_key=signer.key, rsa_signature=rsa_sig,  # type: ignore[arg-type]
                    opaque=opaque)  # fmt: skip
    ctype = _mime.header_value(_mime.parse_headers(_mime.header_block(out)), "content-type") or ""
    assert ctype.startswith("application/pkcs7-mime; smime-type=signed-data" if opaque else "multipart/signed")
    verified = openssl("cms", "-verify", "-CAfile", str(world.pki.ca_cert), "-purpose", "smimesign", stdin=out)
    assert verified.endswith(msg)
    assert sig_marker in openssl("cms", "-cmsout", "-print", stdin=out)


def test_smime4_capabilities_choose_the_cipher(world: Any, ecw: Ec, openssl: Openssl) -> None:
    """A recipient certificate announcing S/MIME capabilities (RFC 4262) without GCM gets
    AES-256-CBC; one announcing only AES-128-GCM gets it; a silent one gets the configured cipher."""
    def with_caps(name: str, caps: list[str]) -> Who:
        key = ec.generate_private_key(ec.SECP256R1())
        who = _issue(world, name, f"{name}@b.test", key)
        value = acms.SMIMECapabilites([{"capability_id": c} for c in caps]).dump()
        ca_key = load_private_key(world.pki.ca_key)
        cert = (x509.CertificateBuilder().subject_name(who.cert.subject).issuer_name(who.cert.issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(who.cert.not_valid_before_utc).not_valid_after(who.cert.not_valid_after_utc))  # fmt: skip
        for ext in who.cert.extensions:
            cert = cert.add_extension(ext.value, ext.critical)
        cert = cert.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.840.113549.1.9.15"), value),
                                  critical=False)  # fmt: skip
        signed = cert.sign(ca_key, hashes.SHA256())
        who.cert_path.write_bytes(signed.public_bytes(serialization.Encoding.PEM))
        return Who(who.email, signed, key, who.cert_path, who.key_path)

    old = with_caps("old-peer", ["aes256_cbc", "aes128_cbc"])
    gcm128 = with_caps("gcm128-peer", ["aes128_gcm", "aes256_cbc"])
    cases = [([old], "aes-256-cbc"), ([gcm128], "aes-128-gcm"), ([ecw.bob], "aes-256-gcm"),
             ([ecw.bob, old], "aes-256-cbc")]  # fmt: skip
    for recipients, expected in cases:
        msg = _message(world.alice.email, recipients[0].email)
        out = protect(msg, signer_cert=world.alice.cert, signer_key=world.alice.key,
                      recipient_certs=[r.cert for r in recipients])  # fmt: skip
        for r in recipients:
            dec = openssl("cms", "-decrypt", "-recip", str(r.cert_path), "-inkey", str(r.key_path), stdin=out)
            assert openssl("cms", "-verify", "-CAfile", str(world.pki.ca_cert), stdin=dec).endswith(msg)
        info = openssl("cms", "-cmsout", "-print", "-inform", "DER",
                       stdin=_mime.b64decode_body(_mime.split_entity(out)[1]))  # fmt: skip
        assert expected.encode() in info, (expected, [r.email for r in recipients])


def test_smime4_unusable_recipient_is_refused_with_the_reason(world: Any, ecw: Ec) -> None:
    msg = _message(world.alice.email, ecw.ed.email)
    with pytest.raises(SmimeError, match="Ed25519 key can only sign"):
        protect(msg, signer_cert=world.alice.cert, signer_key=world.alice.key, recipient_certs=[ecw.ed.cert])
    with pytest.raises(SmimeError, match="cannot sign"):
        protect(msg, signer_cert=ecw.ed.cert, signer_key=ecw.ed.key, recipient_certs=[world.bob.cert])


def test_smime4_der_sanity() -> None:
    """The GCMParameters we write decode as RFC 5084 says (default ICV length 12 when absent)."""
    from gateway.crypto.cms_keys import GcmParameters

    enc = GcmParameters({"aes_nonce": b"\x00" * 12, "aes_icvlen": 16}).dump()
    assert GcmParameters.load(enc)["aes_icvlen"].native == 16
    assert GcmParameters.load(core.Sequence.load(b"\x30\x0e\x04\x0c" + b"\x01" * 12).dump())["aes_icvlen"].native == 12
