"""Build CMS EnvelopedData and AuthEnvelopedData for S/MIME recipients with RSA or EC keys.

The job: encrypt a MIME entity for a set of recipient certificates, the way RFC 8551 §2.7 asks
of a sending agent, where `cryptography`'s PKCS7EnvelopeBuilder stops (RSA PKCS#1 v1.5 and
AES-CBC only).  The structures are written with `asn1crypto.cms`; every primitive (RSA, ECDH,
X9.63 KDF, AES key wrap, AES-CBC/GCM) comes from `cryptography`.

- Content encryption: AES-128-GCM or AES-256-GCM in AuthEnvelopedData (RFC 5083 §2.1,
  RFC 5084 §3.2: 12-byte random nonce, 16-byte ICV, no authenticated attributes), or
  AES-256-CBC in EnvelopedData (RFC 5652 §6.1, RFC 3565 §2.3.1) for peers that predate S/MIME 4.0.
- RSA recipients: KeyTransRecipientInfo (RFC 5652 §6.2.1) with RSAES-PKCS1-v1_5 or RSAES-OAEP
  with SHA-256 and MGF1-SHA-256 (RFC 3560 §3, RFC 8017 §7.1).
- EC recipients: KeyAgreeRecipientInfo (RFC 5652 §6.2.2, RFC 5753 §3.1.1): one ephemeral key
  per recipient, dhSinglePass-stdDH-shaNNNkdf-scheme matched to the curve, AES-256 key wrap.
- Versions per RFC 5652 §6.1 (0 when every recipient is KTRI by issuer and serial, else 2) and
  RFC 5083 §2.1 (always 0).

Errors: `EnvelopeError` (a ValueError) names the certificate that cannot be encrypted for and why.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

from asn1crypto import algos as aalgos
from asn1crypto import cms as acms
from asn1crypto import core
from asn1crypto import keys as akeys
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives import padding as sympadding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.crypto.cms_keys import (
    ECDH_KDF_SCHEMES,
    SEND_SCHEME,
    GcmParameters,
    encryption_problem,
    gcm_encrypt,
    kari_kek,
)

__all__ = [
    "CONTENT_ENCRYPTIONS",
    "DEFAULT_CONTENT_ENCRYPTION",
    "RSA_KEY_TRANSPORTS",
    "ContentEncryption",
    "EnvelopeError",
    "RsaKeyTransport",
    "choose_content_encryption",
    "envelope",
]

ContentEncryption = Literal["aes-256-gcm", "aes-128-gcm", "aes-256-cbc"]
RsaKeyTransport = Literal["pkcs1v15", "oaep"]
CONTENT_ENCRYPTIONS: tuple[ContentEncryption, ...] = ("aes-256-gcm", "aes-128-gcm", "aes-256-cbc")
RSA_KEY_TRANSPORTS: tuple[RsaKeyTransport, ...] = ("pkcs1v15", "oaep")

_CONTENT = {
    "aes-256-gcm": ("aes256_gcm", 32),
    "aes-128-gcm": ("aes128_gcm", 16),
    "aes-256-cbc": ("aes256_cbc", 32),
}
#: RFC 8551 §2.7: receiving agents MUST support AES-128-GCM and AES-256-GCM, so a recipient
#: whose certificate says nothing gets GCM (`crypto.content_encryption` may say otherwise).
DEFAULT_CONTENT_ENCRYPTION: ContentEncryption = "aes-256-gcm"
_SMIME_CAPABILITIES_OID = x509.ObjectIdentifier("1.2.840.113549.1.9.15")  # RFC 4262 §2
_WRAP_DER = acms.KeyEncryptionAlgorithm({"algorithm": "aes256_wrap"}).dump()
_GCM_NONCE_BYTES = 12  # RFC 5084 §3.2: "the nonce ... 12 octets" recommended


class EnvelopeError(ValueError):
    """A recipient certificate cannot be encrypted for; the message says which and why."""


def _issuer_serial(cert: x509.Certificate) -> acms.IssuerAndSerialNumber:
    acert = ax509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return acms.IssuerAndSerialNumber({"issuer": acert.issuer, "serial_number": acert.serial_number})


def _oaep_params() -> acms.RSAESOAEPParams:
    """RSAES-OAEP-params with SHA-256 and MGF1-SHA-256, empty label (RFC 4055 §4.1, RFC 8551 §2.3)."""
    sha256 = aalgos.DigestAlgorithm({"algorithm": "sha256"})
    return aalgos.RSAESOAEPParams(
        {
            "hash_algorithm": sha256,
            "mask_gen_algorithm": aalgos.MaskGenAlgorithm({"algorithm": "mgf1", "parameters": sha256}),
        }
    )


def _ktri(cert: x509.Certificate, pub: rsa.RSAPublicKey, cek: bytes, transport: RsaKeyTransport) -> acms.RecipientInfo:
    if transport == "oaep":
        pad: padding.AsymmetricPadding = padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
        alg = acms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": _oaep_params()})
    else:
        pad = padding.PKCS1v15()
        alg = acms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15", "parameters": core.Null()})
    return acms.RecipientInfo(
        name="ktri",
        value=acms.KeyTransRecipientInfo(
            {
                "version": "v0",
                "rid": acms.RecipientIdentifier(name="issuer_and_serial_number", value=_issuer_serial(cert)),
                "key_encryption_algorithm": alg,
                "encrypted_key": pub.encrypt(cek, pad),
            }
        ),
    )


def _kari(cert: x509.Certificate, pub: ec.EllipticCurvePublicKey, cek: bytes) -> acms.RecipientInfo:
    """RFC 5753 §3.1.1: ephemeral-static ECDH, X9.63 KDF, AES-256 key wrap of the content key."""
    scheme = SEND_SCHEME[pub.curve.name]
    ephemeral = ec.generate_private_key(pub.curve)
    shared = ephemeral.exchange(ec.ECDH(), pub)
    kek = kari_kek(shared, ECDH_KDF_SCHEMES[scheme], _WRAP_DER, 32, None)
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    originator = akeys.PublicKeyInfo(
        {
            # RFC 5753 §3.1.1: parameters absent (the curve is the recipient's).
            "algorithm": akeys.PublicKeyAlgorithm({"algorithm": "ec"}),
            "public_key": akeys.ECPointBitString(point),
        }
    )
    key_enc_alg = acms.KeyEncryptionAlgorithm(
        {"algorithm": scheme, "parameters": core.Any.load(_WRAP_DER)}
    )
    return acms.RecipientInfo(
        name="kari",
        value=acms.KeyAgreeRecipientInfo(
            {
                "version": "v3",
                "originator": acms.OriginatorIdentifierOrKey(name="originator_key", value=originator),
                "key_encryption_algorithm": key_enc_alg,
                "recipient_encrypted_keys": [
                    {
                        "rid": acms.KeyAgreementRecipientIdentifier(
                            name="issuer_and_serial_number", value=_issuer_serial(cert)
                        ),
                        "encrypted_key": keywrap.aes_key_wrap(kek, cek),
                    }
                ],
            }
        ),
    )


def _recipient_info(cert: x509.Certificate, cek: bytes, transport: RsaKeyTransport) -> acms.RecipientInfo:
    problem = encryption_problem(cert)
    if problem is not None:
        raise EnvelopeError(f"cannot encrypt for {cert.subject.rfc4514_string()}: {problem}")
    pub = cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        return _ktri(cert, pub, cek, transport)
    assert isinstance(pub, ec.EllipticCurvePublicKey)  # encryption_problem allows nothing else
    return _kari(cert, pub, cek)


def _capabilities(cert: x509.Certificate) -> frozenset[str] | None:
    """The content-encryption capabilities a certificate announces (RFC 4262 SMIMECapabilities
    extension, RFC 8551 §2.5.2 ordering ignored), or None when it announces none."""
    try:
        ext = cert.extensions.get_extension_for_oid(_SMIME_CAPABILITIES_OID).value
    except x509.ExtensionNotFound:
        return None
    der = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    try:
        caps = acms.SMIMECapabilites.load(der)
        names = frozenset(str(c["capability_id"].native) for c in caps)
    except (ValueError, TypeError, KeyError):
        return None  # unreadable: treated as silent, the configured default applies
    return names or None


def choose_content_encryption(preferred: ContentEncryption,
                              recipients: Sequence[x509.Certificate]) -> ContentEncryption:  # fmt: skip
    """The cipher every recipient can open: `preferred`, unless a recipient's certificate lists
    its capabilities (RFC 4262) and GCM is not among them (then AES-256-CBC, RFC 8551 §2.7
    "CBC for old peers"), or lists AES-128-GCM but not AES-256-GCM (then AES-128-GCM)."""
    chosen = preferred
    for cert in recipients:
        caps = _capabilities(cert)
        if caps is None or chosen == "aes-256-cbc":
            continue
        gcm = caps & {"aes128_gcm", "aes256_gcm"}
        if not gcm:
            chosen = "aes-256-cbc"
        elif chosen == "aes-256-gcm" and "aes256_gcm" not in gcm:
            chosen = "aes-128-gcm"
    return chosen


def envelope(content: bytes, recipients: Sequence[x509.Certificate], *,
             content_encryption: ContentEncryption = "aes-256-gcm",
             rsa_key_transport: RsaKeyTransport = "pkcs1v15") -> bytes:  # fmt: skip
    """DER ContentInfo of `content` encrypted for every certificate in `recipients` (duplicates
    by SHA-256 fingerprint are encrypted for once)."""
    if content_encryption not in _CONTENT:
        raise EnvelopeError(f"unknown content encryption {content_encryption!r}")
    if rsa_key_transport not in RSA_KEY_TRANSPORTS:
        raise EnvelopeError(f"unknown RSA key transport {rsa_key_transport!r}")
    alg_name, key_bytes = _CONTENT[content_encryption]
    cek = os.urandom(key_bytes)
    infos: list[acms.RecipientInfo] = []
    seen: set[bytes] = set()
    for cert in recipients:
        fp = cert.fingerprint(hashes.SHA256())
        if fp not in seen:
            seen.add(fp)
            infos.append(_recipient_info(cert, cek, rsa_key_transport))
    if not infos:
        raise EnvelopeError("no recipient certificate to encrypt for")

    if alg_name.endswith("_gcm"):
        nonce = os.urandom(_GCM_NONCE_BYTES)
        ciphertext, tag = gcm_encrypt(cek, nonce, content)
        params = GcmParameters({"aes_nonce": nonce, "aes_icvlen": len(tag)})
        auth_env = acms.AuthEnvelopedData(
            {
                "version": "v0",
                "recipient_infos": infos,
                "auth_encrypted_content_info": {
                    "content_type": "data",
                    "content_encryption_algorithm": {"algorithm": alg_name, "parameters": core.Any.load(params.dump())},
                    "encrypted_content": ciphertext,
                },
                "mac": tag,
            }
        )
        return acms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": auth_env}).dump()

    iv = os.urandom(16)
    padder = sympadding.PKCS7(128).padder()
    padded = padder.update(content) + padder.finalize()
    enc = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = enc.update(padded) + enc.finalize()
    version = "v0" if all(i.name == "ktri" for i in infos) else "v2"
    env = acms.EnvelopedData(
        {
            "version": version,
            "recipient_infos": infos,
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {"algorithm": alg_name, "parameters": iv},
                "encrypted_content": ciphertext,
            },
        }
    )
    return acms.ContentInfo({"content_type": "enveloped_data", "content": env}).dump()
