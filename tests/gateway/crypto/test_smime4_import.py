"""`mssgw certs import` refuses, with the reason, an S/MIME certificate delivery could not use.

Certificates are made by `openssl req` (not by our code); the command line is the real one.
Accepted: RSA >= 2048 with keyEncipherment, EC P-256/P-384 with keyAgreement (RFC 5753), EC keys
of our own mailboxes (ECDSA signing, ECDH decryption).  Refused at import, never at delivery:
Ed25519 (signs only), short RSA, a keyUsage without the encryption bit, curves outside RFC 5753.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from directory.db import make_engine, read_session_factory
from gateway.config import load_settings
from gateway.crypto.keystore import KeyStore, load_keypair

REMOTE = "labo@b.mssante.test"
LOCAL = "accueil@a.mssante.test"


def run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    return result.exit_code, result.stdout, result.stderr


def _openssl_cert(tmp: Path, name: str, address: str, newkey: list[str], key_usage: str | None) -> Path:
    """A self-signed certificate (and key) for `address` made by openssl; returns the PEM path
    holding the certificate (and the key, for `name` ending in '+key')."""
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    args = ["openssl", "req", "-x509", "-nodes", *newkey, "-keyout", str(key), "-out", str(cert), "-days", "30",
            "-subj", f"/CN={address}", "-addext", f"subjectAltName=email:{address}",
            "-addext", "extendedKeyUsage=emailProtection"]  # fmt: skip
    if key_usage:
        args += ["-addext", f"keyUsage=critical,{key_usage}"]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    if name.endswith("+key"):
        both = tmp / f"{name}.pem"
        both.write_bytes(cert.read_bytes() + key.read_bytes())
        return both
    return cert


@pytest.fixture
def home(sqlite_home: Path) -> Path:
    code, _, err = run(sqlite_home, "domains", "trust", "b.mssante.test", "--relay", "127.0.0.1:1")
    assert code == 0, err
    for address in (REMOTE, LOCAL):
        code, _, err = run(sqlite_home, "directory", "add-mailbox", address, "--type", "ORG", "--name", "Labo")
        assert code == 0, err
    return sqlite_home


P256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
P384 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"]


@pytest.mark.parametrize(("newkey", "key_usage"), [
    (P256, "digitalSignature,keyAgreement"),
    (P384, "keyAgreement"),
    (P256, None),  # no keyUsage at all: every use allowed (RFC 5280 §4.2.1.3)
    (["-newkey", "rsa:2048"], "digitalSignature,keyEncipherment"),
])  # fmt: skip
def test_smime4_import_accepts_usable_recipient(home: Path, tmp_path: Path, newkey: list[str],
                                                key_usage: str | None) -> None:  # fmt: skip
    cert = _openssl_cert(tmp_path, "ok", REMOTE, newkey, key_usage)
    code, out, err = run(home, "certs", "import", REMOTE, str(cert))
    assert code == 0, err
    assert f"for {REMOTE}" in out


@pytest.mark.parametrize(("newkey", "key_usage", "reason"), [
    (["-newkey", "ed25519"], "digitalSignature", "Ed25519 key can only sign"),
    (["-newkey", "rsa:1024"], "digitalSignature,keyEncipherment", "1024 bits; at least 2048"),
    (["-newkey", "rsa:2048"], "digitalSignature", "lacks keyEncipherment"),
    (P256, "digitalSignature", "lacks keyAgreement"),
    (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"], "keyAgreement", "curve secp256k1"),
    (["-newkey", "ed448"], "digitalSignature", "cannot receive encrypted mail"),
])  # fmt: skip
def test_smime4_import_refuses_unusable_with_reason(home: Path, tmp_path: Path, newkey: list[str],
                                                    key_usage: str, reason: str) -> None:  # fmt: skip
    cert = _openssl_cert(tmp_path, "bad", REMOTE, newkey, key_usage)
    code, out, err = run(home, "certs", "import", REMOTE, str(cert))
    assert code != 0 and "Traceback" not in err + out
    assert "cannot be used for S/MIME" in err and reason in err, err
    assert err.strip().count("\n") == 0  # one line for the admin
    code, listed, _ = run(home, "certs", "list", "--address", REMOTE, "--json")
    assert code == 0 and json.loads(listed) == []  # nothing recorded


def test_smime4_import_own_ec_key_loads_for_signing(home: Path, tmp_path: Path) -> None:
    """Our mailbox's P-256 certificate and key: accepted, and the key store can load the key
    (ECDSA signatures, ECDH decryption) instead of failing at delivery time."""
    pem = _openssl_cert(tmp_path, "own+key", LOCAL, P256, "digitalSignature,keyAgreement")
    code, out, err = run(home, "certs", "import", LOCAL, str(pem))
    assert code == 0, err
    assert "with its private key" in out
    fpr = out.split()[1]
    settings = load_settings(home)
    engine = make_engine(settings.database_url)
    try:  # the key store's own path: the key sealed in the database, opened with this home's KEK
        ref = KeyStore(settings, read_session_factory(engine)).signer_for(LOCAL)
    finally:
        engine.dispose()
    assert ref.key_path == f"sealed:key:{fpr}"
    cert, key = load_keypair(ref)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]

    # Our own certificate, but only good for signing (keyUsage without keyAgreement): peers could
    # not encrypt to it, so it is refused too.
    sign_only = _openssl_cert(tmp_path, "own2+key", LOCAL, P256, "digitalSignature")
    code, _, err = run(home, "certs", "import", LOCAL, str(sign_only))
    assert code != 0 and "lacks keyAgreement" in err
