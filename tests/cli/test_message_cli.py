"""``mssgw message protect|open`` as an integrator runs them, with openssl cms as the independent oracle."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli

RPPS = "10000000009"
ANNE = "anne.martin@a.mssante.test"
SECRETARIAT = "secretariat@a.mssante.test"
MESSAGE = (
    b"From: Anne Martin <anne.martin@a.mssante.test>\r\n"
    b"To: secretariat@a.mssante.test\r\n"
    b"Subject: Ordonnance de M. Dupont\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Amoxicilline 1 g, 3 fois par jour pendant 7 jours.\r\n"
)


@dataclass
class Done:
    returncode: int
    stdout: bytes
    stderr: bytes


def mssgw(home: Path, *args: str, input: bytes | None = None) -> Done:
    """The CLI in-process (fast); one test below runs the installed script."""
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args], input=input)
    return Done(result.exit_code, result.stdout_bytes, result.stderr_bytes)


@pytest.fixture
def home(sqlite_home: Path) -> Path:
    assert mssgw(sqlite_home, "directory", "add-practitioner", "--rpps", RPPS, "--last-name", "Martin",
                 "--first-name", "Anne").returncode == 0
    assert mssgw(sqlite_home, "directory", "add-mailbox", ANNE, "--type", "PER", "--rpps", RPPS).returncode == 0
    assert mssgw(sqlite_home, "directory", "add-mailbox", SECRETARIAT, "--type", "ORG", "--name", "Sec").returncode == 0
    for address in (ANNE, SECRETARIAT):
        done = mssgw(sqlite_home, "certs", "issue", address)
        assert done.returncode == 0, done.stderr
    return sqlite_home


def _key_of(home: Path, address: str) -> tuple[Path, Path]:
    """The mailbox's certificate and key as files for openssl: the key as its owner gets it, from
    ``certs export --pkcs12`` (the gateway keeps it sealed in its database), opened by openssl."""
    listed = json.loads(mssgw(home, "certs", "show", address, "--json", "--pem").stdout)[0]
    cert = home / f"{address}.pem"
    cert.write_text(listed["pem"])
    p12, key = home / f"{address}.p12", home / f"{address}.key"
    assert mssgw(home, "certs", "export", address, "--pkcs12", str(p12), input=b"oracle-passphrase\n").returncode == 0
    key.write_bytes(subprocess.run(["openssl", "pkcs12", "-in", str(p12), "-nocerts", "-nodes", "-passin",
                                    "pass:oracle-passphrase"], capture_output=True, check=True).stdout)  # fmt: skip
    return cert, key


def test_protect_then_openssl_decrypts_and_verifies(home: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "mssgw"  # the installed console script, as an integrator runs it
    done = subprocess.run([str(script), "--data-dir", str(home), "message", "protect", "--from", ANNE, "--to",
                           SECRETARIAT], input=MESSAGE, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    protected = done.stdout
    assert b"Ordonnance" not in protected and b"Amoxicilline" not in protected
    cert, key = _key_of(home, SECRETARIAT)
    decrypted = subprocess.run(["openssl", "cms", "-decrypt", "-recip", str(cert), "-inkey", str(key)],
                               input=protected, capture_output=True, check=True).stdout
    verified = subprocess.run(["openssl", "cms", "-verify", "-CAfile", str(home / "pki" / "ca.pem")],
                              input=decrypted, capture_output=True, check=False)
    assert verified.returncode == 0, verified.stderr
    assert MESSAGE in verified.stdout.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


def test_open_round_trip_and_json_result(home: Path) -> None:
    protected = mssgw(home, "message", "protect", "--from", ANNE, "--to", SECRETARIAT, input=MESSAGE).stdout
    opened = mssgw(home, "message", "open", "--to", SECRETARIAT, "--json", input=protected)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == MESSAGE
    result = json.loads(opened.stderr.decode().strip().splitlines()[-1])
    assert result["ok"] is True


def test_open_what_openssl_signed_and_encrypted(home: Path, tmp_path: Path) -> None:
    anne_cert, anne_key = _key_of(home, ANNE)
    sec_cert, _ = _key_of(home, SECRETARIAT)
    signed = subprocess.run(["openssl", "cms", "-sign", "-signer", str(anne_cert), "-inkey", str(anne_key),
                             "-md", "sha256"], input=MESSAGE, capture_output=True, check=True).stdout
    enveloped = subprocess.run(["openssl", "cms", "-encrypt", "-aes256", "-recip", str(sec_cert),
                                "-keyopt", "rsa_padding_mode:oaep", "-from", ANNE, "-to", SECRETARIAT, "-subject", "x"],
                               input=signed, capture_output=True, check=True).stdout
    opened = mssgw(home, "message", "open", "--to", SECRETARIAT, input=enveloped)
    assert opened.returncode == 0, opened.stderr
    assert b"Amoxicilline" in opened.stdout
    assert b"smime=pass" in opened.stderr


def test_tampered_message_exits_1(home: Path) -> None:
    protected = bytearray(mssgw(home, "message", "protect", "--from", ANNE, "--to", SECRETARIAT, input=MESSAGE).stdout)
    body = len(protected) - 300  # inside the encrypted content, near its end
    while protected[body] in b"\r\n=":
        body -= 1
    protected[body] = ord("A") if protected[body] != ord("A") else ord("B")
    opened = mssgw(home, "message", "open", "--to", SECRETARIAT, input=bytes(protected))
    assert opened.returncode == 1
    assert b"smime=fail" in opened.stderr and b"Traceback" not in opened.stderr


def test_unknown_recipient_is_a_clear_error(home: Path) -> None:
    done = mssgw(home, "message", "protect", "--from", ANNE, "--to", "nobody@b.mssante.test", input=MESSAGE)
    assert done.returncode != 0
    assert b"no certificate or OpenPGP key for: nobody@b.mssante.test" in done.stderr
    assert b"Traceback" not in done.stderr


def test_protect_with_openpgp_when_recipients_publish_keys(home: Path) -> None:
    assert mssgw(home, "certs", "pgp", "generate", ANNE).returncode == 0
    assert mssgw(home, "domains", "trust", "b.mssante.test", "--relay", "127.0.0.1:2525").returncode == 0
    assert mssgw(home, "directory", "add-mailbox", "bob@b.mssante.test", "--type", "ORG", "--name", "B").returncode == 0
    # bob's key: made in our keyring for the test, then exported and imported as a remote's public key
    other = home.parent / "bob-gnupg"
    other.mkdir(mode=0o700)
    base = ["gpg", "--homedir", str(other), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*base, "--quick-gen-key", "Bob <bob@b.mssante.test>", "rsa2048", "sign,encrypt", "1y"],
                   check=True, capture_output=True)
    pub = home.parent / "bob.asc"
    pub.write_bytes(subprocess.run([*base, "--armor", "--export", "bob@b.mssante.test"], check=True,
                                   capture_output=True).stdout)
    assert mssgw(home, "certs", "pgp", "import", "bob@b.mssante.test", str(pub)).returncode == 0
    done = mssgw(home, "message", "protect", "--from", ANNE, "--to", "bob@b.mssante.test", input=MESSAGE)
    assert done.returncode == 0, done.stderr
    assert b"protected with openpgp" in done.stderr
    assert b"application/pgp-encrypted" in done.stdout and b"Amoxicilline" not in done.stdout
    # gpg itself (bob's keyring, knowing Anne's public key) decrypts it and checks Anne's signature
    anne_pub = subprocess.run(["gpg", "--homedir", str(home / "gnupg"), "--armor", "--export", ANNE],
                              check=True, capture_output=True).stdout
    subprocess.run([*base, "--import"], input=anne_pub, check=True, capture_output=True)
    armored = done.stdout[done.stdout.index(b"-----BEGIN PGP MESSAGE-----"):]
    armored = armored[: armored.index(b"-----END PGP MESSAGE-----") + 25]
    plain = subprocess.run([*base, "--decrypt"], input=armored, capture_output=True, check=False)
    assert plain.returncode == 0, plain.stderr
    assert b"Amoxicilline" in plain.stdout and b"Good signature" in plain.stderr
    subprocess.run(["gpgconf", "--homedir", str(other), "--kill", "gpg-agent"], check=False)


def test_open_with_openpgp_on_a_node_whose_keyring_is_empty(home: Path) -> None:
    """``message open`` brings the node's keyring in step with the directory first: a node that did
    not make Anne's key pair (its GnuPG home is empty) opens what gpg encrypted to her."""
    import shutil

    assert mssgw(home, "certs", "pgp", "generate", ANNE).returncode == 0
    anne_pub = subprocess.run(["gpg", "--homedir", str(home / "gnupg"), "--armor", "--export", ANNE],
                              check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "gpg-agent"], check=False)
    shutil.rmtree(home / "gnupg")  # another node: nothing in its keyring, the directory holds the keys
    other = home.parent / "sender-gnupg"
    other.mkdir(mode=0o700)
    base = ["gpg", "--homedir", str(other), "--batch", "--trust-model", "always"]
    subprocess.run([*base, "--import"], input=anne_pub, check=True, capture_output=True)
    armored = subprocess.run([*base, "--armor", "--encrypt", "-r", ANNE], input=MESSAGE, check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["gpgconf", "--homedir", str(other), "--kill", "gpg-agent"], check=False)
    pgp_mime = (
        b'From: <bob@b.mssante.test>\r\nTo: <anne.martin@a.mssante.test>\r\nSubject: ...\r\nMIME-Version: 1.0\r\n'
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n\r\n" + armored.replace(b"\n", b"\r\n") + b"\r\n--b1--\r\n"
    )
    done = mssgw(home, "message", "open", "--to", ANNE, input=pgp_mime)
    assert b"Amoxicilline" in done.stdout, done.stderr
    subprocess.run(["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "gpg-agent"], check=False)
