"""Crypto throughput: mssgw S/MIME and OpenPGP against the bare primitives, measured in the same run.

Prints messages/second for protect and open at 20 KB and 1 MB, in one process and with a
ProcessPoolExecutor over all cores, and the ratio to the raw `cryptography` PKCS7 calls
(sign DER + encrypt DER with AES-256-CBC; decrypt DER) and to a bare `gpg --encrypt --sign`
subprocess.  S/MIME 4.0 rows: AES-256-GCM (the default) against AES-256-CBC, and an ECDH
P-256 recipient (with an ECDSA signer) against RSA.
Compare ratios, not absolute numbers across runs (see /work/shared/PERFORMANCE.md).

    .venv/bin/python bench/bench_crypto.py [--seconds N] [--no-pgp]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from certs.pki import create_dev_pki, issue_certificate, load_certificate, load_private_key
from gateway.crypto.openpgp import OpenPgp
from gateway.crypto.smime import open_message, protect
from gateway.crypto.trust import TrustStore

_STATE: dict[str, object] = {}


def _message(size: int) -> bytes:
    head = (b"From: Dr Alice <dr.alice@a.test>\r\nTo: sec@b.test\r\nSubject: bench\r\n"
            b"Date: Tue, 02 Jan 2024 10:00:00 +0100\r\nMessage-ID: <b@a.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")  # fmt: skip
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def _rate(fn: Callable[[], object], seconds: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def _setup(directory: str) -> None:
    d = Path(directory)
    pki = create_dev_pki(d / "pki", "a.test", "mx.a.test")
    _STATE["ca"] = load_certificate(pki.ca_cert)
    a = d / "alice.pem"
    if not a.exists():
        for name, email in (("alice", "dr.alice@a.test"), ("bob", "sec@b.test")):
            cert, key = issue_certificate(pki, kind="user", email=email)
            (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
            os.chmod(d / f"{name}.key", 0o600)
    for name in ("alice", "bob"):
        _STATE[name] = (load_certificate(d / f"{name}.pem"), load_private_key(d / f"{name}.key"))
    for name, email in (("ec-alice", "dr.alice@a.test"), ("ec-bob", "sec@b.test")):
        _STATE[name] = _ec_identity(d, pki.ca_cert, pki.ca_key, name, email)
    _STATE["trust"] = TrustStore([_STATE["ca"]])  # type: ignore[list-item]


def _ec_identity(d: Path, ca_path: Path, ca_key_path: Path, name: str, email: str) -> tuple[object, object]:
    """A P-256 mailbox certificate (digitalSignature + keyAgreement) from the bench CA, made once."""
    cp, kp = d / f"{name}.pem", d / f"{name}.key"
    if not cp.exists():
        ca, ca_key = load_certificate(ca_path), load_private_key(ca_key_path)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        ku = x509.KeyUsage(True, False, False, False, True, False, False, False, False)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, email)]))
                .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(ku, critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False)
                .sign(ca_key, hashes.SHA256()))  # fmt: skip
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))  # fmt: skip
        os.chmod(kp, 0o600)
    key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
    return load_certificate(cp), key


def _protect_cbc(msg: bytes) -> bytes:
    (ac, ak), (bc, _) = _STATE["alice"], _STATE["bob"]  # type: ignore[misc]
    return protect(msg, signer_cert=ac, signer_key=ak, recipient_certs=[bc], content_encryption="aes-256-cbc")


def _protect_ec(msg: bytes) -> bytes:
    (ac, ak), (bc, _) = _STATE["ec-alice"], _STATE["ec-bob"]  # type: ignore[misc]
    return protect(msg, signer_cert=ac, signer_key=ak, recipient_certs=[bc])


def _open_ec(data: bytes) -> object:
    (bc, bk) = _STATE["ec-bob"]  # type: ignore[misc]
    inner, res = open_message(data, recipient_cert=bc, recipient_key=bk, trust=_STATE["trust"])  # type: ignore[arg-type]
    assert res.ok, res
    return inner


def _protect(msg: bytes) -> bytes:
    (ac, ak), (bc, _) = _STATE["alice"], _STATE["bob"]  # type: ignore[misc]
    return protect(msg, signer_cert=ac, signer_key=ak, recipient_certs=[bc])


def _open(data: bytes) -> object:
    (bc, bk) = _STATE["bob"]  # type: ignore[misc]
    inner, res = open_message(data, recipient_cert=bc, recipient_key=bk, trust=_STATE["trust"])  # type: ignore[arg-type]
    assert res.ok, res
    return inner


def _raw_protect(msg: bytes) -> bytes:
    (ac, ak), (bc, _) = _STATE["alice"], _STATE["bob"]  # type: ignore[misc]
    sig = (pkcs7.PKCS7SignatureBuilder().set_data(msg).add_signer(ac, ak, hashes.SHA256())
           .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]))  # fmt: skip
    return (pkcs7.PKCS7EnvelopeBuilder().set_data(msg + sig).add_recipient(bc).add_recipient(ac)
            .set_content_encryption_algorithm(algorithms.AES256)
            .encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))  # fmt: skip


def _raw_decrypt(der: bytes) -> bytes:
    (bc, bk) = _STATE["bob"]  # type: ignore[misc]
    return pkcs7.pkcs7_decrypt_der(der, bc, bk, [])


def _pool_rate(
    fn: Callable[[bytes], object], arg: bytes, seconds: float, directory: str, workers: int
) -> float:
    batch = workers * 8
    with ProcessPoolExecutor(workers, initializer=_setup, initargs=(directory,)) as pool:
        list(pool.map(fn, [arg] * workers))
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            list(pool.map(fn, [arg] * batch))
            n += batch
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure")
    ap.add_argument("--no-pgp", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="mssgw-bench-") as tmp:
        _setup(tmp)
        print(f"cores={cores}  seconds/figure={args.seconds}")
        print(f"{'size':>6}  {'operation':<34} {'msg/s':>9}  {'ratio':>7}")
        for size, label in ((20_000, "20KB"), (1_000_000, "1MB")):
            msg = _message(size)
            protected = _protect(msg)
            raw = _raw_protect(msg)
            rows = [
                (
                    "raw cryptography sign+encrypt DER",
                    _rate(lambda m=msg: _raw_protect(m), args.seconds),
                    None,
                ),
                ("mssgw smime.protect (AES-256-GCM)", _rate(lambda m=msg: _protect(m), args.seconds), 0),
                (
                    f"mssgw smime.protect x{cores} procs",
                    _pool_rate(_protect, msg, args.seconds, tmp, cores),
                    0,
                ),
                (
                    "raw cryptography pkcs7_decrypt_der",
                    _rate(lambda d=raw: _raw_decrypt(d), args.seconds),
                    None,
                ),
                (
                    "mssgw smime.open (decrypt+verify+path)",
                    _rate(lambda d=protected: _open(d), args.seconds),
                    3,
                ),
                (
                    f"mssgw smime.open x{cores} procs",
                    _pool_rate(_open, protected, args.seconds, tmp, cores),
                    3,
                ),
            ]
            for name, value, base in rows:
                ratio = f"{value / rows[base][1]:.2f}" if base is not None else "1.00"
                print(f"{label:>6}  {name:<34} {value:9.1f}  {ratio:>7}")
            # S/MIME 4.0: ratios to the same operation with AES-256-CBC and RSA (rows 1 and 4 above).
            cbc = _protect_cbc(msg)
            ec_protected = _protect_ec(msg)
            more = [
                ("  protect AES-256-CBC (RSA)", _rate(lambda m=msg: _protect_cbc(m), args.seconds), 1),
                ("  protect GCM, ECDSA + ECDH P-256", _rate(lambda m=msg: _protect_ec(m), args.seconds), 1),
                ("  open AES-256-CBC (RSA)", _rate(lambda d=cbc: _open(d), args.seconds), 4),
                ("  open GCM, ECDH P-256 + ECDSA", _rate(lambda d=ec_protected: _open_ec(d), args.seconds), 4),
            ]
            for name, value, base in more:
                print(f"{label:>6}  {name:<34} {value:9.1f}  {value / rows[base][1]:7.2f}")
        if not args.no_pgp:
            _bench_pgp(Path(tmp), args.seconds)


def _bench_pgp(tmp: Path, seconds: float) -> None:
    alice, bob = OpenPgp(tmp / "ga"), OpenPgp(tmp / "gb")
    try:
        afpr = alice.generate_key("dr.alice@a.test", "Alice")
        bfpr = bob.generate_key("sec@b.test", "Bob")
        alice.import_key(bob.export_public(bfpr))
        bob.import_key(alice.export_public(afpr))
        msg = _message(20_000)
        cmd = ["gpg", "--homedir", str(alice.home), "--batch", "--pinentry-mode", "loopback", "--trust-model",
               "always", "--armor", "--sign", "--encrypt", "-u", afpr, "-r", bfpr, "-r", afpr]  # fmt: skip

        def bare() -> bytes:
            return subprocess.run(cmd, input=msg, capture_output=True, check=True).stdout

        protected = alice.protect(msg, afpr, [bfpr])
        base = _rate(bare, seconds)
        ours = _rate(lambda: alice.protect(msg, afpr, [bfpr]), seconds)
        opened = _rate(lambda: bob.open(protected), seconds)
        print(f"{'20KB':>6}  {'bare gpg --encrypt --sign process':<34} {base:9.1f}  {'1.00':>7}")
        print(f"{'20KB':>6}  {'mssgw openpgp.protect':<34} {ours:9.1f}  {ours / base:7.2f}")
        print(f"{'20KB':>6}  {'mssgw openpgp.open':<34} {opened:9.1f}  {opened / base:7.2f}")
    finally:
        alice.close()
        bob.close()


if __name__ == "__main__":
    main()
