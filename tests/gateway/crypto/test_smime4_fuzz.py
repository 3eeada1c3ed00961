"""Attack the S/MIME 4.0 parsers: mutated AuthEnvelopedData/KeyAgreeRecipientInfo, and nesting bombs.

`open_message` must answer every input with a verdict (never an exception), never call a
mutated message authentic, and stop peeling layers after `MAX_LAYERS`.  The valid inputs are
made by `openssl cms` (AES-256-GCM to an ECDH P-256 recipient, ECDSA signer).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certs.pki import load_private_key
from gateway.crypto import _mime
from gateway.crypto.result import FAILURE_CODES
from gateway.crypto.smime import MAX_LAYERS, open_message

HEAD = b"Content-Type: application/pkcs7-mime; smime-type=authEnveloped-data\r\nContent-Transfer-Encoding: base64\r\n\r\n"


def _ec_recipient(world: Any) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path, Path]:
    ca, ca_key = world.ca, load_private_key(world.pki.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3))
        .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("fuzz@b.test")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cp, kp = world.directory / "fuzz-ec.pem", world.directory / "fuzz-ec.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))  # fmt: skip
    return cert, key, cp, kp


@pytest.fixture(scope="module")
def sample(world: Any, openssl: Any, make_message: Any) -> tuple[Any, ...]:
    cert, key, cp, _ = _ec_recipient(world)
    msg = make_message()
    signed = openssl("cms", "-sign", "-signer", str(world.alice.cert_path), "-inkey", str(world.alice.key_path),
                     "-md", "sha256", "-binary", stdin=b"Content-Type: message/rfc822\r\n\r\n" + msg)  # fmt: skip
    der = openssl("cms", "-encrypt", "-aes-256-gcm", "-binary", "-outform", "DER", "-recip", str(cp),
                  "-keyopt", "ecdh_kdf_md:sha256", stdin=signed)  # fmt: skip
    return cert, key, der, msg


def test_smime4_sample_opens(world: Any, sample: tuple[Any, ...]) -> None:
    cert, key, der, _msg = sample
    _, res = open_message(HEAD + _mime.b64_lines(der), recipient_cert=cert, recipient_key=key, trust=world.trust)
    assert res.ok and res.key_transport == "ecdh-secp256r1" and res.content_algorithm == "aes-256-gcm"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_smime4_mutated_gcm_ecdh_never_raises_never_passes(world: Any, sample: tuple[Any, ...],
                                                           data: st.DataObject) -> None:  # fmt: skip
    cert, key, der, msg = sample
    buf = bytearray(der)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[pos : pos + data.draw(st.integers(1, 64))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        if not buf:
            buf = bytearray(b"\x30")
    mutated = bytes(buf)
    inner, res = open_message(HEAD + _mime.b64_lines(mutated), recipient_cert=cert, recipient_key=key,
                              trust=world.trust)  # fmt: skip
    assert res.failure is None or res.failure in FAILURE_CODES
    # A changed byte in the recipient info, the parameters, the ciphertext or the tag never yields
    # another message called authentic (a byte nobody reads, e.g. a version number, may change).
    if res.ok:
        assert inner == msg


def test_smime4_nesting_bomb_is_bounded(world: Any, openssl: Any, make_message: Any) -> None:
    """Signed-data inside signed-data, deeper than MAX_LAYERS: refused as malformed, quickly."""
    entity = b"Content-Type: message/rfc822\r\n\r\n" + make_message()
    for _ in range(MAX_LAYERS + 2):
        entity = openssl("cms", "-sign", "-nodetach", "-binary", "-signer", str(world.alice.cert_path),
                             "-inkey", str(world.alice.key_path), stdin=entity)  # fmt: skip
    inner, res = open_message(entity, recipient_cert=world.bob.cert, recipient_key=world.bob.key,
                              trust=world.trust, require_encryption=False)  # fmt: skip
    assert inner is None and res.failure == "malformed-cms" and "nested" in res.detail
