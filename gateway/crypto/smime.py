"""S/MIME protection of whole messages between operators, and opening of what peers send us.

The job: `protect` wraps the complete original message (its headers included) as a
message/rfc822 entity (RFC 8551 §3.1 "protecting headers" by wrapping, RFC 2046 §5.2.1), signs
it as multipart/signed (RFC 1847, RFC 8551 §3.5.3: detached, SHA-256; RSA PKCS#1 v1.5 or
RSASSA-PSS, or ECDSA for an EC key) and encrypts that for every recipient certificate and the
sender (envelope.py): AES-256-GCM AuthEnvelopedData by default (RFC 8551 §3.2.2
authEnveloped-data), AES-256-CBC EnvelopedData for peers whose certificate says they lack GCM or
when `crypto.content_encryption` asks; RSA key transport or ECDH key agreement per certificate.
The outer message only carries From, To, Cc, Date, Message-ID, MIME-Version and a neutral
Subject: nothing of the content leaks.
`open_message` reverses it: size bound, then the layers in whatever order the sender nested them
(RFC 8551 §3.7: sign-then-encrypt, encrypt-then-sign, triple wrapping), at most `MAX_LAYERS`:
decrypt, verify (detached or opaque signed-data), path-validate every signer for
emailProtection, check revocation, and match the innermost signer's certificate address to the
inner From (RFC 8550 §3).

Signatures and MIME wrappers are built on the bytes (ARCHITECTURE rule 8): `cryptography`'s PKCS7
builder produces the SignedData DER, and the MIME around it is written here, 3-6x faster than
Encoding.SMIME.  Line endings are canonicalised to CRLF before signing (RFC 8551 §3.1.1); a CRLF
message comes back byte-identical, an LF-only message comes back with CRLF line endings.

Errors: `protect`/`sign_only` raise `SmimeError` for unusable inputs (no recipients, a
certificate that cannot be encrypted to or signed with, header injection in outer headers,
message too large).  `open_message` never raises for bad input: it returns a `SecurityResult`
whose `failure` code says what went wrong.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import re
from collections.abc import Mapping, Sequence
from email.utils import format_datetime, make_msgid
from typing import Any, Literal, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.core.errors import CryptoError
from gateway.crypto import _mime
from gateway.crypto.cms import CmsError, SignatureInfo, decrypt_enveloped, verify_signed
from gateway.crypto.cms_keys import PrivateKey, encryption_problem, signing_problem
from gateway.crypto.envelope import (
    DEFAULT_CONTENT_ENCRYPTION,
    ContentEncryption,
    EnvelopeError,
    RsaKeyTransport,
    choose_content_encryption,
    envelope,
)
from gateway.crypto.result import SecurityResult
from gateway.crypto.trust import TrustStore, fingerprint
from gateway.policy.limits import MAX_MESSAGE_BYTES

__all__ = [
    "MAX_MESSAGE_SIZE",
    "OUTER_COPIED_HEADERS",
    "SmimeError",
    "encrypt_only",
    "open_message",
    "protect",
    "sign_only",
]

#: Largest message accepted by protect/open (bytes).  The SMTP listeners enforce their own SIZE.
MAX_MESSAGE_SIZE = MAX_MESSAGE_BYTES  # gateway.policy.limits: the SMTP edge accepts less
OUTER_COPIED_HEADERS = ("from", "sender", "to", "cc", "date", "message-id", "in-reply-to", "references")
DEFAULT_OUTER_SUBJECT = "Message securise"

_SIGN_OPTIONS = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
_OPAQUE_OPTIONS = [pkcs7.PKCS7Options.Binary]
RsaSignature = Literal["pkcs1v15", "pss"]
RSA_SIGNATURES: tuple[RsaSignature, ...] = ("pkcs1v15", "pss")
_PKCS7_MIME_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")
_ENVELOPED_TYPES = ("enveloped-data", "authenveloped-data")
#: Nested S/MIME layers opened at most (triple wrapping is three).
MAX_LAYERS = 4
_PKCS7_SIG_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_BAD_HEADER = re.compile(r"[\r\n\x00]")


class SmimeError(CryptoError, ValueError):
    """The message or the keys given to protect/sign cannot produce a valid S/MIME message."""


# ---------------------------------------------------------------- building


def _wrap_rfc822(message: bytes) -> bytes:
    cte = b"7bit" if message.isascii() else b"8bit"
    return b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: " + cte + b"\r\n\r\n" + message


def _signed_entity(entity: bytes, signer_cert: x509.Certificate, signer_key: PrivateKey,
                   extra_certs: Sequence[x509.Certificate], rsa_signature: RsaSignature = "pkcs1v15",
                   opaque: bool = False) -> bytes:  # fmt: skip
    """multipart/signed (RFC 8551 §3.5.3) or, when `opaque`, application/pkcs7-mime signed-data
    (§3.5.2).  RSA signs with PKCS#1 v1.5 or RSASSA-PSS (RFC 4056: SHA-256, MGF1-SHA-256, salt
    of the digest's length); EC keys with ECDSA-SHA-256 (RFC 5753 §2.1)."""
    problem = signing_problem(signer_cert, signer_key)
    if problem is not None:
        raise SmimeError(f"cannot sign with {signer_cert.subject.rfc4514_string()}: {problem}")
    if rsa_signature not in RSA_SIGNATURES:
        raise SmimeError(f"unknown RSA signature scheme {rsa_signature!r}")
    pad: padding.PSS | None = None
    if isinstance(signer_key, rsa.RSAPrivateKey) and rsa_signature == "pss":
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    builder = pkcs7.PKCS7SignatureBuilder().set_data(entity).add_signer(
        signer_cert, signer_key, hashes.SHA256(), rsa_padding=pad
    )
    for c in extra_certs:
        builder = builder.add_certificate(c)
    sig = builder.sign(serialization.Encoding.DER, _SIGN_OPTIONS if not opaque else _OPAQUE_OPTIONS)
    if opaque:
        return (
            b'Content-Type: application/pkcs7-mime; smime-type=signed-data; name="smime.p7m"\r\n'
            b"Content-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="smime.p7m"\r\n\r\n' + _mime.b64_lines(sig)
        )
    boundary = _mime.new_boundary(entity)
    b = boundary.encode()
    return b"".join(
        [
            b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;\r\n'
            b' boundary="', b, b'"\r\n\r\n',
            b"This is a cryptographically signed message in MIME format.\r\n\r\n",
            b"--", b, b"\r\n", entity, b"\r\n--", b, b"\r\n",
            b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
            b"Content-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n',
            _mime.b64_lines(sig),
            b"\r\n--", b, b"--\r\n",
        ]
    )  # fmt: skip


def _enveloped_entity(content: bytes, recipients: Sequence[x509.Certificate], headers: bytes = b"", *,
                      content_encryption: ContentEncryption = DEFAULT_CONTENT_ENCRYPTION,
                      rsa_key_transport: RsaKeyTransport = "pkcs1v15") -> bytes:  # fmt: skip
    """application/pkcs7-mime with smime-type enveloped-data (CBC) or authEnveloped-data (GCM,
    RFC 8551 §3.2.2), the cipher chosen by `choose_content_encryption`."""
    chosen = choose_content_encryption(content_encryption, recipients)
    try:
        der = envelope(content, recipients, content_encryption=chosen, rsa_key_transport=rsa_key_transport)
    except EnvelopeError as exc:
        raise SmimeError(str(exc)) from None
    smime_type = b"authEnveloped-data" if chosen.endswith("-gcm") else b"enveloped-data"
    # One join with the outer headers: the base64 body (1.37x the message) is copied once.
    return b"".join(
        (
            headers,
            b"Content-Type: application/pkcs7-mime; smime-type=" + smime_type + b'; name="smime.p7m"\r\n'
            b"Content-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="smime.p7m"\r\n\r\n',
            _mime.b64_lines(der),
        )
    )


def _outer_headers(message: bytes, outer_subject: str, outer_headers: Mapping[str, str] | None) -> bytes:
    block, _ = _mime.split_entity(message)
    fields = _mime.parse_headers(block)
    out: list[bytes] = []
    present: set[str] = set()
    extra = {k.lower(): (k, v) for k, v in (outer_headers or {}).items()}
    for name, _value, raw in fields:
        if name in OUTER_COPIED_HEADERS and name not in extra:
            out.append(_mime.to_crlf(raw))
            present.add(name)
    if "date" not in present and "date" not in extra:
        out.append(f"Date: {format_datetime(_dt.datetime.now(_dt.UTC))}\r\n".encode())
    if "message-id" not in present and "message-id" not in extra:
        domain = (_mime.first_address(_mime.header_value(fields, "from")) or "@mssgw.invalid").rpartition(
            "@"
        )[2]
        out.append(f"Message-ID: {make_msgid(domain=domain)}\r\n".encode())
    for lname, (name, value) in extra.items():
        if lname in ("subject", "mime-version", "content-type", "content-transfer-encoding"):
            raise SmimeError(f"outer header {name} is set by the S/MIME wrapper")
        if _BAD_HEADER.search(name + value) or not re.fullmatch(r"[!-9;-~]+", name):
            raise SmimeError(f"outer header {name!r} contains forbidden characters")
        out.append(f"{name}: {value}\r\n".encode())
    if _BAD_HEADER.search(outer_subject):
        raise SmimeError("outer subject contains a line break")
    out.append(f"Subject: {outer_subject}\r\n".encode())
    out.append(b"MIME-Version: 1.0\r\n")
    return b"".join(out)


def _check_size(message: bytes, max_size: int) -> bytes:
    if len(message) > max_size:
        raise SmimeError(f"message of {len(message)} bytes exceeds the {max_size}-byte limit")
    return _mime.to_crlf(message)


def protect(
    message_bytes: bytes,
    *,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    recipient_certs: Sequence[x509.Certificate],
    extra_certs: Sequence[x509.Certificate] = (),
    encrypt_for_sender: bool = True,
    outer_subject: str = DEFAULT_OUTER_SUBJECT,
    outer_headers: Mapping[str, str] | None = None,
    max_size: int = MAX_MESSAGE_SIZE,
    content_encryption: ContentEncryption = DEFAULT_CONTENT_ENCRYPTION,
    rsa_key_transport: RsaKeyTransport = "pkcs1v15",
    rsa_signature: RsaSignature = "pkcs1v15",
) -> bytes:
    """Sign then encrypt the whole message; return the outer message bytes (CRLF).

    `content_encryption` is the preferred cipher (`crypto.content_encryption`); a recipient
    certificate that announces S/MIME capabilities without GCM lowers it to AES-256-CBC.  The
    sender's own copy is encrypted only when its certificate can receive encrypted mail (an
    Ed25519 or signature-only certificate cannot)."""
    if not recipient_certs:
        raise SmimeError("no recipient certificate to encrypt for")
    message = _check_size(message_bytes, max_size)
    headers = _outer_headers(message, outer_subject, outer_headers)
    signed = _signed_entity(_wrap_rfc822(message), signer_cert, signer_key, extra_certs, rsa_signature)
    recipients = list(recipient_certs)
    if encrypt_for_sender and encryption_problem(signer_cert) is None:
        recipients.append(signer_cert)
    return _enveloped_entity(signed, recipients, headers, content_encryption=content_encryption,
                             rsa_key_transport=rsa_key_transport)  # fmt: skip


def sign_only(
    message_bytes: bytes,
    *,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    extra_certs: Sequence[x509.Certificate] = (),
    outer_subject: str | None = None,
    outer_headers: Mapping[str, str] | None = None,
    max_size: int = MAX_MESSAGE_SIZE,
    rsa_signature: RsaSignature = "pkcs1v15",
    opaque: bool = False,
) -> bytes:
    """Wrap and sign without encryption (multipart/signed, or signed-data when `opaque`), e.g.
    between two mailboxes of one operator.  The outer Subject is the inner one unless
    `outer_subject` is given."""
    message = _check_size(message_bytes, max_size)
    if outer_subject is None:
        fields = _mime.parse_headers(_mime.split_entity(message)[0])
        outer_subject = _mime.header_value(fields, "subject") or ""
    headers = _outer_headers(message, outer_subject, outer_headers)
    return headers + _signed_entity(_wrap_rfc822(message), signer_cert, signer_key, extra_certs, rsa_signature, opaque)


def encrypt_only(
    message_bytes: bytes,
    *,
    recipient_certs: Sequence[x509.Certificate],
    outer_subject: str = DEFAULT_OUTER_SUBJECT,
    outer_headers: Mapping[str, str] | None = None,
    max_size: int = MAX_MESSAGE_SIZE,
    content_encryption: ContentEncryption = DEFAULT_CONTENT_ENCRYPTION,
    rsa_key_transport: RsaKeyTransport = "pkcs1v15",
) -> bytes:
    """Wrap and encrypt without a signature (opened with failure not-signed)."""
    if not recipient_certs:
        raise SmimeError("no recipient certificate to encrypt for")
    message = _check_size(message_bytes, max_size)
    headers = _outer_headers(message, outer_subject, outer_headers)
    return _enveloped_entity(_wrap_rfc822(message), recipient_certs, headers,
                             content_encryption=content_encryption, rsa_key_transport=rsa_key_transport)  # fmt: skip


# ---------------------------------------------------------------- opening


def _pkcs7_der(body: bytes, fields: list[tuple[str, str, bytes]]) -> bytes:
    cte = (_mime.header_value(fields, "content-transfer-encoding") or "7bit").strip().lower()
    if cte == "base64":
        return _mime.b64decode_body(body)
    if cte == "binary":
        return body
    raise _mime.MimeError(f"unexpected transfer encoding {cte} for a CMS body")


def _unwrap(entity: bytes, outer_fields: list[tuple[str, str, bytes]]) -> bytes:
    """The protected message: the body of a message/rfc822 entity, or (for senders that do not
    wrap) the entity itself under the outer non-MIME headers."""
    block, body = _mime.split_entity(entity)
    fields = _mime.parse_headers(block)
    mtype, _ = _mime.content_type(_mime.header_value(fields, "content-type"))
    if mtype == "message/rfc822":
        return body
    outer = b"".join(
        _mime.to_crlf(raw)
        for n, _, raw in outer_fields
        if n != "mime-version" and not n.startswith("content-")
    )
    return outer + b"MIME-Version: 1.0\r\n" + entity


def open_message(
    data: bytes,
    *,
    recipient_cert: x509.Certificate,
    recipient_key: PrivateKey,
    trust: TrustStore,
    now: _dt.datetime | None = None,
    max_size: int = MAX_MESSAGE_SIZE,
    require_encryption: bool = True,
) -> tuple[bytes | None, SecurityResult]:
    """Decrypt and verify `data` exactly as received.  Returns (inner message or None, result).

    The inner message is returned whenever it could be extracted, even when a later check
    failed; deliver it as authentic only if `result.ok`."""
    result = SecurityResult(method="smime", encryption_required=require_encryption)
    if len(data) > max_size:
        return None, result.with_failure("too-large", f"{len(data)} bytes exceeds the {max_size}-byte limit")
    try:
        return _open(data, recipient_cert, recipient_key, trust, now, result, require_encryption)
    except CmsError as exc:
        return None, result.with_failure(exc.code, exc.detail)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, UnicodeError) as exc:
        # Hostile or broken input: asn1crypto and our MIME splitter raise these; never a traceback.
        return None, result.with_failure("malformed-cms", f"unparsable message ({exc.__class__.__name__})")


def _is_enveloped(mtype: str, params: dict[str, str]) -> bool:
    """application/pkcs7-mime with smime-type enveloped-data or authEnveloped-data (RFC 8551
    §3.2.2); a missing smime-type is read as enveloped-data, as older agents omit it."""
    return mtype in _PKCS7_MIME_TYPES and params.get("smime-type", "enveloped-data").lower() in _ENVELOPED_TYPES


def _open(data: bytes, cert: x509.Certificate, key: PrivateKey, trust: TrustStore,
          now: _dt.datetime | None, result: SecurityResult, require_encryption: bool,
          ) -> tuple[bytes | None, SecurityResult]:  # fmt: skip
    """Peel the layers in whatever order the sender nested them (RFC 8551 §3.7): sign then
    encrypt, encrypt then sign, or triple wrapping (RFC 2634 §1.1).  Every signature layer must
    hold and chain to an anchor; the innermost one (the author's) is reported and matched to
    the inner From."""
    # The verdict is gathered in `changes` and built once at the end; `failure` keeps the first.
    changes: dict[str, Any] = {}
    failure: tuple[str, str] | None = None
    outer_fields = _mime.parse_headers(_mime.header_block(data))
    entity = data
    signatures: list[SignatureInfo] = []
    encrypted = False

    def done(
        inner: bytes | None, code: str | None = None, detail: str = ""
    ) -> tuple[bytes | None, SecurityResult]:
        first = failure or ((code, detail) if code else None)
        if first is not None:
            return inner, result.with_failure(first[0], first[1], **changes)
        return inner, result.evolve(**changes) if changes else result

    for _layer in range(MAX_LAYERS + 1):
        block, entity_body = _mime.split_entity(entity)
        fields = _mime.parse_headers(block)
        mtype, params = _mime.content_type(_mime.header_value(fields, "content-type"))
        if _is_enveloped(mtype, params):
            dec = decrypt_enveloped(_pkcs7_der(entity_body, fields), cert, key)
            encrypted = True
            changes.update(encrypted=True, decrypted_ok=True, content_algorithm=dec.content_algorithm,
                           key_transport=dec.key_transport)  # fmt: skip
            entity = dec.content
            continue
        try:
            info = _verify(mtype, params, fields, entity_body)
        except CmsError as exc:
            if require_encryption and not encrypted:
                failure = ("not-encrypted", "message is not S/MIME enveloped-data")
            changes["signed"] = exc.code not in ("not-signed", "malformed-cms")
            return done(None, exc.code, exc.detail)
        except ValueError as exc:  # MimeError and asn1crypto parse errors after a successful decryption
            return done(None, "malformed-cms", f"unparsable signed entity ({exc.__class__.__name__})")
        if info is None:
            break
        signatures.append(info)
        entity = info.content
    else:
        raise CmsError("malformed-cms", f"more than {MAX_LAYERS} nested S/MIME layers")

    if require_encryption and not encrypted:
        failure = ("not-encrypted", "message is not S/MIME enveloped-data")
    # Nothing peeled (a clear message): the message is its own inner message; wrapping it under its
    # own header fields again would give every field twice (RFC 5322 §3.6 allows each once).
    inner = data if entity is data else _unwrap(entity, outer_fields)
    if not signatures:
        return done(inner, "not-signed", "message carries no S/MIME signature")

    info = signatures[-1]
    signer = info.signer
    facts = _signer_facts(signer)
    emails = facts.emails
    from_addr = _mime.first_address(
        _mime.header_value(_mime.parse_headers(_mime.header_block(inner)), "from")
    )
    domain = from_addr.rpartition("@")[2] if from_addr else None
    chain = trust.validate(signer, [c for c in info.certificates if c != signer], purpose="emailProtection",
                           at=now, domain=domain)  # fmt: skip
    changes.update(
        signed=True,
        signature_valid=True,
        digest_algorithm=info.digest_algorithm,
        signature_algorithm=info.signature_algorithm,
        signer_subject=facts.subject,
        signer_fingerprint=facts.fingerprint,
        signer_serial=format(signer.serial_number, "x"),  # Authentication-Results body.smime-serial
        signer_issuer=signer.issuer.rfc4514_string(),  # and body.smime-issuer (RFC 7281)
        signer_email=emails[0] if emails else None,
        signer_emails=emails,
        chain_valid=chain.valid,
        trust_anchor=chain.trust_anchor,
        revoked=chain.revoked,
        crl_status=chain.crl_status,
    )
    if chain.failure and failure is None:
        failure = (chain.failure, chain.detail)
    for outer_sig in reversed(signatures[:-1]):  # outer layers (e.g. a relaying operator's) must hold too
        outer_chain = trust.validate(outer_sig.signer, [c for c in outer_sig.certificates if c != outer_sig.signer],
                                     purpose="emailProtection", at=now, domain=domain)  # fmt: skip
        if outer_chain.failure and failure is None:
            failure = (outer_chain.failure, f"outer signature: {outer_chain.detail}")
    # Address-bound (rfc822Name) or, Direct Applicability Statement 1.2 §4, domain-bound: a
    # dNSName equal to the From domain, the chain above having ended at an anchor for it.
    matches = from_addr is not None and (from_addr in emails or domain in facts.domains)
    changes.update(from_address=from_addr, from_matches_signer=matches)
    if not matches:
        return done(inner, "from-mismatch",
                    f"From {from_addr or '(none)'} is not an address of the signer's certificate")  # fmt: skip
    return done(inner)


def _verify(mtype: str, params: dict[str, str], fields: list[tuple[str, str, bytes]],
            entity_body: bytes) -> SignatureInfo | None:  # fmt: skip
    """Verify a multipart/signed or opaque signed-data entity; None if it is neither."""
    if mtype == "multipart/signed":
        protocol = params.get("protocol", "").lower()
        if protocol not in _PKCS7_SIG_TYPES:
            raise CmsError("malformed-cms", f"multipart/signed with protocol {protocol or 'missing'}")
        parts = _mime.split_multipart(entity_body, params.get("boundary", ""))
        if len(parts) != 2:
            raise CmsError("malformed-cms", f"multipart/signed with {len(parts)} parts")
        sig_block, sig_body = _mime.split_entity(parts[1])
        sig_fields = _mime.parse_headers(sig_block)
        sig_der = _pkcs7_der(sig_body, sig_fields)
        return verify_signed(sig_der, parts[0])
    if mtype in _PKCS7_MIME_TYPES and params.get("smime-type", "").lower() == "signed-data":
        return verify_signed(_pkcs7_der(entity_body, fields))
    return None


class _SignerFacts(NamedTuple):
    subject: str
    fingerprint: str
    emails: tuple[str, ...]
    domains: tuple[str, ...]  # dNSName SANs: a Direct domain-bound certificate speaks for them


@functools.lru_cache(maxsize=512)
def _signer_facts(cert: x509.Certificate) -> _SignerFacts:
    """What the verdict reports about a signer certificate, computed once per certificate."""
    domains: tuple[str, ...] = ()
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        domains = tuple(d.lower().rstrip(".") for d in san.get_values_for_type(x509.DNSName))
    return _SignerFacts(cert.subject.rfc4514_string(), fingerprint(cert), _cert_emails(cert), domains)


def _cert_emails(cert: x509.Certificate) -> tuple[str, ...]:
    """rfc822Name SAN entries, then the legacy emailAddress subject attribute (RFC 8550 §3)."""
    out: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):  # no SAN: the subject attribute below
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        out.extend(a.lower() for a in san.get_values_for_type(x509.RFC822Name))
    for attr in cert.subject.get_attributes_for_oid(x509.NameOID.EMAIL_ADDRESS):
        v = str(attr.value).lower()
        if v not in out:
            out.append(v)
    return tuple(out)
