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

import functools
import os
from collections.abc import Sequence
from typing import Literal

from asn1crypto import algos as aalgos
from asn1crypto import cms as acms
from asn1crypto import core, parser
from asn1crypto import keys as akeys
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.core.errors import CryptoError
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
# asn1crypto re-encodes a whole SEQUENCE each time one of its fields is set: a structure holding a
# megabyte of ciphertext would be copied once per later field, and a small one costs more than
# its RSA operation.  Parts are asn1crypto objects (cached per certificate where they do not
# change); the SEQUENCE/SET shells around them are emitted once with asn1crypto's DER primitive.
_UNIVERSAL, _CONTEXT, _PRIMITIVE, _CONSTRUCTED, _SEQUENCE, _SET = 0, 2, 0, 1, 16, 17


class EnvelopeError(CryptoError, ValueError):
    """A recipient certificate cannot be encrypted for; the message says which and why."""


@functools.lru_cache(maxsize=512)
def _rid_der(cert: x509.Certificate) -> bytes:
    """DER of the certificate's IssuerAndSerialNumber (RFC 5652 §10.2.4), once per certificate:
    parsing the issuer Name again for every message costs more than the RSA operation."""
    acert = ax509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return bytes(acms.IssuerAndSerialNumber({"issuer": acert.issuer, "serial_number": acert.serial_number}).dump())


def _oaep_params() -> acms.RSAESOAEPParams:
    """RSAES-OAEP-params with SHA-256 and MGF1-SHA-256, empty label (RFC 4055 §4.1, RFC 8551 §2.3)."""
    sha256 = aalgos.DigestAlgorithm({"algorithm": "sha256"})
    return aalgos.RSAESOAEPParams(
        {
            "hash_algorithm": sha256,
            "mask_gen_algorithm": aalgos.MaskGenAlgorithm({"algorithm": "mgf1", "parameters": sha256}),
        }
    )


_OAEP_DER = acms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": _oaep_params()}).dump()
_PKCS1V15_DER = acms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15", "parameters": core.Null()}).dump()


@functools.lru_cache(maxsize=512)
def _ktri_head(cert: x509.Certificate, transport: RsaKeyTransport) -> bytes:
    """DER of a KeyTransRecipientInfo's fields before encryptedKey (RFC 5652 §6.2.1: version 0,
    rid issuerAndSerialNumber, keyEncryptionAlgorithm), the same for every message to `cert`."""
    return bytes(core.Integer(0).dump() + _rid_der(cert) + (_OAEP_DER if transport == "oaep" else _PKCS1V15_DER))


def _ktri(cert: x509.Certificate, pub: rsa.RSAPublicKey, cek: bytes, transport: RsaKeyTransport) -> bytes:
    """DER of a RecipientInfo ktri (an untagged CHOICE alternative: the SEQUENCE itself)."""
    pad: padding.AsymmetricPadding
    if transport == "oaep":
        pad = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    else:
        pad = padding.PKCS1v15()
    encrypted = core.OctetString(pub.encrypt(cek, pad)).dump()
    return bytes(parser.emit(_UNIVERSAL, _CONSTRUCTED, _SEQUENCE, _ktri_head(cert, transport) + encrypted))


def _kari(cert: x509.Certificate, pub: ec.EllipticCurvePublicKey, cek: bytes) -> bytes:
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
    return bytes(acms.RecipientInfo(
        name="kari",
        value=acms.KeyAgreeRecipientInfo(
            {
                "version": "v3",
                "originator": acms.OriginatorIdentifierOrKey(name="originator_key", value=originator),
                "key_encryption_algorithm": key_enc_alg,
                "recipient_encrypted_keys": [
                    {
                        "rid": acms.KeyAgreementRecipientIdentifier(
                            name="issuer_and_serial_number", value=acms.IssuerAndSerialNumber.load(_rid_der(cert))
                        ),
                        "encrypted_key": keywrap.aes_key_wrap(kek, cek),
                    }
                ],
            }
        ),
    ).dump())


def _recipient_info(cert: x509.Certificate, cek: bytes, transport: RsaKeyTransport) -> bytes:
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
    infos: list[bytes] = []
    seen: set[bytes] = set()
    for cert in recipients:
        fp = cert.fingerprint(hashes.SHA256())
        if fp not in seen:
            seen.add(fp)
            infos.append(_recipient_info(cert, cek, rsa_key_transport))
    if not infos:
        raise EnvelopeError("no recipient certificate to encrypt for")

    # SET OF in DER order (X.690 §11.6); a ktri starts with the SEQUENCE tag, a kari with [1].
    rinfos = parser.emit(_UNIVERSAL, _CONSTRUCTED, _SET, b"".join(sorted(infos)))
    if alg_name.endswith("_gcm"):
        nonce = os.urandom(_GCM_NONCE_BYTES)
        ciphertext, tag = gcm_encrypt(cek, nonce, content)
        params = GcmParameters({"aes_nonce": nonce, "aes_icvlen": len(tag)})
        alg = acms.EncryptionAlgorithm({"algorithm": alg_name, "parameters": core.Any.load(params.dump())})
        # RFC 5083 §2.1: AuthEnvelopedData { version 0, recipientInfos, authEncryptedContentInfo, mac }.
        body = b"".join((core.Integer(0).dump(), rinfos, _encrypted_content_info(alg, ciphertext),
                         core.OctetString(tag).dump()))  # fmt: skip
        return _content_info("authenticated_enveloped_data", body)

    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    # RFC 5652 §6.3 padding (1 to 16 bytes of the pad length), fed after the content so the
    # content is not copied into a padded buffer first.
    pad = 16 - len(content) % 16
    ciphertext = b"".join((enc.update(content), enc.update(bytes([pad]) * pad), enc.finalize()))
    alg = acms.EncryptionAlgorithm({"algorithm": alg_name, "parameters": iv})
    # RFC 5652 §6.1: EnvelopedData { version, recipientInfos, encryptedContentInfo }.
    version = 0 if all(i[0] == 0x30 for i in infos) else 2
    body = b"".join((core.Integer(version).dump(), rinfos, _encrypted_content_info(alg, ciphertext)))
    return _content_info("enveloped_data", body)




def _encrypted_content_info(alg: acms.EncryptionAlgorithm, ciphertext: bytes) -> bytes:
    """RFC 5652 §6.1 EncryptedContentInfo { contentType data, contentEncryptionAlgorithm,
    encryptedContent [0] IMPLICIT OCTET STRING }."""
    return bytes(parser.emit(_UNIVERSAL, _CONSTRUCTED, _SEQUENCE, b"".join((
        acms.ContentType("data").dump(), alg.dump(), parser.emit(_CONTEXT, _PRIMITIVE, 0, ciphertext)))))  # fmt: skip


def _content_info(content_type: str, body: bytes) -> bytes:
    """RFC 5652 §3 ContentInfo { contentType, content [0] EXPLICIT } around a SEQUENCE `body`."""
    inner = parser.emit(_UNIVERSAL, _CONSTRUCTED, _SEQUENCE, body)
    return bytes(parser.emit(_UNIVERSAL, _CONSTRUCTED, _SEQUENCE,
                       acms.ContentType(content_type).dump() + parser.emit(_CONTEXT, _CONSTRUCTED, 0, inner)))  # fmt: skip
