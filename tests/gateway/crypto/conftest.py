"""Session-scoped PKI material for the crypto tests: a dev CA with CRL, mailbox identities, and a foreign CA."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from certs.pki import DevPki, create_dev_pki, issue_certificate, load_certificate, revoke_certificate
from certs.pki import save_certificate_and_key as _save
from gateway.crypto.trust import TrustStore


@dataclass(frozen=True)
class Identity:
    email: str
    cert: x509.Certificate
    key: rsa.RSAPrivateKey
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class World:
    pki: DevPki
    ca: x509.Certificate
    trust: TrustStore
    alice: Identity  # practitioner at a.test (signer)
    bob: Identity  # secretariat at b.test (recipient)
    carol: Identity  # another recipient, not addressed
    expired: Identity
    future: Identity
    revoked: Identity
    foreign: Identity  # issued by a CA we do not trust
    directory: Path


def run_openssl(*args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def message(
    from_addr: str = "Dr Alice <dr.alice@a.test>", to: str = "sec@b.test", body: bytes = b""
) -> bytes:
    return (
        f"From: {from_addr}\r\nTo: {to}\r\nCc: copy@b.test\r\nSubject: Resultats patient DUPONT\r\n"
        "Date: Tue, 02 Jan 2024 10:00:00 +0100\r\nMessage-ID: <m1@a.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + (body or "Bonjour, voici les résultats.\r\n".encode())


def _identity(
    directory: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey, email: str
) -> Identity:
    cp, kp = directory / f"{name}.pem", directory / f"{name}.key"
    _save(cert, key, cp, kp)
    return Identity(email, cert, key, cp, kp)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    d = tmp_path_factory.mktemp("crypto")
    pki = create_dev_pki(d / "pki", "a.test", "mx.a.test")
    now = dt.datetime.now(dt.UTC)

    def mk(name: str, email: str, kind: str = "user", **kw: object) -> Identity:
        cert, key = issue_certificate(pki, kind=kind, email=email, **kw)  # type: ignore[arg-type]
        return _identity(d, name, cert, key, email)

    alice = mk("alice", "dr.alice@a.test")
    bob = mk("bob", "sec@b.test", "org")
    carol = mk("carol", "carol@c.test", "org")
    expired = mk("expired", "old@a.test", not_before=now - dt.timedelta(days=400),
                 not_after=now - dt.timedelta(days=1))  # fmt: skip
    future = mk("future", "soon@a.test", not_before=now + dt.timedelta(days=2),
                not_after=now + dt.timedelta(days=300))  # fmt: skip
    revoked = mk("revoked", "gone@a.test")
    revoke_certificate(pki, revoked.cert.serial_number, x509.ReasonFlags.key_compromise)

    other = create_dev_pki(d / "other", "evil.test", "mx.evil.test")
    fc, fk = issue_certificate(other, kind="user", email="dr.alice@a.test")
    foreign = _identity(d, "foreign", fc, fk, "dr.alice@a.test")

    ca = load_certificate(pki.ca_cert)
    trust = TrustStore([ca], [x509.load_pem_x509_crl(pki.crl.read_bytes())])
    return World(pki, ca, trust, alice, bob, carol, expired, future, revoked, foreign, d)


@pytest.fixture(scope="session")
def openssl() -> Callable[..., bytes]:
    """`openssl(*args, stdin=...)` -> stdout; fails the test with openssl's stderr on error."""
    return run_openssl


@pytest.fixture(scope="session")
def make_message() -> Callable[..., bytes]:
    return message
