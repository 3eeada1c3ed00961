"""Path validation, purposes, CRLs and validity periods (``gateway.crypto.trust``) with the dev PKI of ``certs/pki.py``.

``openssl verify`` is the independent oracle: for every certificate of the world, our verdict
(valid or not, revoked or not) must be openssl's.  The cases then pin each failure code of the
contract: untrusted-ca, expired, not-yet-valid, bad-key-usage, revoked, crl-unavailable and
crl-stale, and the anchors scoped to mail domains (Direct trust bundles).
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certs.pki import create_dev_pki, issue_certificate, load_certificate, load_private_key
from gateway.crypto.trust import TrustStore, TrustStoreError, fingerprint, load_trust_store

if TYPE_CHECKING:  # the session fixture's type (a conftest is never imported by name at run time)
    from tests.gateway.crypto.conftest import Identity, World


def _crl(world: World) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(world.pki.crl.read_bytes())


def _store(world: World, *, crls: bool = True, **kw: object) -> TrustStore:
    """A store of our own (the session's shared one keeps its caches)."""
    return TrustStore([world.ca], [_crl(world)] if crls else [], **kw)  # type: ignore[arg-type]


def _openssl_verify(world: World, who: Identity) -> tuple[bool, str]:
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(world.pki.ca_cert), "-crl_check",
                           "-CRLfile", str(world.pki.crl), "-purpose", "smimesign", str(who.cert_path)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return proc.returncode == 0, proc.stdout + proc.stderr


def _signed_crl(world: World, *, last: dt.datetime, nxt: dt.datetime, revoked: tuple[int, ...] = (),
                signer_pki: Path | None = None) -> x509.CertificateRevocationList:  # fmt: skip
    """A CRL naming our CA as issuer, signed by our CA's key (or by another CA's: a forgery)."""
    key = load_private_key(signer_pki / "ca.key" if signer_pki else world.pki.ca_key)
    builder = x509.CertificateRevocationListBuilder().issuer_name(world.ca.subject).last_update(last).next_update(nxt)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign(key, hashes.SHA256())


def test_verdicts_agree_with_openssl(world: World) -> None:
    store = _store(world)
    for who in (world.alice, world.expired, world.future, world.revoked, world.foreign):
        ours = store.validate(who.cert, purpose="emailProtection")
        theirs, text = _openssl_verify(world, who)
        assert ours.ok == theirs, (who.email, ours.failure, text)
    assert "revoked" in _openssl_verify(world, world.revoked)[1]


def test_a_good_path(world: World) -> None:
    result = _store(world).validate(world.alice.cert)
    assert result.ok and result.failure is None
    assert result.chain == (world.alice.cert, world.ca)
    assert result.trust_anchor == world.ca.subject.rfc4514_string()
    assert (result.crl_status, result.revoked) == ("good", False)
    assert result.emails == ("dr.alice@a.test",)
    assert fingerprint(world.alice.cert) == world.alice.cert.fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize("name, code", [("expired", "expired"), ("future", "not-yet-valid"),
                                        ("foreign", "untrusted-ca"), ("revoked", "revoked")])  # fmt: skip
def test_each_failure_has_its_code(world: World, name: str, code: str) -> None:
    result = _store(world).validate(getattr(world, name).cert)
    assert not result.ok and result.failure == code
    assert result.detail  # a sentence for the banner and the audit trail
    if code == "revoked":
        assert result.revoked is True and f"{world.revoked.cert.serial_number:x}" in result.detail


def test_validity_is_judged_at_the_time_asked(world: World) -> None:
    """A signature made while the certificate was valid is checked at its signing time."""
    store = _store(world, crls=False)
    # Inside the leaf's own period but before the CA existed: the whole path must be valid then.
    then = world.expired.cert.not_valid_before_utc + dt.timedelta(days=10)
    assert world.expired.cert.not_valid_before_utc < then < world.expired.cert.not_valid_after_utc
    assert store.validate(world.expired.cert, at=then).failure == "expired"
    later = world.future.cert.not_valid_before_utc + dt.timedelta(hours=1)
    assert store.validate(world.future.cert, at=later).valid
    # A path cached at a valid time is not reused past the leaf's end.
    assert store.validate(world.alice.cert).valid
    after = world.alice.cert.not_valid_after_utc + dt.timedelta(days=1)
    assert store.validate(world.alice.cert, at=after).failure == "expired"


def test_purposes_follow_the_extended_key_usage(world: World, tmp_path: Path) -> None:
    store = _store(world)
    # A practitioner's certificate (emailProtection only) is not a TLS client certificate.
    assert store.validate(world.alice.cert, purpose="clientAuth").failure == "bad-key-usage"
    # An organisation's (emailProtection + clientAuth) is both.
    assert store.validate(world.bob.cert, purpose="clientAuth").ok
    server, _ = issue_certificate(world.pki, kind="server", dns_names=["mx.a.test"])
    assert store.validate(server, purpose="serverAuth").ok
    assert store.validate(server, purpose="emailProtection").failure == "bad-key-usage"


def test_without_a_crl_revocation_is_unknown(world: World) -> None:
    lenient = _store(world, crls=False)
    result = lenient.validate(world.revoked.cert)
    assert result.ok and (result.crl_status, result.revoked) == ("unavailable", None)
    strict = _store(world, crls=False, require_crl=True)
    assert strict.validate(world.alice.cert).failure == "crl-unavailable"


def test_a_stale_crl(world: World) -> None:
    now = dt.datetime.now(dt.UTC)
    old = _signed_crl(world, last=now - dt.timedelta(days=20), nxt=now - dt.timedelta(days=13))
    lenient = TrustStore([world.ca], [old])
    assert lenient.validate(world.alice.cert).crl_status == "stale" and lenient.validate(world.alice.cert).ok
    strict = TrustStore([world.ca], [old], require_crl=True)
    assert strict.validate(world.alice.cert).failure == "crl-stale"
    # nextUpdate still ahead but older than crl_max_age: stale too.
    long_lived = _signed_crl(world, last=now - dt.timedelta(days=3), nxt=now + dt.timedelta(days=30))
    tight = TrustStore([world.ca], [long_lived], crl_max_age=dt.timedelta(days=1), require_crl=True)
    assert tight.validate(world.alice.cert).failure == "crl-stale"
    # A fresh CRL next to the stale one wins.
    both = TrustStore([world.ca], [old, _crl(world)], require_crl=True)
    assert both.validate(world.alice.cert).crl_status == "good"


def test_a_forged_crl_is_ignored(world: World, tmp_path: Path) -> None:
    """A CRL with our CA's name signed by another key neither revokes nor vouches."""
    other = create_dev_pki(tmp_path / "forger", "forger.test", "mx.forger.test")
    now = dt.datetime.now(dt.UTC)
    forged = _signed_crl(world, last=now - dt.timedelta(minutes=5), nxt=now + dt.timedelta(days=1),
                         revoked=(world.alice.cert.serial_number,), signer_pki=other.directory)  # fmt: skip
    result = TrustStore([world.ca], [forged]).validate(world.alice.cert)
    assert result.ok and result.crl_status == "unavailable" and result.revoked is None


def test_scoped_anchor_vouches_only_for_its_domains(world: World) -> None:
    store = TrustStore([world.ca], [_crl(world)], scopes={world.ca: ["A.test."]})
    assert store.validate(world.alice.cert, domain="a.test").ok
    refused = store.validate(world.alice.cert, domain="b.test")
    assert refused.failure == "untrusted-ca" and "a.test" in refused.detail
    assert store.validate(world.alice.cert).failure == "untrusted-ca"  # no domain: no vouching
    # Mutual TLS ignores scopes (peers are pinned by their operator DN).
    assert store.validate(world.bob.cert, purpose="clientAuth").ok


def test_load_trust_store_reads_pem_der_and_directories(world: World, tmp_path: Path) -> None:
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    (anchors / "ca.der").write_bytes(world.ca.public_bytes(serialization.Encoding.DER))
    (anchors / "notes.txt").write_text("ignored: not a certificate pattern")
    store = load_trust_store([anchors], [world.pki.crl])
    assert store.anchors == [load_certificate(world.pki.ca_cert)]
    assert store.validate(world.revoked.cert).failure == "revoked"
    (anchors / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TrustStoreError, match="cannot load trust anchor"):
        load_trust_store([anchors])
    with pytest.raises(TrustStoreError, match="cannot load CRL"):
        load_trust_store([world.pki.ca_cert], [tmp_path / "missing.crl"])
    with pytest.raises(TrustStoreError, match="at least one anchor"):
        load_trust_store([tmp_path / "empty"] if (tmp_path / "empty").mkdir() is None else [])
