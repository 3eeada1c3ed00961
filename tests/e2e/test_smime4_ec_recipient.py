"""S/MIME 4.0 through the real queue: a mailbox with a P-256 certificate, both ways.

A's clinician writes to B's laboratory, whose only certificate is ECDSA/ECDH P-256: A's worker
encrypts with ECDH key agreement (RFC 5753) and AES-256-GCM (RFC 5083), relays over mutual TLS,
and B's worker decrypts with the laboratory's EC key and verifies.  The laboratory answers:
B signs with ECDSA and A verifies.  Before S/MIME 4.0 support, A's worker failed with
"Only RSA keys are supported" and deferred the message for five days.  `openssl cms` reads
what B stored to confirm the structure on the wire.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from e2e_support import (
    A_DOMAIN,
    B_DOMAIN,
    CLINICIAN,
    PRACTITIONER,
    Operator,
    Pair,
    _start,
    parse,
    prescription,
)

from certs.pki import load_certificate, load_dev_pki, load_private_key, write_private_key
from directory import admin
from directory.certificates import register_certificate
from directory.db import transaction
from gateway.crypto import _mime

LAB = f"labo@{B_DOMAIN}"


def _ec_certificate(b: Operator) -> tuple[bytes, str]:
    """A P-256 mailbox certificate from B's CA (digitalSignature + keyAgreement, RFC 5480 §3)."""
    pki = load_dev_pki(b.home / "pki")
    ca, ca_key = load_certificate(pki.ca_cert), load_private_key(pki.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Laboratoire")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(LAB)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key_path = b.home / "keys" / "labo-ec.key"
    write_private_key(key_path, key)  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), str(key_path)


def _states(info: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {r["address"]: r["state"] for r in info["recipient_states"]}


async def test_smime4_ec_recipient_through_the_queue_both_ways(pair: Pair) -> None:
    a, b = pair.a, pair.b
    pem, key_path = _ec_certificate(b)
    with transaction(b.sessions) as s:
        admin.add_mailbox(s, LAB, type="ORG", display_name="Laboratoire")
        register_certificate(s, pem, address=LAB, purpose="smime", key_path=key_path)
    with transaction(a.sessions) as s:
        admin.add_mailbox(s, LAB, type="ORG")
        register_certificate(s, pem, address=LAB, purpose="smime")

    qid = a.enqueue(prescription(to=LAB, mdn=False), CLINICIAN, [LAB])
    await a.workers.run_once()  # type: ignore[attr-defined]
    info = a.queue(qid)
    assert _states(info) == {LAB: "delivered"}, info["recipient_states"]
    # What crossed to B: AuthEnvelopedData with an ECDH recipient info, as OpenSSL reads it.
    stored = b.store.read(b.store.list(include_done=True)[0]["id"])
    der = _mime.b64decode_body(_mime.split_entity(stored)[1])
    printed = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER"], input=der,
                             capture_output=True, check=True).stdout  # fmt: skip
    assert b"id-smime-ct-authEnvelopedData" in printed and b"aes-256-gcm" in printed
    assert b"d.kari" in printed and b"dhSinglePass-stdDH-sha256kdf-scheme" in printed
    await pair.flow()
    inbox = b.mailbox(LAB)
    assert len(inbox) == 1
    got = parse(inbox[0])
    ar = str(got["Authentication-Results"])
    assert "smime=pass" in ar and CLINICIAN in ar, ar

    # The laboratory answers: signed with its EC key (ECDSA), encrypted for the clinician (RSA)
    # and for its own copy (ECDH); A verifies the ECDSA signature.
    reply = prescription(sender=LAB, to=CLINICIAN, mdn=False)
    rid = b.enqueue(reply, LAB, [CLINICIAN])
    await pair.flow()
    assert _states(b.queue(rid)) == {CLINICIAN: "delivered"}
    answers = [parse(m) for m in a.mailbox(CLINICIAN)]
    assert len(answers) == 1
    ar = str(answers[0]["Authentication-Results"])
    assert "smime=pass" in ar and LAB in ar, ar


async def test_smime4_configured_algorithms_reach_the_wire(templates: dict, tmp_path: Path,  # type: ignore[type-arg]
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """crypto.content_encryption / rsa_key_transport / rsa_signature of A's mssgw.toml are what A's
    workers send (AES-256-CBC, RSA-OAEP, RSASSA-PSS here), and B opens it."""
    monkeypatch.delenv("MSSGW_DATABASE_URL", raising=False)
    crypto = {"crypto": {"content_encryption": "aes-256-cbc", "rsa_key_transport": "oaep", "rsa_signature": "pss"}}
    a = await _start("a", templates["a"], tmp_path, crypto)
    b = await _start("b", templates["b"], tmp_path)
    await a.set_relay(B_DOMAIN, b.inbound_port, templates["b"].operator_dn)
    await b.set_relay(A_DOMAIN, a.inbound_port, templates["a"].operator_dn)
    try:
        qid = a.enqueue(prescription(mdn=False), CLINICIAN, [PRACTITIONER])
        await a.workers.run_once()  # type: ignore[attr-defined]
        assert _states(a.queue(qid)) == {PRACTITIONER: "delivered"}
        stored = b.store.read(b.store.list(include_done=True)[0]["id"])
        der = _mime.b64decode_body(_mime.split_entity(stored)[1])
        printed = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER"], input=der,
                                 capture_output=True, check=True).stdout  # fmt: skip
        assert b"pkcs7-envelopedData" in printed and b"aes-256-cbc" in printed and b"rsaesOaep" in printed
        # B's practitioner key opens it with openssl; the signature inside is RSASSA-PSS.
        keys = b.home / "keys"
        signed = subprocess.run(["openssl", "cms", "-decrypt", "-inform", "DER", "-recip",
                                 str(keys / f"{PRACTITIONER}.pem"), "-inkey", str(keys / f"{PRACTITIONER}.key")],
                                input=der, capture_output=True, check=True).stdout  # fmt: skip
        sig = subprocess.run(["openssl", "cms", "-cmsout", "-print"], input=signed, capture_output=True,
                             check=True).stdout  # fmt: skip
        assert b"rsassaPss" in sig
        for _ in range(4):
            await b.workers.run_once()  # type: ignore[attr-defined]
        got = parse(b.mailbox(PRACTITIONER)[0])
        assert "smime=pass" in str(got["Authentication-Results"])
    finally:
        for op in (a, b):
            await op.workers.stop()  # type: ignore[attr-defined]
            await op.gateway.stop(grace=2)  # type: ignore[attr-defined]
