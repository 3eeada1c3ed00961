"""CMS (RFC 5652) EnvelopedData/AuthEnvelopedData decryption and SignedData verification, in process.

The job: the two inbound operations `cryptography` does not offer.  Structures are parsed with
`asn1crypto.cms`; every cryptographic operation (RSA key transport, ECDH, AES, hashing,
signature verification) is done by `cryptography`.

- Decryption (RFC 5652 §6, RFC 8551 §2.7): KeyTransRecipientInfo matched to our certificate by
  issuer+serial or subjectKeyIdentifier, RSA PKCS#1 v1.5 (RFC 8017 §7.2) and RSAES-OAEP
  (RFC 3560, RFC 8017 §7.1) key transport; KeyAgreeRecipientInfo with ephemeral-static ECDH on
  P-256/P-384/P-521 (RFC 5753 §3.1.2, see cms_keys.py); AES-128/192/256-CBC in EnvelopedData
  (RFC 3565) and AES-128/256-GCM in AuthEnvelopedData (RFC 5083, RFC 5084: the tag is checked
  before any plaintext is returned).
- Verification (RFC 5652 §5.4/§5.6, RFC 8551 §2.5): messageDigest and contentType signed
  attributes, signature over the DER SET OF signed attributes, RSA PKCS#1 v1.5, RSASSA-PSS
  (RFC 4056), ECDSA (RFC 5753) and Ed25519 (RFC 8419); SHA-1 and MD5 digests are refused.

Errors: `CmsError(code, detail)`, `code` being a `SecurityResult.failure` value:
malformed-cms, wrong-recipient, decrypt-failed, weak-cipher, not-signed, weak-digest,
tampered-content, bad-signed-attributes, no-signer-certificate.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from asn1crypto import cms as acms
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.exceptions import InvalidKey, InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, keywrap
from cryptography.hazmat.primitives import padding as sympadding
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.core.errors import CryptoError
from gateway.crypto._mime import to_crlf
from gateway.crypto.cms_keys import ECDH_KDF_SCHEMES, WRAP_KEY_BYTES, PrivateKey, gcm_decrypt, kari_kek

__all__ = ["CmsError", "Decrypted", "SignatureInfo", "decrypt_enveloped", "verify_signed"]

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha1": hashes.SHA1,  # only for OAEP/MGF1 parameters, never accepted as a signature digest
}
WEAK_DIGESTS = frozenset({"sha1", "md5", "md2", "md4"})
_AES = {"aes128_cbc": 16, "aes192_cbc": 24, "aes256_cbc": 32}
_AES_GCM = {"aes128_gcm": 16, "aes192_gcm": 24, "aes256_gcm": 32}


class CmsError(CryptoError, ValueError):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Decrypted:
    content: bytes
    content_algorithm: str
    key_transport: str


@dataclass(frozen=True)
class SignatureInfo:
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    digest_algorithm: str
    signature_algorithm: str
    content: bytes


def _load_content_info(der: bytes) -> acms.ContentInfo:
    try:
        ci = acms.ContentInfo.load(der, strict=True)
        _ = ci["content_type"].native
        _ = ci["content"]  # parses the outer layer now, so garbage fails here
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise CmsError("malformed-cms", f"not a CMS ContentInfo ({exc.__class__.__name__})") from exc
    return ci


class _CertIds:
    """What identifies a certificate in a RecipientIdentifier or SignerIdentifier, kept per
    certificate so that a message costs no certificate parsing for it."""

    __slots__ = ("_acert", "_issuer_name", "_ski", "issuer_der", "serial")

    def __init__(self, serial: int, issuer_der: bytes, ski: bytes | None = None,
                 acert: ax509.Certificate | None = None) -> None:  # fmt: skip
        self.serial = serial
        self.issuer_der = issuer_der
        self._ski = ski
        self._acert = acert  # read the key identifier from it only when a SignerIdentifier asks
        self._issuer_name: ax509.Name | None = None

    def matches(self, choice: acms.RecipientIdentifier | acms.SignerIdentifier) -> bool:
        if choice.name == "issuer_and_serial_number":
            ias = choice.chosen
            if ias["serial_number"].native != self.serial:
                return False
            # Byte comparison first; the RFC 5280 §7.1 normalised comparison (slow stringprep) only if needed.
            if ias["issuer"].dump() == self.issuer_der:
                return True
            if self._issuer_name is None:
                self._issuer_name = ax509.Name.load(self.issuer_der)
            return bool(ias["issuer"] == self._issuer_name)
        if choice.name == "subject_key_identifier":
            ski = self._acert.key_identifier if self._acert is not None else self._ski
            return ski is not None and choice.chosen.native == ski
        return False


@functools.lru_cache(maxsize=256)
def _recipient_ids(cert: x509.Certificate) -> _CertIds:
    """Our own certificate's identifiers, computed once per certificate rather than per message."""
    try:
        ski: bytes | None = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = None
    return _CertIds(cert.serial_number, cert.issuer.public_bytes(), ski)


@functools.lru_cache(maxsize=512)
def _carried_cert(der: bytes) -> tuple[_CertIds, x509.Certificate]:
    """A certificate carried in a SignedData, parsed once per distinct DER: its identifiers as
    asn1crypto reads them (the issuer bytes exactly as encoded) and the `cryptography` object.
    Raises ValueError for a certificate that cannot be parsed."""
    acert = ax509.Certificate.load(der, strict=True)
    ids = _CertIds(acert.serial_number, acert.issuer.dump(), acert=acert)
    return ids, x509.load_der_x509_certificate(der)


def _oaep(params: acms.RSAESOAEPParams | None) -> padding.OAEP:
    if params is None or params.native is None:
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
    h = params["hash_algorithm"]["algorithm"].native
    mgf_h = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
    label = params["p_source_algorithm"]["parameters"].native or None
    if h not in _HASHES or mgf_h not in _HASHES:
        raise CmsError("decrypt-failed", f"unsupported OAEP hash {h}/{mgf_h}")
    return padding.OAEP(mgf=padding.MGF1(_HASHES[mgf_h]()), algorithm=_HASHES[h](), label=label)


def _cek_ktri(ri: acms.KeyTransRecipientInfo, key: PrivateKey) -> tuple[bytes, str]:
    """The content key of a KeyTransRecipientInfo (RFC 5652 §6.2.1, RFC 3560 §3)."""
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CmsError("wrong-recipient", "key transport recipient info, but our key is not RSA")
    kt_alg = ri["key_encryption_algorithm"]["algorithm"].native
    pad: padding.AsymmetricPadding
    if kt_alg in ("rsa", "rsaes_pkcs1v15"):
        pad, kt = padding.PKCS1v15(), "rsa-pkcs1v15"
    elif kt_alg == "rsaes_oaep":
        pad, kt = _oaep(ri["key_encryption_algorithm"]["parameters"]), "rsa-oaep"
    else:
        raise CmsError("decrypt-failed", f"unsupported key transport {kt_alg}")
    return key.decrypt(ri["encrypted_key"].native, pad), kt


def _cek_kari(ri: acms.KeyAgreeRecipientInfo, encrypted_key: bytes, key: PrivateKey) -> tuple[bytes, str]:
    """The content key of a KeyAgreeRecipientInfo: ephemeral-static ECDH (RFC 5753 §3.1.2),
    X9.63 KDF over ECC-CMS-SharedInfo, AES key unwrap (RFC 3394)."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CmsError("wrong-recipient", "key agreement recipient info, but our key is not EC")
    scheme = ri["key_encryption_algorithm"]["algorithm"].dotted
    kdf_hash = ECDH_KDF_SCHEMES.get(scheme)
    if kdf_hash is None:
        raise CmsError("decrypt-failed", f"unsupported key agreement scheme {scheme}")
    wrap_der = ri["key_encryption_algorithm"]["parameters"].dump()
    wrap = acms.KeyEncryptionAlgorithm.load(wrap_der)["algorithm"].native
    if wrap not in WRAP_KEY_BYTES:
        raise CmsError("decrypt-failed", f"unsupported key wrap {wrap}")
    originator = ri["originator"]
    if originator.name != "originator_key":
        raise CmsError("decrypt-failed", "key agreement without an ephemeral originator key (static ECDH)")
    point = originator.chosen["public_key"].native
    if not isinstance(point, bytes):
        raise ValueError("originator public key is not a point")
    peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point)
    shared = key.exchange(ec.ECDH(), peer)
    ukm = ri["ukm"].native if ri["ukm"].native is not None else None
    kek = kari_kek(shared, kdf_hash, wrap_der, WRAP_KEY_BYTES[wrap], ukm)
    return keywrap.aes_key_unwrap(kek, encrypted_key), f"ecdh-{key.curve.name}"


def _find_recipient(recipients: Sequence[acms.RecipientInfo], ids: _CertIds,
                    key: PrivateKey) -> tuple[bytes, str] | None:  # fmt: skip
    """Our content key and the key management used, or None if no recipient info is ours."""
    for ri in recipients:
        if ri.name == "ktri" and ids.matches(ri.chosen["rid"]):
            return _cek_ktri(ri.chosen, key)
        if ri.name == "kari":
            for rek in ri.chosen["recipient_encrypted_keys"]:
                rid = rek["rid"]
                if rid.name == "r_key_id":
                    rid = acms.RecipientIdentifier(
                        name="subject_key_identifier", value=rid.chosen["subject_key_identifier"]
                    )
                if ids.matches(rid):
                    return _cek_kari(ri.chosen, rek["encrypted_key"].native, key)
    return None


def decrypt_enveloped(der: bytes, cert: x509.Certificate, key: PrivateKey) -> Decrypted:
    """Decrypt an EnvelopedData (RFC 5652 §6) or AuthEnvelopedData (RFC 5083) addressed to `cert`.

    All padding, key-unwrap, tag and key failures are reported as one code, decrypt-failed, so
    that no padding oracle is exposed."""
    ci = _load_content_info(der)
    ctype = ci["content_type"].native
    if ctype not in ("enveloped_data", "authenticated_enveloped_data"):
        raise CmsError("malformed-cms" if ctype != "signed_data" else "not-encrypted",
                       f"expected enveloped-data, got {ctype}")  # fmt: skip
    authenticated = ctype == "authenticated_enveloped_data"
    try:
        env = ci["content"]
        eci = env["auth_encrypted_content_info" if authenticated else "encrypted_content_info"]
        alg = eci["content_encryption_algorithm"]
        alg_name = alg["algorithm"].native
        recipients = list(env["recipient_infos"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CmsError("malformed-cms", f"unparsable enveloped-data ({exc.__class__.__name__})") from exc
    allowed = _AES_GCM if authenticated else _AES
    if alg_name not in allowed:
        wanted = "AES-GCM" if authenticated else "AES-CBC"
        raise CmsError("weak-cipher", f"content encryption {alg_name} is not accepted ({wanted} required)")
    try:
        found = _find_recipient(recipients, _recipient_ids(cert), key)
    except CmsError:
        raise
    except (ValueError, TypeError, KeyError, InvalidKey, UnsupportedAlgorithm, keywrap.InvalidUnwrap) as exc:
        raise CmsError("decrypt-failed", "content could not be decrypted with our key") from exc
    if found is None:
        raise CmsError("wrong-recipient", f"no recipient info for {cert.subject.rfc4514_string()}")
    cek, kt = found
    try:
        ciphertext = eci["encrypted_content"].native
        if len(cek) != allowed[alg_name] or not ciphertext:
            raise ValueError("bad key or content length")
        if authenticated:
            attrs = env["auth_attrs"]
            # RFC 5083 §2.2: the AAD is the DER of authAttrs with its SET OF tag, when present.
            aad = b"\x31" + attrs.dump()[1:] if len(attrs) else b""
            content = gcm_decrypt(cek, alg["parameters"].dump(), ciphertext, env["mac"].native, aad)
            return Decrypted(content, f"aes-{allowed[alg_name] * 8}-gcm", kt)
        iv = alg["parameters"].native
        if not isinstance(iv, bytes) or len(iv) != 16:
            raise ValueError("bad IV")
        dec = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
        padded = dec.update(ciphertext) + dec.finalize()
        if len(padded) < 16:
            raise ValueError("content shorter than one block")
        # Only the last block carries padding: let the PKCS#7 unpadder check that block, then cut
        # the content once, instead of streaming the whole plaintext through it.
        unpadder = sympadding.PKCS7(128).unpadder()
        last = unpadder.update(padded[-16:]) + unpadder.finalize()
        content = padded[: len(padded) - 16 + len(last)]
    except (ValueError, TypeError, KeyError, InvalidTag) as exc:
        raise CmsError("decrypt-failed", "content could not be decrypted with our key") from exc
    return Decrypted(content, f"aes-{allowed[alg_name] * 8}-cbc", kt)


def _certs(sd: acms.SignedData) -> list[tuple[_CertIds, x509.Certificate]]:
    out = []
    for choice in sd["certificates"] or []:
        if choice.name == "certificate":
            out.append(_carried_cert(choice.chosen.dump()))
    return out


def _find_signer(sid: acms.SignerIdentifier,
                 certs: list[tuple[_CertIds, x509.Certificate]]) -> x509.Certificate | None:  # fmt: skip
    for ids, cert in certs:
        if sid.name in ("issuer_and_serial_number", "subject_key_identifier") and ids.matches(sid):
            return cert
    return None


def _digest(name: str, data: bytes) -> bytes:
    h = hashes.Hash(_HASHES[name]())
    h.update(data)
    return h.finalize()


def _verify_raw(cert: x509.Certificate, si: acms.SignerInfo, signature: bytes, data: bytes,
                hash_name: str) -> str:  # fmt: skip
    """Verify `signature` over `data`; return the signature algorithm name; raise InvalidSignature."""
    pub = cert.public_key()
    sig_alg = si["signature_algorithm"]
    algo = sig_alg.signature_algo
    if isinstance(pub, rsa.RSAPublicKey) and algo == "rsassa_pkcs1v15":
        pub.verify(signature, data, padding.PKCS1v15(), _HASHES[hash_name]())
        return "rsa-pkcs1v15"
    if isinstance(pub, rsa.RSAPublicKey) and algo == "rsassa_pss":
        params = sig_alg["parameters"]
        h = params["hash_algorithm"]["algorithm"].native
        mgf_h = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
        if h in WEAK_DIGESTS:
            raise CmsError("weak-digest", f"PSS with {h}")
        pub.verify(signature, data, padding.PSS(mgf=padding.MGF1(_HASHES[mgf_h]()),
                                                salt_length=params["salt_length"].native),
                   _HASHES[h]())  # fmt: skip
        return "rsa-pss"
    if isinstance(pub, ec.EllipticCurvePublicKey) and algo == "ecdsa":
        pub.verify(signature, data, ec.ECDSA(_HASHES[hash_name]()))
        return "ecdsa"
    if isinstance(pub, ed25519.Ed25519PublicKey) and algo == "ed25519":
        # RFC 8419 §3.1: PureEdDSA over the signed attributes' DER (or the content without them).
        pub.verify(signature, data)
        return "ed25519"
    raise CmsError("bad-signed-attributes", f"unsupported signature algorithm {algo} for this key")


def verify_signed(der: bytes, detached_content: bytes | None = None) -> SignatureInfo:
    """Verify the first acceptable SignerInfo of a SignedData over `detached_content` (detached
    signature) or over its encapsulated content.  The content is hashed exactly as received; if
    that fails and the content has bare LFs, the canonical CRLF form is tried (RFC 8551 §3.1.1).
    Returns the signer certificate, the other certificates carried, and the content verified.
    Chain trust is not decided here (see trust.py)."""
    ci = _load_content_info(der)
    if ci["content_type"].native != "signed_data":
        raise CmsError("not-signed", f"expected signed-data, got {ci['content_type'].native}")
    try:
        sd = ci["content"]
        encap = sd["encap_content_info"]
        econtent_type = encap["content_type"].native
        content = detached_content if detached_content is not None else encap["content"].native
        signer_infos: Sequence[acms.SignerInfo] = list(sd["signer_infos"])
        certs = _certs(sd)
    except (ValueError, TypeError, KeyError) as exc:
        raise CmsError("malformed-cms", f"unparsable signed-data ({exc.__class__.__name__})") from exc
    if content is None:
        raise CmsError("malformed-cms", "signed-data without content and no detached content given")
    if not isinstance(content, bytes):
        raise CmsError("malformed-cms", "encapsulated content is not an octet string")
    if not signer_infos:
        raise CmsError("not-signed", "signed-data without any signer")

    weak = [si for si in signer_infos if si["digest_algorithm"]["algorithm"].native in WEAK_DIGESTS]
    usable = [si for si in signer_infos if si not in weak]
    if not usable:
        names = ", ".join(sorted({si["digest_algorithm"]["algorithm"].native for si in weak}))
        raise CmsError("weak-digest", f"only weak digest algorithms used ({names})")

    last_error: CmsError | None = None
    for si in usable:
        hash_name = si["digest_algorithm"]["algorithm"].native
        if hash_name not in _HASHES:
            last_error = CmsError("malformed-cms", f"unknown digest algorithm {hash_name}")
            continue
        signer = _find_signer(si["sid"], certs)
        if signer is None:
            last_error = CmsError("no-signer-certificate", "the signer's certificate is not in the message")
            continue
        try:
            return _verify_one(si, signer, [c for _, c in certs], content, hash_name, econtent_type)
        except CmsError as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


def _verify_one(si: acms.SignerInfo, signer: x509.Certificate, certs: list[x509.Certificate], content: bytes,
                hash_name: str, econtent_type: str) -> SignatureInfo:  # fmt: skip
    signature = si["signature"].native
    attrs = si["signed_attrs"]

    def candidates() -> Iterator[bytes]:
        # The content as received, then (only if that failed) its canonical CRLF form.
        yield content
        crlf = to_crlf(content)
        if crlf is not content and crlf != content:
            yield crlf

    try:
        # Absent signed attributes parse as Void (length 0).  The attributes are read one by one
        # below rather than converted wholesale to Python values: only messageDigest and
        # contentType matter, and the signature check covers the exact bytes of all of them.
        if len(attrs) == 0:
            # No signed attributes: the signature is directly over the content (RFC 5652 §5.4).
            for data in candidates():
                try:
                    alg = _verify_raw(signer, si, signature, data, hash_name)
                except InvalidSignature:
                    continue
                return SignatureInfo(signer, tuple(certs), hash_name, alg, data)
            raise CmsError("tampered-content", "signature does not match the content")
        md = None
        ct = None
        for attr in attrs:
            t = attr["type"].native
            if t == "message_digest":
                md = attr["values"][0].native
            elif t == "content_type":
                ct = attr["values"][0].native
        if md is None or ct is None:
            raise CmsError("bad-signed-attributes", "messageDigest or contentType signed attribute missing")
        if ct != econtent_type:
            raise CmsError("bad-signed-attributes", "contentType attribute does not match the content")
        # The signature covers the DER of the attributes as an explicit SET OF (tag 0x31), not [0].
        signed_bytes = b"\x31" + attrs.dump()[1:]
        try:
            alg = _verify_raw(signer, si, signature, signed_bytes, hash_name)
        except InvalidSignature:
            raise CmsError(
                "bad-signed-attributes", "signature over the signed attributes is invalid"
            ) from None
        for data in candidates():
            if hmac.compare_digest(_digest(hash_name, data), md):
                return SignatureInfo(signer, tuple(certs), hash_name, alg, data)
        raise CmsError("tampered-content", "content digest differs from the signed messageDigest")
    except (ValueError, TypeError, KeyError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, CmsError):
            raise
        raise CmsError("malformed-cms", f"unparsable signer info ({exc.__class__.__name__})") from exc
