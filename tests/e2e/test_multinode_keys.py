"""Two nodes of one operator sharing PostgreSQL and the key-encryption key, and no key file: each uses the other's keys.

Node 1 is made by ``mssgw init`` (its home holds the KEK); a mailbox certificate is issued and an
OpenPGP key pair generated there.  Node 2's home has its settings, the public PKI files and its own
TLS listener key, and nothing else: no ``keys/``, no ``pki/operator.key``, an empty GnuPG home; it
gets the KEK through ``MSSGW_KEK``.  Node 2 then signs and encrypts S/MIME with the mailbox's key
in a spawned worker process (the ``KeyRef`` crosses the process boundary sealed), opens it again,
exports PKCS#12; ``openssl`` decrypts and verifies what node 2 wrote with that export.  Node 2
opens PGP/MIME that node 1 protected, and protects a message that node 1's own ``gpg`` opens
(GOODSIG).  A revocation made on node 2 reaches node 1's keyring without a restart.  Node 2 makes
its mutual-TLS client context from the sealed operator key, and both nodes get the same
pseudonym salt.  A node given another KEK is told so in one sentence.
"""

from __future__ import annotations

import base64
import os
import pickle
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from email.message import EmailMessage
from email.policy import SMTP
from multiprocessing import get_context
from pathlib import Path

import pytest

from certs import service as certs
from directory import admin
from directory.db import make_engine, read_session_factory, session_factory, transaction
from directory.secrets import KekError, operator_key_pem, pseudonym_salt
from gateway.config import CONFIG_NAME, load_settings, render_toml
from gateway.core.tls import client_context, set_operator_key_source
from gateway.crypto import keystore
from gateway.crypto.keyring import KeyringSync
from gateway.crypto.openpgp import OpenPgp, keep_in_step
from gateway.operator import init_operator
from gateway.process.inbound import open_job
from gateway.process.outbound import protect_job

BOX = "secretariat@a.mssante.test"


def _message(marker: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = BOX
    msg["To"] = BOX
    msg["Subject"] = "multi-node keys"
    msg["Date"] = "Tue, 03 Nov 2026 10:00:00 +0100"
    msg["Message-ID"] = f"<{marker}@a.mssante.test>"
    msg.set_content(f"body {marker}\n")
    return msg.as_bytes(policy=SMTP)


def _openssl(*args: str, data: bytes | None = None) -> bytes:
    proc = subprocess.run(["openssl", *args], input=data, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def _node2_home(node1: Path, home: Path, database_url: str) -> Path:
    """Settings, public PKI files and this node's own TLS listener key; no private key of the directory."""
    home.mkdir(mode=0o700)
    (home / "pki").mkdir(mode=0o700)
    for name in ("ca.pem", "operator.pem", "server.pem", "server.key", "crl.pem"):
        shutil.copy2(node1 / "pki" / name, home / "pki" / name)
    (home / CONFIG_NAME).write_text(render_toml({"database": {"url": database_url}}), encoding="utf-8")
    return home


@pytest.mark.postgres
def test_a_key_made_on_node_1_is_used_by_node_2(tmp_path: Path, postgres_url: str, pki_template: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MSSGW_DATABASE_URL", postgres_url)
    monkeypatch.delenv("MSSGW_KEK", raising=False)
    node1 = tmp_path / "node1"
    node1.mkdir()
    shutil.copytree(pki_template, node1 / "pki")
    init_operator(node1, domain="a.mssante.test", hostname="localhost")
    s1 = load_settings(node1)
    engine = make_engine(postgres_url)
    sessions, readers = session_factory(engine), read_session_factory(engine)
    try:
        with transaction(sessions) as s:
            admin.add_mailbox(s, BOX, type="ORG", display_name="Secretariat")
            issued = certs.issue_for_mailbox(s, s1, BOX)
            pgp_fpr = certs.pgp_generate(s, s1, BOX)
        assert not any((node1 / "keys").iterdir())  # the database is the store

        kek = (node1 / "kek").read_bytes()
        monkeypatch.delenv("MSSGW_DATABASE_URL")
        monkeypatch.setenv("MSSGW_KEK", base64.b64encode(kek).decode())  # node 2's way of getting it
        node2 = _node2_home(node1, tmp_path / "node2", postgres_url)
        s2 = load_settings(node2)
        assert not (node2 / "kek").exists() and not (node2 / "pki" / "operator.key").exists()

        # --- S/MIME: node 2 signs and encrypts in a spawned worker, opens it again, openssl agrees.
        keys2 = keystore.KeyStore(s2, readers)
        signer = keys2.signer_for(BOX)
        assert signer.key_path == f"sealed:key:{issued['fingerprint']}" and signer.sealed is not None
        pickled = pickle.dumps(signer)
        assert kek not in pickled and b"PRIVATE KEY" not in pickled
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            wire = pool.submit(protect_job, _message("smime-2"), signer, (signer.cert_pem,), True, "Secure").result()
            inner, result = pool.submit(open_job, wire, tuple(keys2.decryption_keys(BOX)), keys2.trust(), None).result()
        assert result.failure is None and result.decrypted_ok and result.signature_valid, result
        assert inner is not None and b"body smime-2" in inner

        with readers() as s:
            p12 = certs.export_pkcs12(s, BOX, b"export-passphrase", s2)
        pem = _openssl("pkcs12", "-nodes", "-passin", "pass:export-passphrase", data=p12)
        key_file, ca_file, msg_file = tmp_path / "box.key", tmp_path / "ca.pem", tmp_path / "wire.eml"
        key_file.write_bytes(pem)
        os.chmod(key_file, 0o600)
        ca_file.write_bytes((node1 / "pki" / "ca.pem").read_bytes())
        msg_file.write_bytes(wire)
        decrypted = _openssl("cms", "-decrypt", "-in", str(msg_file), "-recip", str(key_file))
        verified = _openssl("cms", "-verify", "-CAfile", str(ca_file), "-purpose", "any", data=decrypted)
        assert b"body smime-2" in verified

        # --- OpenPGP: node 2's empty GnuPG home follows the directory (secret key sealed on node 1).
        ring1, ring2 = OpenPgp(s1.gnupg_dir), OpenPgp(s2.gnupg_dir)
        keep_in_step(s1.gnupg_dir, KeyringSync(readers, s1))  # node 1's own key store does this when it runs
        try:
            assert ring2.list_keys(secret=True) == []
            protected = ring1.protect(_message("pgp-1"), pgp_fpr, [pgp_fpr])
            assert ring1.passphrase  # the keyring passphrase, sealed: node 1's secret key is protected by it
            opened, verdict = ring2.open(protected)  # the key store above registered the sync
            assert verdict.failure is None and verdict.decrypted_ok and verdict.signature_valid, verdict
            assert opened is not None and b"body pgp-1" in opened
            assert {k["fingerprint"] for k in ring2.list_keys(secret=True)} == {pgp_fpr}

            back = ring2.protect(_message("pgp-2"), pgp_fpr, [pgp_fpr])
            armored = back[back.index(b"-----BEGIN PGP MESSAGE-----"):]
            armored = armored[:armored.index(b"-----END PGP MESSAGE-----") + 25]
            gpg = subprocess.run(["gpg", "--homedir", str(s1.gnupg_dir), "--batch", "--status-fd", "2",
                                  "--pinentry-mode", "loopback", "--passphrase", str(ring1.passphrase),
                                  "--decrypt"], input=armored,
                                 capture_output=True, check=False)  # fmt: skip
            assert gpg.returncode == 0 and b"GOODSIG" in gpg.stderr, gpg.stderr.decode(errors="replace")
            assert b"body pgp-2" in gpg.stdout

            # Revoked on node 2 (its home never saw gpg's revocation certificate): node 1 follows.
            with transaction(sessions) as s:
                certs.pgp_revoke(s, s2, pgp_fpr)
            keep_in_step(s1.gnupg_dir, KeyringSync(readers, s1, ttl=0.0))
            ring1._in_step()
            assert [k["trust"] for k in ring1.list_keys() if k["fingerprint"] == pgp_fpr] == ["r"]
        finally:
            keep_in_step(s1.gnupg_dir, None)
            keep_in_step(s2.gnupg_dir, None)
            ring1.close()
            ring2.close()

        # --- mutual TLS from the sealed operator key (no pki/operator.key on node 2), one salt.
        set_operator_key_source(s2.home, lambda: operator_key_pem(readers, s2))
        try:
            ctx = client_context(s2)
            assert ctx.verify_mode.name == "CERT_REQUIRED"
        finally:
            set_operator_key_source(s2.home, None)
        salt1 = pseudonym_salt(sessions, s1, s1.keys_dir / "patient-pseudonym.salt")
        assert pseudonym_salt(sessions, s2, s2.keys_dir / "patient-pseudonym.salt") == salt1

        # --- another KEK: one sentence, no key material, nothing opened.
        wrong = os.urandom(32)
        monkeypatch.setenv("MSSGW_KEK", base64.b64encode(wrong).decode())
        keystore._open_key.cache_clear()
        with pytest.raises(keystore.KeyStoreError, match="give every node the same kek") as info:
            keystore.load_keypair(signer)
        assert wrong.hex() not in str(info.value) and "PRIVATE" not in str(info.value)
        with pytest.raises(KekError, match="is not the one the keys were sealed with"):
            pseudonym_salt(sessions, s2, s2.keys_dir / "patient-pseudonym.salt")
    finally:
        keystore._open_key.cache_clear()
        engine.dispose()
