"""Recording certificates in the directory: one row per (fingerprint, purpose, owner), idempotent.

Every path that brings a certificate in (``mssgw init``'s development PKI, ``mssgw certs import``,
``mssgw peers add``, the tests' fixtures) records it here, so that the key store, the trust
anchors and the client-certificate logins all read the same rows.

Errors: ``ValueError`` from ``cryptography`` for bytes that are not a PEM certificate.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sqlalchemy import select
from sqlalchemy.orm import Session

from directory.models import Certificate

__all__ = ["register_certificate"]


def register_certificate(session: Session, pem: bytes, *, address: str | None, purpose: str,
                         key_path: str | None = None) -> str:
    """Record a certificate in the directory (idempotent); returns its SHA-256 fingerprint."""
    cert = x509.load_pem_x509_certificate(pem)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    row = session.scalar(
        select(Certificate).where(
            Certificate.fingerprint == fingerprint, Certificate.purpose == purpose, Certificate.address == address
        )
    )
    if row is None:
        row = Certificate(
            address=address,
            purpose=purpose,
            fingerprint=fingerprint,
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            pem=pem.decode("ascii"),
        )
        session.add(row)
    row.key_path = key_path
    session.flush()
    return fingerprint
