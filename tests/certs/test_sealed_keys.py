"""Private keys live sealed in the database: none in clear after init, issue and PGP generate; older homes move theirs in.

On both databases, through the real command line.  The whole database is read back, every column
of every row, and must never hold a PEM or OpenPGP private key block or a key's DER bytes.  A
home made before the keys moved into the database (a key file named by ``key_path``) keeps
signing, and ``mssgw certs seal-keys`` moves the file in (what ``openssl`` verifies is signed by
the sealed key).  A gateway started with another node's KEK stops with the sentence that says
what to do, and ``mssgw certs rotate-kek`` re-seals everything.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

import gateway.api.models
import gateway.audit.models
import gateway.queue.models  # noqa: F401  (every table in the metadata)
from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from cli.main import cli
from directory.certificates import register_certificate
from directory.db import make_engine, read_session_factory, session_factory, transaction
from directory.models import Base, Certificate
from gateway.config import load_settings
from gateway.crypto import keystore
from gateway.process.outbound import sign_job

BOX = "secretariat@a.mssante.test"


def run(home: Path, *args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args], input=input)
    return result.exit_code, result.stdout + result.stderr


def _everything(url: str) -> bytes:
    """Every value of every row of every table, as bytes."""
    engine = make_engine(url)
    out: list[bytes] = []
    try:
        with engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                for row in conn.execute(select(table)):
                    for value in row:
                        out.append(bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode())
    finally:
        engine.dispose()
    return b"\n".join(out)


def test_no_private_key_in_clear_in_the_database(operator_home: Path) -> None:
    settings = load_settings(operator_home)
    assert run(operator_home, "directory", "add-mailbox", BOX, "--type", "ORG", "--name", "Secretariat")[0] == 0
    code, out = run(operator_home, "certs", "issue", BOX)
    assert code == 0, out
    code, out = run(operator_home, "certs", "pgp", "generate", BOX)
    assert code == 0, out
    dump = _everything(settings.database_url)
    assert b"PRIVATE KEY" not in dump and b"PGP PRIVATE KEY BLOCK" not in dump
    assert b"PGP PUBLIC KEY BLOCK" in dump  # the dump does read the tables
    # Nor the DER of the keys, nor the pseudonym salt: open each sealed key and look for it.
    engine = make_engine(settings.database_url)
    try:
        with read_session_factory(engine)() as s:
            rows = [r for r in s.scalars(select(Certificate)) if r.key_path and r.purpose != "server"]
            assert {r.address for r in rows} == {"a.mssante.test", BOX}
            for row in rows:
                assert row.key_path.startswith("sealed:key:")  # type: ignore[union-attr]
                key = keystore.load_keypair(keystore.KeyStore(settings, read_session_factory(engine))
                                            .signer_for(row.address or ""))[1]  # fmt: skip
                der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())  # fmt: skip
                assert der[-64:] not in dump
    finally:
        engine.dispose()
    assert not any((operator_home / "keys").iterdir())
    assert "PRIVATE" not in run(operator_home, "certs", "list")[1]


def test_an_older_home_keeps_its_key_file_until_seal_keys_moves_it(sqlite_home: Path, tmp_path: Path) -> None:
    settings = load_settings(sqlite_home)
    assert run(sqlite_home, "directory", "add-mailbox", BOX, "--type", "ORG", "--name", "Secretariat")[0] == 0
    cert, key = issue_certificate(load_dev_pki(settings.pki_dir), kind="org", email=BOX)
    key_file = settings.keys_dir / "legacy.key"
    save_certificate_and_key(cert, key, settings.keys_dir / "legacy.pem", key_file)
    engine = make_engine(settings.database_url)
    try:
        with transaction(session_factory(engine)) as s:  # as a home made before migration 0009
            register_certificate(s, cert.public_bytes(serialization.Encoding.PEM), address=BOX, purpose="smime",
                                 key_path=str(key_file))  # fmt: skip
        before = keystore.KeyStore(settings, read_session_factory(engine)).signer_for(BOX)
        assert before.key_path == str(key_file) and before.sealed is None
        signed_before = sign_job(b"Subject: legacy\r\n\r\nbefore\r\n", before)

        code, out = run(sqlite_home, "certs", "seal-keys")
        # The mailbox's key file, and the development PKI's copies of the CA and operator keys
        # (already sealed by init): no command needs them any more.
        assert code == 0 and "sealed 1 private key(s)" in out and "3 key file(s) removed" in out, out
        assert not key_file.exists()
        assert not (settings.pki_dir / "ca.key").exists() and not (settings.pki_dir / "operator.key").exists()
        after = keystore.KeyStore(settings, read_session_factory(engine)).signer_for(BOX)
        assert after.key_path.startswith("sealed:key:") and after.sealed is not None
        signed_after = sign_job(b"Subject: sealed\r\n\r\nafter\r\n", after)
        assert run(sqlite_home, "certs", "seal-keys")[1].startswith("sealed 0 private key(s)")  # idempotent
    finally:
        engine.dispose()
    ca = str(settings.pki_dir / "ca.pem")
    for signed, body in ((signed_before, b"before"), (signed_after, b"after")):
        check = subprocess.run(["openssl", "cms", "-verify", "-CAfile", ca, "-purpose", "any"], input=signed,
                               capture_output=True, check=False)  # fmt: skip
        assert check.returncode == 0 and body in check.stdout, check.stderr.decode(errors="replace")


async def test_a_gateway_given_another_kek_stops_with_the_reason(sqlite_home: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from gateway.app import Gateway, GatewayStartError

    assert run(sqlite_home, "directory", "add-mailbox", BOX, "--type", "ORG", "--name", "Secretariat")[0] == 0
    assert run(sqlite_home, "certs", "issue", BOX)[0] == 0
    monkeypatch.setenv("MSSGW_KEK", base64.b64encode(os.urandom(32)).decode())
    gateway = Gateway(load_settings(sqlite_home), workers=False, imap=False)
    try:
        with pytest.raises(GatewayStartError, match="give every node the same kek"):
            await gateway.start()
    finally:
        if gateway.engine is not None:
            gateway.engine.dispose()
    # Rotation: everything re-sealed under a new KEK; the old one no longer opens anything.
    monkeypatch.delenv("MSSGW_KEK")
    new = tmp_path / "new-kek"
    new.write_bytes(os.urandom(32))
    new.chmod(0o600)
    code, out = run(sqlite_home, "certs", "rotate-kek", "--new", str(new))
    assert code == 0 and "re-sealed" in out, out
    export = ("certs", "export", BOX, "--pkcs12", str(tmp_path / "x.p12"))
    code, out = run(sqlite_home, *export, input="passphrase-1\n")
    assert code != 0 and "give every node the same kek" in out and "Traceback" not in out, out
    (sqlite_home / "kek").write_bytes(new.read_bytes())
    code, out = run(sqlite_home, *export, input="passphrase-1\n")
    assert code == 0 and (tmp_path / "x.p12").stat().st_size > 0, out
    assert run(sqlite_home, "certs", "rotate-kek", "--new", str(new))[0] != 0  # the same key: refused
    # A row sealed under a KEK no node has (a node once initialised alone): listed, and droppable.
    from directory.models import SealedSecret
    from directory.secrets import Kek

    engine = make_engine(load_settings(sqlite_home).database_url)
    try:
        with transaction(session_factory(engine)) as s:
            s.add(SealedSecret(name="key:stray", kek_id=Kek(os.urandom(32), "lost").id, nonce=b"n" * 12,
                               ciphertext=b"c" * 40))  # fmt: skip
    finally:
        engine.dispose()
    code, out = run(sqlite_home, "certs", "secrets")
    assert code == 0 and "key:stray" in out and "other-kek" in out, out
    assert "PRIVATE" not in out and base64.b64encode(new.read_bytes()).decode() not in out
    assert run(sqlite_home, "certs", "issue", BOX)[0] != 0  # every new seal is refused meanwhile
    code, out = run(sqlite_home, "certs", "drop-secret", "key:stray")
    assert code != 0 and "--yes" in out and "Traceback" not in out, out
    # Given a wrong KEK, the list says so and nothing in use can be dropped (found by an outside test).
    monkeypatch.setenv("MSSGW_KEK", base64.b64encode(os.urandom(32)).decode())
    code, out = run(sqlite_home, "certs", "secrets")
    assert code == 2 and "opens none of the sealed secrets" in out and "Traceback" not in out, out
    code, out = run(sqlite_home, "certs", "drop-secret", "pseudonym-salt", "--yes")
    assert code == 2 and "nothing is dropped" in out, out
    monkeypatch.delenv("MSSGW_KEK")
    code, out = run(sqlite_home, "certs", "drop-secret", "key:absent", "--yes")
    assert code == 1 and "no sealed secret key:absent" in out, out
    code, out = run(sqlite_home, "certs", "drop-secret", "key:stray", "--yes")
    assert code == 0 and "dropped sealed secret key:stray (other-kek" in out, out
    code, out = run(sqlite_home, "certs", "secrets", "--json")
    assert code == 0 and "key:stray" not in out and '"state": "opens"' in out, out
    opening = json.loads(out)[0]["name"]
    code, out = run(sqlite_home, "certs", "drop-secret", opening, "--yes")
    assert code == 1 and "in use" in out and "Traceback" not in out, out
    assert run(sqlite_home, "certs", "issue", BOX)[0] == 0  # sealing works again


def _clear_gnupg_keys(gnupg: Path) -> list[str]:
    """Secret keys gpg keeps unprotected in this home (``(private-key`` rather than ``(protected-private-key``)."""
    return [p.name for p in (gnupg / "private-keys-v1.d").glob("*.key") if b"(private-key" in p.read_bytes()]


def test_no_openpgp_secret_key_in_clear_in_any_node_s_keyring(sqlite_home: Path, tmp_path: Path) -> None:
    """gpg keeps secret keys in files: ours are protected by gpg itself with the keyring passphrase
    (sealed in the database), whether generated here, imported unprotected by an administrator,
    or brought into another node's empty home; gpg's revocation certificate is sealed, not left."""
    from gateway.crypto.keyring import sync_keyring
    from gateway.crypto.openpgp import OpenPgp

    settings = load_settings(sqlite_home)
    assert run(sqlite_home, "directory", "add-mailbox", BOX, "--type", "ORG", "--name", "Secretariat")[0] == 0
    code, out = run(sqlite_home, "certs", "pgp", "generate", BOX)
    assert code == 0, out
    # an administrator's own key pair, made unprotected elsewhere and imported
    other = tmp_path / "admin-gnupg"
    other.mkdir(mode=0o700)
    base = ["gpg", "--homedir", str(other), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*base, "--quick-gen-key", f"Sec <{BOX}>", "rsa2048", "sign,encrypt", "1y"], check=True,
                   capture_output=True)  # fmt: skip
    pair = tmp_path / "pair.asc"
    pair.write_bytes(subprocess.run([*base, "--armor", "--export-secret-keys", BOX], check=True,
                                    capture_output=True).stdout)  # fmt: skip
    subprocess.run(["gpgconf", "--homedir", str(other), "--kill", "gpg-agent"], check=False)
    code, out = run(sqlite_home, "certs", "pgp", "import", BOX, str(pair))
    assert code == 0, out
    gnupg = settings.gnupg_dir
    assert len(list((gnupg / "private-keys-v1.d").glob("*.key"))) >= 2
    assert _clear_gnupg_keys(gnupg) == []
    assert not list((gnupg / "openpgp-revocs.d").glob("*.rev"))
    # protected with the smallest S2K count: the passphrase is random, stretching it costs CPU at every use
    assert all(b'"65536"' in p.read_bytes() or b":65536" in p.read_bytes()
               for p in (gnupg / "private-keys-v1.d").glob("*.key"))
    # another node: an empty home brought in step with the directory holds them protected too
    node2 = tmp_path / "node2-gnupg"
    engine = make_engine(settings.database_url)
    ring = OpenPgp(node2)
    try:
        with session_factory(engine)() as s:
            assert sync_keyring(ring, s, settings) >= 2
        assert len(ring.list_keys(secret=True)) == 2 and _clear_gnupg_keys(node2) == []
        ring.close()  # no passphrase cached by an agent: what follows needs the sealed one
        fpr = ring.list_keys(secret=True)[0]["fingerprint"]
        assert not ring._gpg.sign("x", keyid=fpr, passphrase="wrong").fingerprint  # protected
        assert ring.passphrase and ring._gpg.sign("x", keyid=fpr, passphrase=ring.passphrase).fingerprint == fpr
    finally:
        ring.close()
        engine.dispose()
        subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "gpg-agent"], check=False)
