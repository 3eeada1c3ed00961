"""PGP/MIME through python-gnupg, with the `gpg` command line as the independent oracle."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.crypto import _mime
from gateway.crypto.openpgp import OpenPgp


@dataclass(frozen=True)
class Pgp:
    alice: OpenPgp
    bob: OpenPgp
    carol: OpenPgp
    alice_fpr: str
    bob_fpr: str
    carol_fpr: str


@pytest.fixture(scope="module")
def pgp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pgp]:
    base = tmp_path_factory.mktemp("pgp")
    alice, bob, carol = (OpenPgp(base / n) for n in ("a", "b", "c"))
    afpr = alice.generate_key("dr.alice@a.test", "Dr Alice")
    bfpr = bob.generate_key("sec@b.test", "Secretariat B")
    cfpr = carol.generate_key("dr.alice@a.test", "Carol impersonating Alice")
    assert bob.import_key(alice.export_public(afpr)) == [afpr]
    assert alice.import_key(bob.export_public(bfpr)) == [bfpr]
    carol.import_key(bob.export_public(bfpr))
    yield Pgp(alice, bob, carol, afpr, bfpr, cfpr)
    for p in (alice, bob, carol):
        p.close()


def _gpg(home: Path, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
                           "--trust-model", "always", *args], input=stdin, capture_output=True, check=False)  # fmt: skip


def test_keyring_mode_and_listing(pgp: Pgp) -> None:
    assert pgp.bob.home.stat().st_mode & 0o777 == 0o700
    fprs = {k["fingerprint"] for k in pgp.bob.list_keys()}
    assert fprs == {pgp.alice_fpr, pgp.bob_fpr}
    assert {k["fingerprint"] for k in pgp.bob.list_keys(secret=True)} == {pgp.bob_fpr}


def test_gpg_decrypts_and_verifies_ours(pgp: Pgp, make_message: Callable[..., bytes]) -> None:
    msg = make_message()
    out = pgp.alice.protect(msg, pgp.alice_fpr, [pgp.bob_fpr])
    assert b"DUPONT" not in out and b"Subject: Message securise\r\n" in out
    assert b'multipart/encrypted; protocol="application/pgp-encrypted"' in out
    armored = out[out.index(b"-----BEGIN PGP MESSAGE-----") : out.index(b"-----END PGP MESSAGE-----") + 25]
    proc = _gpg(pgp.bob.home, "--status-fd", "2", "--decrypt", stdin=armored)
    assert proc.returncode == 0, proc.stderr
    assert b"[GNUPG:] GOODSIG" in proc.stderr and pgp.alice_fpr.encode() in proc.stderr
    assert proc.stdout.endswith(msg) and proc.stdout.startswith(b"Content-Type: message/rfc822\r\n")
    inner, res = pgp.bob.open(out)
    assert res.ok, res
    assert inner == msg and res.signer_fingerprint == pgp.alice_fpr


def test_we_open_gpg_output(pgp: Pgp, make_message: Callable[..., bytes]) -> None:
    msg = make_message()
    proc = _gpg(pgp.alice.home, "--armor", "--sign", "--encrypt", "-u", pgp.alice_fpr, "-r", pgp.bob_fpr,
                stdin=b"Content-Type: message/rfc822\r\n\r\n" + msg)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = (b'From: dr.alice@a.test\r\nContent-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
            b' boundary="XX"\r\n\r\n--XX\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--XX\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + proc.stdout + b"\r\n--XX--\r\n")  # fmt: skip
    inner, res = pgp.bob.open(data)
    assert res.ok, res
    assert inner == msg


def test_unknown_signer_key(pgp: Pgp, make_message: Callable[..., bytes]) -> None:
    out = pgp.carol.protect(make_message(), pgp.carol_fpr, [pgp.bob_fpr], encrypt_for_sender=False)
    _, res = pgp.bob.open(out)
    assert res.failure == "unknown-key" and not res.ok


def test_from_mismatch(pgp: Pgp, make_message: Callable[..., bytes]) -> None:
    out = pgp.alice.protect(make_message(from_addr="mallory@a.test"), pgp.alice_fpr, [pgp.bob_fpr])
    _, res = pgp.bob.open(out)
    assert res.failure == "from-mismatch" and res.signature_valid and not res.ok


def test_not_for_us(pgp: Pgp, make_message: Callable[..., bytes]) -> None:
    out = pgp.alice.protect(make_message(), pgp.alice_fpr, [pgp.bob_fpr], encrypt_for_sender=False)
    inner, res = pgp.carol.open(out)
    assert inner is None and res.failure == "decrypt-failed"


@pytest.mark.parametrize("data", [
    b"garbage", b"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=B\r\n\r\n--B\r\n",
    b"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=B\r\n\r\n--B\r\n\r\nVersion: 1\r\n"
    b"--B\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n\r\nAAAA\r\n-----END PGP MESSAGE-----\r\n--B--\r\n",
])  # fmt: skip
def test_garbage(pgp: Pgp, data: bytes) -> None:
    inner, res = pgp.bob.open(data)
    assert (
        inner is None and res.failure in ("not-encrypted", "malformed-cms", "decrypt-failed") and not res.ok
    )


def test_lf_message_comes_back_crlf(pgp: Pgp) -> None:
    msg = b"From: dr.alice@a.test\nTo: sec@b.test\nSubject: x\n\nbody\n"
    inner, res = pgp.bob.open(pgp.alice.protect(msg, pgp.alice_fpr, [pgp.bob_fpr]))
    assert res.ok and inner == _mime.to_crlf(msg)
