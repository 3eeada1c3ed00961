"""Direct Project domain-bound certificates and domain-scoped trust anchors (issue 14, item 4).

Applicability Statement for Secure Health Transport 1.2 §4: a certificate whose dNSName is the
From domain speaks for every address of that domain, when it chains to an anchor trusted for
that domain.  A Direct trust bundle scopes anchors to domains: a peer's CA does not vouch for
another peer's mail.  Messages are signed and encrypted by `openssl cms`; the scoped anchors go
through the real `mssgw certs trust-anchor add --domain` and the key store.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.pki import load_certificate, load_private_key
from cli.main import cli
from directory.db import make_engine, session_factory
from gateway.config import load_settings
from gateway.crypto.keystore import KeyStore
from gateway.crypto.smime import open_message
from gateway.crypto.trust import TrustStore

Openssl = Any


def _domain_cert(world: Any, ca_dir: Path, name: str, domain: str) -> tuple[Path, Path]:
    """A Direct domain-bound certificate: dNSName SAN only, emailProtection, from the CA in `ca_dir`."""
    ca, ca_key = load_certificate(ca_dir / "ca.pem"), load_private_key(ca_dir / "ca.key")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cp, kp = world.directory / f"{name}.pem", world.directory / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))  # fmt: skip
    return cp, kp


def _signed_for_bob(world: Any, openssl: Openssl, cert: Path, key: Path, from_addr: str) -> bytes:
    msg = (f"From: {from_addr}\r\nTo: {world.bob.email}\r\nSubject: Compte rendu\r\n"
           "Message-ID: <d1@direct.test>\r\n\r\nCompte rendu de biologie.\r\n").encode()  # fmt: skip
    signed = openssl("cms", "-sign", "-signer", str(cert), "-inkey", str(key), "-md", "sha256", "-binary",
                     stdin=b"Content-Type: message/rfc822\r\n\r\n" + msg)  # fmt: skip
    return openssl("cms", "-encrypt", "-aes-256-gcm", "-recip", str(world.bob.cert_path), stdin=signed)  # type: ignore[no-any-return]


def _open(world: Any, data: bytes, trust: TrustStore) -> Any:
    return open_message(data, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=trust)[1]


def test_smime4_direct_domain_bound_certificate_speaks_for_its_domain(world: Any, openssl: Openssl) -> None:
    cert, key = _domain_cert(world, world.pki.directory, "hisp-a", "a.test")
    res = _open(world, _signed_for_bob(world, openssl, cert, key, "Labo <labo@a.test>"), world.trust)
    assert res.ok, res
    assert res.from_matches_signer and res.signer_subject == "CN=a.test"
    # Not for another domain: the dNSName is a.test, the From is c.test.
    other = _open(world, _signed_for_bob(world, openssl, cert, key, "labo@c.test"), world.trust)
    assert other.failure == "from-mismatch" and not other.ok
    # Nor for a sub-domain (exact match only).
    sub = _open(world, _signed_for_bob(world, openssl, cert, key, "labo@sub.a.test"), world.trust)
    assert sub.failure == "from-mismatch"


def test_smime4_scoped_anchor_vouches_only_for_its_domains(world: Any, openssl: Openssl) -> None:
    """The foreign CA issued a certificate for dr.alice@a.test: trusted for evil.test only, it
    does not vouch for a.test's mail; trusted for a.test, it does."""
    other_ca = load_certificate(world.directory / "other" / "ca.pem")
    forged = _signed_for_bob(world, openssl, world.foreign.cert_path, world.foreign.key_path, "dr.alice@a.test")
    scoped = TrustStore([world.ca, other_ca], scopes={other_ca: ["evil.test"]})
    res = _open(world, forged, scoped)
    assert not res.ok and res.failure == "untrusted-ca" and "trusted only for evil.test" in res.detail
    assert res.signature_valid  # the signature itself holds: only the anchor's scope refuses it
    assert _open(world, forged, TrustStore([world.ca, other_ca], scopes={other_ca: ["a.test"]})).ok
    # Our own unscoped anchor still vouches for every domain.
    ours = _signed_for_bob(world, openssl, world.alice.cert_path, world.alice.key_path, "dr.alice@a.test")
    assert _open(world, ours, scoped).ok
    # A domain-bound certificate from the scoped CA, for the scoped domain: accepted.
    cert, key = _domain_cert(world, world.directory / "other", "hisp-evil", "evil.test")
    assert _open(world, _signed_for_bob(world, openssl, cert, key, "x@evil.test"), scoped).ok


def _cli(home: Path, *args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("also_global", [False, True])
def test_smime4_trust_anchor_add_domain_scopes_the_key_store(sqlite_home: Path, world: Any, openssl: Openssl,
                                                             also_global: bool) -> None:  # fmt: skip
    other_ca = world.directory / "other" / "ca.pem"
    code, out, err = _cli(sqlite_home, "certs", "trust-anchor", "add", str(other_ca), "--domain", "evil.test",
                          "--domain", "b.test")  # fmt: skip
    assert code == 0, err
    assert "for evil.test, b.test" in out
    if also_global:  # the same CA also trusted without a domain: it vouches for every domain again
        assert _cli(sqlite_home, "certs", "trust-anchor", "add", str(other_ca))[0] == 0
    code, listed, _ = _cli(sqlite_home, "certs", "trust-anchor", "list", "--json")
    domains = sorted(r["domain"] for r in json.loads(listed) if "evil.test" in r["subject"])
    assert domains == (["*", "b.test", "evil.test"] if also_global else ["b.test", "evil.test"])

    settings = load_settings(sqlite_home)
    engine = make_engine(settings.database_url)
    try:
        store = KeyStore(settings, session_factory(engine)).trust_store()
    finally:
        engine.dispose()
    forged = _signed_for_bob(world, openssl, world.foreign.cert_path, world.foreign.key_path, "dr.alice@a.test")
    res = _open(world, forged, store)
    if also_global:
        assert res.chain_valid and res.failure is None, res
    else:
        assert res.failure == "untrusted-ca" and "trusted only for b.test, evil.test" in res.detail
    # Mutual TLS still trusts the CA: scopes are for S/MIME only.
    assert store.validate(world.foreign.cert, purpose="clientAuth").failure != "untrusted-ca"
