"""Peer operators of the trust space in one step: their CA, their domains, route and pinned identity.

``mssgw peers`` is a thin shell over these functions. ``add_peer`` does what connecting two
operators used to take an hour of guessing for: the peer's CA becomes a trust anchor (S/MIME
signatures, their server's certificate, and their client certificate on our inbound port:
``gateway.core.tls`` builds the inbound client-CA set from the anchors), each domain is
trusted with its route (``relay`` HOST:PORT or its MX records) and the operator's certificate
identity (``operator_dn``, the MSSanté whitelist's ``DNCertificatOperateur``), whether its mail
must be encrypted end to end (``require_encryption``; False is the MSSanté model: signed mail
over mutual TLS pinned to that identity), and the
operator certificate, when given, is registered as the domain-bound encryption certificate
(mail to a peer mailbox whose own certificate we do not know is encrypted to its operator).
Everything is idempotent: running the same ``peers add`` twice leaves the same rows.

The running gateway applies changes within seconds (``gateway.app``'s trust watch).

``export_bundle`` writes what a peer needs from us as a small JSON document (no private key,
no mailbox): ``{"mssgw_peer": 1, "domains", "operator_dn", "inbound", "ca_pem",
"operator_cert_pem"}``; ``read_bundle`` reads it back for ``peers add --from FILE``.

Errors: ``PeerError`` (bad input, a sentence for the admin) and ``PeerNotFound``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from certs.service import add_trust_anchor, fingerprint_of, load_material
from directory import admin, facts
from directory.certificates import register_certificate
from directory.identifiers import normalise_domain
from directory.models import Certificate, Domain, DomainKind
from gateway.config import Settings
from gateway.core.errors import DirectoryError

BUNDLE_FORMAT = 1
#: A bundle is a few kilobytes; anything much larger is not one.
MAX_BUNDLE_BYTES = 256 * 1024


class PeerError(DirectoryError):
    """A peer cannot be added or exported as asked; the message says why, for the admin."""


class PeerNotFound(PeerError):
    """The domain is not a peer operator's domain in our trust list (the CLI exits 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Bundle:
    """What ``peers export`` prints: everything a peer needs from us, nothing secret."""

    domains: list[str]
    operator_dn: str
    inbound: str | None
    ca_pem: bytes
    operator_cert_pem: bytes | None


def _certificate(data: bytes, what: str) -> x509.Certificate:
    try:
        return load_material(data).certificate
    except Exception:
        raise PeerError(f"{what} is not a PEM or DER certificate") from None


def operator_identity(data: bytes, ca_pem: bytes | None = None) -> tuple[str, bytes]:
    """The subject DN of an operator certificate and its PEM; it must be issued by ``ca_pem`` when given."""
    cert = _certificate(data, "--operator-cert")
    if ca_pem is not None:
        ca = _certificate(ca_pem, "--ca")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise PeerError(
                f"the operator certificate ({cert.subject.rfc4514_string()}) was not issued by the CA "
                f"({ca.subject.rfc4514_string()})"
            ) from None
    if cert.not_valid_after_utc < datetime.now(UTC):
        raise PeerError(f"the operator certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert.subject.rfc4514_string(), cert.public_bytes(serialization.Encoding.PEM)


def add_peer(
    session: Session,
    settings: Settings,
    domains: list[str],
    *,
    ca_pem: bytes,
    relay: str | None,
    use_mx: bool,
    operator_dn: str | None,
    operator_cert_pem: bytes | None = None,
    require_encryption: bool | None = None,
) -> list[dict[str, Any]]:
    """Trust ``domains`` of one peer operator: anchor, route, pinned identity (see the module docstring).

    ``require_encryption`` False accepts the peer's mail signed but not encrypted end to end, over
    mutual TLS pinned to its identity (the MSSanté model); None keeps the domain's setting (a new
    peer requires encryption)."""
    if not domains:
        raise PeerError("no domain to add")
    if relay is None and not use_mx:
        raise PeerError("give the peer's route: --relay HOST:PORT or --mx")
    if relay is not None and use_mx:
        raise PeerError("--relay and --mx exclude each other")
    if operator_dn is None and operator_cert_pem is None:
        raise PeerError("pin the peer's identity: --operator-dn DN or --operator-cert FILE")
    cert_pem = None
    if operator_cert_pem is not None:
        dn, cert_pem = operator_identity(operator_cert_pem, ca_pem)
        if operator_dn is not None and operator_dn != dn:
            raise PeerError(f"--operator-dn {operator_dn!r} differs from the certificate's subject {dn!r}")
        operator_dn = dn
    names = [normalise_domain(d) for d in domains]
    ours = set(settings.domains)
    for name in names:
        if name in ours:
            raise PeerError(f"{name} is one of our own domains; it cannot be a peer")
    out = []
    for name in names:
        try:
            add_trust_anchor(session, ca_pem, peer=name)
        except Exception as exc:  # CertError: not a CA, expired, unreadable
            raise PeerError(f"--ca: {exc}") from None
        admin.trust_domain(session, name, relay=relay, use_mx=use_mx, operator_dn=operator_dn,
                           description="peer operator (mssgw peers add)",
                           require_encryption=require_encryption)  # fmt: skip
        row = facts.get_domain(session, name)
        assert row is not None
        if relay is not None:
            row.use_mx = False
        else:
            row.relay = None
        if cert_pem is not None:
            register_certificate(session, cert_pem, address=name, purpose="encrypt")
        session.flush()
        out.append(peer_dict(session, name))
    return out


def _peer_row(session: Session, domain: str) -> Domain:
    row = facts.get_domain(session, domain)
    if row is None or row.kind != DomainKind.TRUSTED:
        raise PeerNotFound(f"{domain.lower()} is not a peer operator's domain (see 'mssgw peers list')")
    return row


def peer_dict(session: Session, domain: str) -> dict[str, Any]:
    row = _peer_row(session, domain)
    certs = list(session.scalars(select(Certificate).where(Certificate.address == row.name,
                                                           Certificate.purpose.in_(("anchor", "encrypt")))))
    return {
        "domain": row.name,
        "route": f"relay {row.relay}" if row.relay else ("mx" if row.use_mx else "mx (implicit)"),
        "relay": row.relay,
        "use_mx": row.use_mx,
        "operator_dn": row.operator_dn,
        "require_encryption": facts.encryption_required(row),
        "source": row.source,
        "anchors": [{"subject": c.subject, "fingerprint": c.fingerprint} for c in certs if c.purpose == "anchor"],
        "operator_cert": next((c.fingerprint for c in certs if c.purpose == "encrypt"), None),
    }


def list_peers(session: Session) -> list[dict[str, Any]]:
    names = session.scalars(select(Domain.name).where(Domain.kind == DomainKind.TRUSTED).order_by(Domain.name))
    out = []
    for name in list(names):
        data = peer_dict(session, name)
        data["ca"] = ", ".join(a["subject"] for a in data["anchors"]) or "(shared anchors)"
        out.append(data)
    return out


def remove_peer(session: Session, domain: str) -> dict[str, Any]:
    """Forget a peer's domain, the CA it brought and its operator certificate (other anchors stay)."""
    row = _peer_row(session, domain)
    gone = peer_dict(session, row.name)
    for cert in session.scalars(select(Certificate).where(Certificate.address == row.name,
                                                          Certificate.purpose.in_(("anchor", "encrypt")))):
        session.delete(cert)
    session.delete(row)
    session.flush()
    return gone


# --- export / import ---------------------------------------------------------------------


def export_bundle(settings: Settings, *, inbound: str | None = None) -> dict[str, Any]:
    """What a peer needs from us: CA, operator certificate and DN, our domains, our inbound address."""
    pki = settings.pki_dir
    cert_path = settings.path("tls", "operator_cert", pki / "operator.pem")
    try:
        op_pem = cert_path.read_bytes()
    except OSError as exc:
        raise PeerError(f"cannot read our operator certificate {cert_path}: {exc.strerror}") from None
    ca = _issuer_of(_certificate(op_pem, str(cert_path)),
                    [pki / "ca.pem", settings.path("tls", "client_ca", pki / "ca.pem")])  # fmt: skip
    dn, op_pem = operator_identity(op_pem, ca.public_bytes(serialization.Encoding.PEM))
    if inbound is None:
        where = settings.listen("inbound")
        if where is not None:
            host = settings.hostname if where[0] in ("0.0.0.0", "::", "") else where[0]  # noqa: S104
            inbound = f"{host}:{where[1]}"
    return {
        "mssgw_peer": BUNDLE_FORMAT,
        "domains": settings.domains,
        "operator_dn": dn,
        "inbound": inbound,
        "ca_fingerprint": fingerprint_of(ca),
        "ca_pem": ca.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "operator_cert_pem": op_pem.decode("ascii"),
    }


def _issuer_of(cert: x509.Certificate, files: list[Path]) -> x509.Certificate:
    """Our CA: the certificate of ``files`` (dev CA, ``tls.client_ca``) that issued ``cert``."""
    for path in files:
        try:
            candidates = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            continue
        for ca in candidates:
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
    raise PeerError(f"the CA that issued our operator certificate ({cert.issuer.rfc4514_string()}) is in neither "
                    f"{' nor '.join(str(p) for p in dict.fromkeys(files))}; set tls.client_ca to a file holding it")


def read_bundle(path: Path) -> Bundle:
    """Parse a ``peers export`` file; every field is checked, nothing in it is trusted blindly."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PeerError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_BUNDLE_BYTES:
        raise PeerError(f"{path} is not a peer bundle (larger than {MAX_BUNDLE_BYTES // 1024} KiB)")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise PeerError(f"{path} is not a peer bundle (not JSON; make it with 'mssgw peers export')") from None
    if not isinstance(data, dict) or data.get("mssgw_peer") != BUNDLE_FORMAT:
        raise PeerError(f"{path} is not a peer bundle of format {BUNDLE_FORMAT} ('mssgw peers export')")
    domains = data.get("domains")
    if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
        raise PeerError(f"peer bundle {path}: 'domains' must be a non-empty list of domain names")
    for key in ("operator_dn", "ca_pem", "operator_cert_pem"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise PeerError(f"peer bundle {path}: '{key}' is missing")
    inbound = data.get("inbound")
    if inbound is not None and not isinstance(inbound, str):
        raise PeerError(f"peer bundle {path}: 'inbound' must be HOST:PORT")
    return Bundle([normalise_domain(d) for d in domains], data["operator_dn"], inbound,
                  data["ca_pem"].encode(), data["operator_cert_pem"].encode())  # fmt: skip
