"""Checking health documents against protecting them: CPU per message with a 1 MB IHE XDM package.

Composes one message (``gateway.documents.compose``) whose PDF is about 1 MB of incompressible
bytes (a scanned document compresses little), then measures in one process:

- check: ``inspect_message`` (MIME walk, base64 decode, zip directory checks, inflate in bounded
  chunks, SHA-1, METADATA.XML and CDA header parsed by defusedxml) + ``decide_documents``,
  what the submission edge runs at DATA;
- protect + open: S/MIME sign + encrypt for one recipient, then decrypt + verify
  (``gateway.crypto.smime``), what the pipeline costs for the same bytes.

Prints CPU milliseconds per message (process time) and the ratio check / (protect + open).
Compare ratios, not absolute numbers across machines.

    .venv/bin/python bench/bench_documents.py [--seconds N] [--size BYTES]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from certs.pki import create_dev_pki, issue_certificate, load_certificate
from gateway.crypto.smime import open_message, protect
from gateway.crypto.trust import TrustStore
from gateway.documents.cda import Author, Patient
from gateway.documents.compose import ComposeRequest, compose
from gateway.documents.ins import parse_ins
from gateway.documents.scan import inspect_message
from gateway.policy.documents import decide_documents

NIR = "279035121518989"  # a test patient (key 89), under the test INS authority


def _cpu_ms(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Process CPU milliseconds per call, over at least ``seconds`` of wall time."""
    fn()
    n = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        fn()
        n += 1
    return (time.process_time() - cpu) * 1000 / n, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1024 * 1024, help="PDF size in bytes")
    args = parser.parse_args()
    pdf = b"%PDF-1.4\n" + os.urandom(args.size)
    message = compose(ComposeRequest(
        "dr.alice@a.test", ("sec@b.test",), pdf, "scan.pdf",
        Patient(parse_ins(NIR, "test"), "Patiente-Test", "Jeanne", "19790328", "F"), "11488-4",
        author=Author("10000000009", "Martin", "Anne")))
    found = inspect_message(message)
    decided = decide_documents(found.policy_facts())
    assert found.error is None and decided.decision.accepted, decided.decision
    with tempfile.TemporaryDirectory() as tmp:
        pki = create_dev_pki(Path(tmp) / "pki", "a.test", "mx.a.test")
        alice_cert, alice_key = issue_certificate(pki, kind="user", email="dr.alice@a.test")
        bob_cert, bob_key = issue_certificate(pki, kind="user", email="sec@b.test")
        trust = TrustStore([load_certificate(pki.ca_cert)])

        def check() -> object:
            return decide_documents(inspect_message(message).policy_facts())

        def protect_open() -> object:
            sealed = protect(message, signer_cert=alice_cert, signer_key=alice_key, recipient_certs=[bob_cert])
            inner, result = open_message(sealed, recipient_cert=bob_cert, recipient_key=bob_key, trust=trust)
            assert result.ok, result
            return inner

        check_ms, check_n = _cpu_ms(check, args.seconds)
        crypto_ms, crypto_n = _cpu_ms(protect_open, args.seconds)
    print(f"message {len(message):,} bytes, IHE_XDM package with a {args.size:,}-byte PDF (CDA level 1 + PDF part)")
    print(f"check documents (inspect + decide): {check_ms:8.2f} ms CPU/message  ({check_n} runs)")
    print(f"S/MIME protect + open:              {crypto_ms:8.2f} ms CPU/message  ({crypto_n} runs)")
    print(f"ratio check / (protect + open):     {check_ms / crypto_ms:8.3f}")


if __name__ == "__main__":
    main()
