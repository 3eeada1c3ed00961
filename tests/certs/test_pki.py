"""Development PKI: files, modes, idempotence, profiles, revocation; checked with `openssl` as the oracle."""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.pki import (
    DevPki,
    PkiError,
    create_dev_pki,
    issue_certificate,
    load_certificate,
    load_dev_pki,
    revoke_certificate,
    save_certificate_and_key,
)

DOMAIN = "a.mssante.test"
HOST = "mx.a.mssante.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(tmp_path_factory.mktemp("pki") / "certs", DOMAIN, HOST)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def test_files_exist_and_keys_are_0600(pki: DevPki) -> None:
    for p in (pki.ca_cert, pki.server_cert, pki.operator_cert, pki.crl):
        assert p.is_file()
    for k in (pki.ca_key, pki.server_key, pki.operator_key):
        assert _mode(k) == 0o600, k
        assert k.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert _mode(pki.directory) == 0o700
    assert load_dev_pki(pki.directory) == pki


def test_ca_profile(pki: DevPki) -> None:
    ca = load_certificate(pki.ca_cert)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"mssgw dev CA {DOMAIN}"
    assert ca.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "FR"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert life > dt.timedelta(days=3600)


def test_server_and_operator_profiles(pki: DevPki) -> None:
    server = load_certificate(pki.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST, "localhost"]
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )

    op = load_certificate(pki.operator_cert)
    assert op.subject.rfc4514_string() == f"C=FR,O=Operateur {DOMAIN},CN={HOST}"
    san = op.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST, DOMAIN]
    eku = set(op.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.EMAIL_PROTECTION,
    }
    life = op.not_valid_after_utc - op.not_valid_before_utc
    assert dt.timedelta(days=700) < life < dt.timedelta(days=740)
    for cert in (pki.server_cert, pki.operator_cert):
        r = _openssl("verify", "-CAfile", str(pki.ca_cert), str(cert))
        assert r.returncode == 0, r.stderr


def test_server_cert_is_valid_for_tls_hostname(pki: DevPki) -> None:
    r = _openssl("verify", "-CAfile", str(pki.ca_cert), "-purpose", "sslserver", "-verify_hostname", HOST,
                 str(pki.server_cert))  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _openssl("verify", "-CAfile", str(pki.ca_cert), "-purpose", "sslclient", str(pki.operator_cert))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("kind", "eku", "nonrep"),
    [
        ("user", {ExtendedKeyUsageOID.EMAIL_PROTECTION}, True),
        ("org", {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH}, False),
        ("app", {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH}, False),
    ],
)
def test_mailbox_certificates(pki: DevPki, tmp_path: Path, kind: str, eku: set[x509.ObjectIdentifier],
                              nonrep: bool) -> None:  # fmt: skip
    cert, key = issue_certificate(pki, kind=kind, email=f"{kind}@{DOMAIN}")  # type: ignore[arg-type]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [f"{kind}@{DOMAIN}"]
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == eku
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and ku.content_commitment is nonrep
    assert key.key_size == 2048
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    cpath, kpath = tmp_path / "c.pem", tmp_path / "c.key"
    save_certificate_and_key(cert, key, cpath, kpath)
    assert _mode(kpath) == 0o600
    r = _openssl("verify", "-CAfile", str(pki.ca_cert), "-purpose", "smimesign", str(cpath))
    assert r.returncode == 0, r.stderr
    serials = json.loads((pki.directory / "serials.json").read_text())
    assert format(cert.serial_number, "x") in {s["serial"] for s in serials}


def test_custom_validity(pki: DevPki) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    cert, _ = issue_certificate(pki, kind="user", email="old@a.test", not_before=start,
                                not_after=start + dt.timedelta(days=30))  # fmt: skip
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == start + dt.timedelta(days=30)


def test_user_without_email_is_refused(pki: DevPki) -> None:
    with pytest.raises(PkiError, match="e-mail"):
        issue_certificate(pki, kind="user")


def test_idempotent_and_force(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    first = create_dev_pki(d, DOMAIN, HOST)
    before = {p: p.read_bytes() for p in (first.ca_cert, first.ca_key, first.server_cert, first.operator_key)}
    again = create_dev_pki(d, DOMAIN, HOST)
    assert again == first
    assert {p: p.read_bytes() for p in before} == before
    # A missing leaf is re-issued under the same CA.
    first.server_cert.unlink()
    create_dev_pki(d, DOMAIN, HOST)
    assert first.ca_cert.read_bytes() == before[first.ca_cert]
    assert _openssl("verify", "-CAfile", str(first.ca_cert), str(first.server_cert)).returncode == 0
    forced = create_dev_pki(d, DOMAIN, HOST, force=True)
    assert forced.ca_cert.read_bytes() != before[first.ca_cert]
    assert forced.ca_key.read_bytes() != before[first.ca_key]
    assert _mode(forced.ca_key) == 0o600
    assert _openssl("verify", "-CAfile", str(forced.ca_cert), str(forced.operator_cert)).returncode == 0


def test_load_missing_pki_raises(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="mssgw init"):
        load_dev_pki(tmp_path / "nope")


def test_revocation_writes_signed_crl(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path / "pki", DOMAIN, HOST)
    cert, _ = issue_certificate(pki, kind="user", email="gone@a.test")
    keep, _ = issue_certificate(pki, kind="user", email="stays@a.test")
    revoke_certificate(pki, cert.serial_number, x509.ReasonFlags.key_compromise)
    revoke_certificate(pki, cert.serial_number)  # idempotent
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    ca = load_certificate(pki.ca_cert)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.key_compromise
    )
    assert crl.get_revoked_certificate_by_serial_number(keep.serial_number) is None
    assert len(list(crl)) == 1
    assert crl.next_update_utc is not None
    assert dt.timedelta(days=6) < crl.next_update_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(days=7)
    # Independent oracle: openssl checks the CRL signature and lists the serial.
    r = _openssl("crl", "-in", str(pki.crl), "-CAfile", str(pki.ca_cert), "-noout")
    assert r.returncode == 0 and "verify OK" in (r.stdout + r.stderr), r.stderr
    text = _openssl("crl", "-in", str(pki.crl), "-noout", "-text").stdout
    assert format(cert.serial_number, "X").zfill(2) in text.replace(":", "").upper()
    # openssl refuses the revoked certificate with the CRL loaded.
    leaf = tmp_path / "gone.pem"
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    r = _openssl("verify", "-crl_check", "-CAfile", str(pki.ca_cert), "-CRLfile", str(pki.crl), str(leaf))
    assert r.returncode != 0 and "revoked" in (r.stdout + r.stderr)


def test_crl_signature_uses_ca_key(pki: DevPki) -> None:
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    ca = load_certificate(pki.ca_cert)
    ca.public_key().verify(  # type: ignore[call-arg, union-attr]
        crl.signature,
        crl.tbs_certlist_bytes,
        padding.PKCS1v15(),
        crl.signature_hash_algorithm,  # type: ignore[arg-type]
    )
