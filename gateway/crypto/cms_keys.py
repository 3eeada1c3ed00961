"""CMS key management and authenticated content encryption shared by opening and building S/MIME.

The job: the pieces of S/MIME 4.0 (RFC 8551) that `cryptography` has no CMS form for, used the
same way in both directions so a message we build is opened by exactly the code that opens a
peer's:

- ECDH ephemeral-static key agreement (RFC 5753 §3.1, RFC 5652 §6.2.2 KeyAgreeRecipientInfo):
  the ANSI X9.63 KDF over the shared secret with the DER of ECC-CMS-SharedInfo (RFC 5753 §7.2)
  as its shared info, then AES key wrap (RFC 3394, RFC 3565 §2.3.2) of the content key.
  Schemes dhSinglePass-stdDH-sha{1,224,256,384,512}kdf and their cofactor variants (identical
  on the prime curves P-256/P-384/P-521, whose cofactor is 1).  X25519 (RFC 8418) is not
  offered: OpenSSL 3.0's `openssl cms` cannot encrypt or decrypt it, so it has no independent
  oracle here.
- AES-GCM content encryption (RFC 5084 §3.2, GCMParameters) for AuthEnvelopedData (RFC 5083).
- Which certificates we can encrypt for and which keys we can sign with, in one place, so that
  `mssgw certs import` refuses what delivery could not use (RFC 8551 §2.3, §2.2, RFC 5480).

Errors: `ValueError` from the helpers on bad parameters (the callers turn it into their own
error codes); `encryption_problem`/`signing_problem` return a sentence or None, never raise.
"""

from __future__ import annotations

import functools
from typing import Union

from asn1crypto import algos as aalgos
from asn1crypto import core
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

__all__ = [
    "ECDH_KDF_SCHEMES",
    "MIN_RSA_BITS",
    "SUPPORTED_CURVES",
    "WRAP_KEY_BYTES",
    "EccCmsSharedInfo",
    "GcmParameters",
    "PrivateKey",
    "encryption_problem",
    "gcm_decrypt",
    "gcm_encrypt",
    "kari_kek",
    "signing_problem",
]

#: The private keys a mailbox or operator may hold for S/MIME.
PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]  # noqa: UP007 (a runtime alias)

#: RSA below this size is refused for encryption and signing (RFC 8551 §4.1: 2048 and up).
MIN_RSA_BITS = 2048
#: Curves with an ECDH/ECDSA profile in CMS (RFC 5753 §7.1.1, RFC 5480 §2.1.1.1).
SUPPORTED_CURVES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}

#: KeyAgreeRecipientInfo key encryption algorithms (RFC 5753 §7.1.4, SEC 1 / RFC 8551 §2.3) and
#: the KDF hash each one names.  SHA-1 here is a KDF, not a signature digest: OpenSSL 3.0 uses
#: the sha1kdf scheme unless told otherwise, and RFC 5753 keeps it.
ECDH_KDF_SCHEMES: dict[str, type[hashes.HashAlgorithm]] = {
    "1.3.133.16.840.63.0.2": hashes.SHA1,  # dhSinglePass-stdDH-sha1kdf-scheme
    "1.3.133.16.840.63.0.3": hashes.SHA1,  # dhSinglePass-cofactorDH-sha1kdf-scheme
    "1.3.132.1.11.0": hashes.SHA224,  # dhSinglePass-stdDH-sha224kdf-scheme
    "1.3.132.1.11.1": hashes.SHA256,
    "1.3.132.1.11.2": hashes.SHA384,
    "1.3.132.1.11.3": hashes.SHA512,
    "1.3.132.1.14.0": hashes.SHA224,  # dhSinglePass-cofactorDH-sha224kdf-scheme
    "1.3.132.1.14.1": hashes.SHA256,
    "1.3.132.1.14.2": hashes.SHA384,
    "1.3.132.1.14.3": hashes.SHA512,
}
#: The stdDH scheme we send, per curve (RFC 5753 §8: the KDF hash matches the curve's strength).
SEND_SCHEME = {"secp256r1": "1.3.132.1.11.1", "secp384r1": "1.3.132.1.11.2", "secp521r1": "1.3.132.1.11.3"}
#: AES key wrap algorithms (RFC 3565 §2.3.2) and their key sizes.
WRAP_KEY_BYTES = {"aes128_wrap": 16, "aes192_wrap": 24, "aes256_wrap": 32}


class GcmParameters(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped
    """RFC 5084 §3.2: GCMParameters ::= SEQUENCE { aes-nonce OCTET STRING, aes-ICVlen AES-GCM-ICVlen DEFAULT 12 }."""

    _fields = [
        ("aes_nonce", core.OctetString),
        ("aes_icvlen", core.Integer, {"default": 12}),
    ]


class EccCmsSharedInfo(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped
    """RFC 5753 §7.2: the shared info fed to the KDF; suppPubInfo is the KEK length in bits."""

    _fields = [
        ("key_info", aalgos.AlgorithmIdentifier),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


def kari_kek(shared_secret: bytes, kdf_hash: type[hashes.HashAlgorithm], wrap_alg_der: bytes,
             key_bytes: int, ukm: bytes | None) -> bytes:  # fmt: skip
    """The key-encryption key of a KeyAgreeRecipientInfo (RFC 5753 §3.1.1 step 3, §7.2).

    `wrap_alg_der` is the KeyWrapAlgorithm AlgorithmIdentifier exactly as carried in the
    message (its parameters, if any, are part of the shared info)."""
    info = EccCmsSharedInfo(
        {
            "key_info": aalgos.AlgorithmIdentifier.load(wrap_alg_der),
            "entity_u_info": ukm,
            "supp_pub_info": (key_bytes * 8).to_bytes(4, "big"),
        }
    )
    return X963KDF(algorithm=kdf_hash(), length=key_bytes, sharedinfo=info.dump()).derive(shared_secret)


def gcm_encrypt(cek: bytes, nonce: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """(ciphertext, 16-byte tag) of AES-GCM without additional data (RFC 5084 §3.2, RFC 5083 §2.2)."""
    enc = Cipher(algorithms.AES(cek), modes.GCM(nonce)).encryptor()
    ciphertext = enc.update(plaintext) + enc.finalize()
    return ciphertext, enc.tag


def gcm_decrypt(cek: bytes, params_der: bytes, ciphertext: bytes, mac: bytes, aad: bytes) -> bytes:
    """Plaintext of AES-GCM content; raises ValueError (or InvalidTag) when anything does not hold.

    RFC 5084 §3.2: the ICV length is 12 to 16 octets and must equal the mac's length."""
    params = GcmParameters.load(params_der, strict=True)
    nonce = params["aes_nonce"].native
    icvlen = params["aes_icvlen"].native
    if not isinstance(nonce, bytes) or not 1 <= len(nonce) <= 64:
        raise ValueError("bad GCM nonce")
    if icvlen not in (12, 13, 14, 15, 16) or len(mac) != icvlen:
        raise ValueError("bad GCM ICV length")
    dec = Cipher(algorithms.AES(cek), modes.GCM(nonce, mac, min_tag_length=12)).decryptor()
    if aad:
        dec.authenticate_additional_data(aad)
    return dec.update(ciphertext) + dec.finalize()


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


@functools.lru_cache(maxsize=512)
def encryption_problem(cert: x509.Certificate) -> str | None:
    """Why we could not encrypt for `cert` (RFC 8551 §2.3, RFC 5753 §3.1), or None if we can."""
    try:
        pub = cert.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"its public key cannot be used ({exc.__class__.__name__})"
    ku = _key_usage(cert)
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < MIN_RSA_BITS:
            return f"its RSA key has {pub.key_size} bits; at least {MIN_RSA_BITS} are required (RFC 8551 §4.1)"
        if ku is not None and not ku.key_encipherment:
            return "its keyUsage lacks keyEncipherment, so no content key may be encrypted to it (RFC 8550 §4.4.2)"
        return None
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in SUPPORTED_CURVES:
            return f"its EC curve {pub.curve.name} is not one of P-256, P-384, P-521 (RFC 5753)"
        if ku is not None and not ku.key_agreement:
            return "its keyUsage lacks keyAgreement, so ECDH key agreement is not allowed (RFC 5480 §3)"
        return None
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "an Ed25519 key can only sign (RFC 8419); mail cannot be encrypted to it"
    return f"its {type(pub).__name__.removeprefix('_')} key cannot receive encrypted mail (RSA or EC P-256/384/521 needed)"


def signing_problem(cert: x509.Certificate, key: object | None = None) -> str | None:
    """Why we could not sign with `cert` (and its private key), or None if we can.

    We sign with RSA (PKCS#1 v1.5 or PSS) and ECDSA (RFC 8551 §2.2); Ed25519 signatures are
    verified on receipt but `cryptography`'s CMS builder cannot make them."""
    if key is not None and not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return f"a {type(key).__name__.removeprefix('_')} private key cannot sign S/MIME here (RSA or EC needed)"
    return _cert_signing_problem(cert)


@functools.lru_cache(maxsize=512)
def _cert_signing_problem(cert: x509.Certificate) -> str | None:
    try:
        pub = cert.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"its public key cannot be used ({exc.__class__.__name__})"
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < MIN_RSA_BITS:
            return f"its RSA key has {pub.key_size} bits; at least {MIN_RSA_BITS} are required (RFC 8551 §4.1)"
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in SUPPORTED_CURVES:
            return f"its EC curve {pub.curve.name} is not one of P-256, P-384, P-521"
    else:
        return f"its {type(pub).__name__.removeprefix('_')} key cannot sign S/MIME here (RSA or EC needed)"
    ku = _key_usage(cert)
    if ku is not None and not (ku.digital_signature or ku.content_commitment):
        return "its keyUsage allows neither digitalSignature nor nonRepudiation (RFC 8550 §4.4.2)"
    return None
