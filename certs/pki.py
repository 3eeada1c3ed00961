"""Development PKI: a local CA standing in for IGC-Santé, with server, operator and user certificates and a CRL.

The job: give `mssgw init`, the tests and the benchmarks a complete, self-consistent X.509
hierarchy without any external authority.  Profiles follow RFC 5280 (certificate and CRL
profile), RFC 8550 (S/MIME certificate handling: rfc822Name in subjectAltName, EKU
emailProtection) and the usual TLS server/client profiles (EKU serverAuth/clientAuth).

Files written under the chosen directory (keys are PEM, unencrypted, mode 0600):

    ca.pem / ca.key              the CA (RSA 3072, 10 years, basicConstraints CA, keyCertSign+cRLSign)
    server.pem / server.key      TLS server certificate for the hostname (2 years)
    operator.pem / operator.key  operator certificate: signing + mutual TLS between operators
    crl.pem                      CRL signed by the CA (nextUpdate in 7 days)
    revoked.json                 the revocation list the CRL is generated from
    serials.json                 serial numbers issued, for the audit trail

The CA's private key need not be a file: `issue_certificate`, `revoke_certificate`, `write_crl`
and `write_server_certificate` take it as an argument (``certs.service`` opens it sealed in the
database, so any node of an operator issues and revokes); ``ca.key`` is read only when none is given.

Errors: `PkiError` for a missing or unreadable PKI directory, or an impossible request
(e.g. a user certificate without an e-mail address).  Private keys are never printed.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.core.errors import ConfigurationError
from gateway.core.keys import private_key_from_pem

__all__ = [
    "CertKind",
    "DevPki",
    "PkiError",
    "create_dev_pki",
    "dev_paths",
    "issue_certificate",
    "load_certificate",
    "load_dev_pki",
    "load_private_key",
    "revoke_certificate",
    "save_certificate_and_key",
    "write_crl",
    "write_private_key",
    "write_public",
    "write_server_certificate",
]

CertKind = Literal["user", "org", "app", "server", "operator"]

CA_VALIDITY = _dt.timedelta(days=3650)
LEAF_VALIDITY = _dt.timedelta(days=730)
CRL_VALIDITY = _dt.timedelta(days=7)
#: Backdate notBefore a little so that clocks slightly behind ours accept fresh certificates.
CLOCK_SKEW = _dt.timedelta(minutes=5)
CA_KEY_SIZE = 3072
KEY_MODE = 0o600

_FILES = {
    "ca_cert": "ca.pem",
    "ca_key": "ca.key",
    "server_cert": "server.pem",
    "server_key": "server.key",
    "operator_cert": "operator.pem",
    "operator_key": "operator.key",
    "crl": "crl.pem",
}
_REVOKED = "revoked.json"
_SERIALS = "serials.json"


class PkiError(ConfigurationError):
    """The development PKI is missing, unreadable, or the request cannot be honoured."""


@dataclass(frozen=True)
class DevPki:
    """Paths of a development PKI; every path exists once `create_dev_pki` has returned."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    operator_cert: Path
    operator_key: Path
    crl: Path

    @property
    def revoked_list(self) -> Path:
        return self.directory / _REVOKED


def _paths(directory: Path) -> DevPki:
    d = Path(directory)
    return DevPki(directory=d, **{k: d / v for k, v in _FILES.items()})


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


# ---------------------------------------------------------------- file helpers


def write_private_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, created with mode 0600 (never world-readable, even briefly)."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_MODE)
    try:
        os.fchmod(fd, KEY_MODE)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, CRL) atomically, mode 0644."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_certificate_and_key(
    cert: x509.Certificate, key: rsa.RSAPrivateKey, cert_path: Path, key_path: Path
) -> None:
    """Save a certificate (PEM, 0644) and its private key (PEM, 0600)."""
    write_private_key(key_path, key)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.__class__.__name__}") from exc


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = private_key_from_pem(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        # The message deliberately omits the exception text: it could quote key material.
        raise PkiError(f"cannot read private key {path}: {exc.__class__.__name__}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PkiError(f"private key {path} is not an RSA key")
    return key


# ---------------------------------------------------------------- building blocks


def _new_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _record_serial(directory: Path, serial: int, subject: str, kind: str) -> None:
    path = directory / _SERIALS
    try:
        entries = json.loads(path.read_text()) if path.exists() else []
    except (OSError, ValueError):
        entries = []
    entries.append({"serial": format(serial, "x"), "subject": subject, "kind": kind})
    write_public(path, json.dumps(entries, indent=1).encode())


def _build_ca(domain: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key(CA_KEY_SIZE)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"mssgw dev CA {domain}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"mssgw development PKI {domain}"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _key_usage(*, sign: bool, encipher: bool, non_repudiation: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=non_repudiation,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entries(dns_names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in dns_names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def _issue(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    *,
    kind: CertKind,
    email: str | None,
    common_name: str | None,
    organization: str | None,
    dns_names: Sequence[str],
    not_before: _dt.datetime | None,
    not_after: _dt.datetime | None,
    key_size: int,
    crl_url: str | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    if kind in ("user", "org", "app") and not email:
        raise PkiError(f"a {kind} certificate needs an e-mail address (subjectAltName rfc822Name)")
    if kind in ("server", "operator") and not dns_names:
        raise PkiError(f"a {kind} certificate needs at least one DNS name")
    key = _new_key(key_size)
    cn = common_name or email or dns_names[0]
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"))
    if email and kind in ("user", "org", "app"):
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    now = _now()
    start = not_before or (now - CLOCK_SKEW)
    end = not_after or (start + LEAF_VALIDITY)

    san: list[x509.GeneralName] = []
    if email:
        san.append(x509.RFC822Name(email))
    san.extend(_san_entries(dns_names))

    if kind == "user":
        ku = _key_usage(sign=True, encipher=True, non_repudiation=True)
        eku = [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    elif kind in ("org", "app"):
        ku = _key_usage(sign=True, encipher=True)
        eku = [ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH]
    elif kind == "server":
        ku = _key_usage(sign=True, encipher=True)
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
    else:  # operator
        ku = _key_usage(sign=True, encipher=True)
        eku = [
            ExtendedKeyUsageOID.CLIENT_AUTH,
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.EMAIL_PROTECTION,
        ]

    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if crl_url:
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def _read_revoked(pki: DevPki) -> list[dict[str, object]]:
    path = pki.revoked_list
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PkiError(f"revocation list {path} is unreadable: {exc.__class__.__name__}") from exc
    if not isinstance(data, list):
        raise PkiError(f"revocation list {path} is not a JSON list")
    return data


def _write_crl(pki: DevPki, entries: list[dict[str, object]], ca_key: rsa.RSAPrivateKey | None = None
               ) -> x509.CertificateRevocationList:
    return write_crl(pki.crl, load_certificate(pki.ca_cert), ca_key or load_private_key(pki.ca_key), entries)


def write_crl(path: Path, ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey,
              entries: Sequence[dict[str, object]]) -> x509.CertificateRevocationList:
    """Sign a CRL of ``entries`` (``serial`` hex, ``date`` ISO, ``reason`` a ReasonFlags value) and write it."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for e in entries:
        rb = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(str(e["serial"]), 16))
            .revocation_date(_dt.datetime.fromisoformat(str(e["date"])))
        )
        reason = e.get("reason")
        if reason:
            rb = rb.add_extension(x509.CRLReason(x509.ReasonFlags(str(reason))), critical=False)
        builder = builder.add_revoked_certificate(rb.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    write_public(path, crl.public_bytes(serialization.Encoding.PEM))
    return crl


# ---------------------------------------------------------------- public API


def create_dev_pki(directory: Path, domain: str, hostname: str, *, force: bool = False) -> DevPki:
    """Create (or complete) the development PKI in `directory` and return its paths.

    Idempotent: files already present are kept unless `force=True`, in which case the whole
    hierarchy (CA, leaves, CRL, revocation list) is regenerated.  A new CA always re-issues
    the leaves, since the old ones would no longer chain.
    """
    pki = _paths(Path(directory))
    pki.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(pki.directory, 0o700)
    if force:
        for name in [*_FILES.values(), _REVOKED, _SERIALS]:
            (pki.directory / name).unlink(missing_ok=True)

    new_ca = not (pki.ca_cert.exists() and pki.ca_key.exists())
    if new_ca:
        ca_cert, ca_key = _build_ca(domain)
        save_certificate_and_key(ca_cert, ca_key, pki.ca_cert, pki.ca_key)
        _record_serial(pki.directory, ca_cert.serial_number, ca_cert.subject.rfc4514_string(), "ca")
        pki.revoked_list.unlink(missing_ok=True)
    else:
        ca_cert, ca_key = load_certificate(pki.ca_cert), load_private_key(pki.ca_key)

    if new_ca or not (pki.server_cert.exists() and pki.server_key.exists()):
        write_server_certificate(pki, ca_cert, ca_key, hostname, domain)

    if new_ca or not (pki.operator_cert.exists() and pki.operator_key.exists()):
        cert, key = _issue(
            ca_cert, ca_key, kind="operator", email=None, common_name=hostname,
            organization=f"Operateur {domain}", dns_names=_unique([hostname, domain]),
            not_before=None, not_after=None, key_size=2048,
        )  # fmt: skip
        save_certificate_and_key(cert, key, pki.operator_cert, pki.operator_key)
        _record_serial(pki.directory, cert.serial_number, cert.subject.rfc4514_string(), "operator")

    if new_ca or not pki.crl.exists():
        _write_crl(pki, _read_revoked(pki))
    return pki


def write_server_certificate(pki: DevPki, ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, hostname: str,
                             domain: str) -> x509.Certificate:
    """Issue this node's TLS listener certificate (server.pem, server.key 0600) from the CA.

    Each node has its own: the listener key is the one private key that stays a file of the node."""
    cert, key = _issue(
        ca_cert, ca_key, kind="server", email=None, common_name=hostname,
        organization=f"Operateur {domain}",
        dns_names=_unique([hostname, "localhost", "127.0.0.1", "::1"]),
        not_before=None, not_after=None, key_size=2048,
    )  # fmt: skip
    save_certificate_and_key(cert, key, pki.server_cert, pki.server_key)
    _record_serial(pki.directory, cert.serial_number, cert.subject.rfc4514_string(), "server")
    return cert


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def dev_paths(directory: Path) -> DevPki:
    """The paths of a PKI folder, whether or not its files exist (a joined node has no CA key file)."""
    return _paths(Path(directory))


def load_dev_pki(directory: Path) -> DevPki:
    """Return the paths of an existing PKI; `PkiError` names the missing files and how to create them.

    Only the public certificates are required: the CA's and the operator's keys are sealed in the
    database (a joined node never has them as files), and the listener's may be named elsewhere."""
    pki = _paths(Path(directory))
    missing = [p.name for p in (pki.ca_cert, pki.operator_cert) if not p.is_file()]
    if missing:
        raise PkiError(
            f"development PKI in {pki.directory} is incomplete (missing: {', '.join(missing)}); "
            "run `mssgw init` to create it (with an existing operator's database and key-encryption key, "
            "it joins that operator)"
        )
    return pki


def issue_certificate(
    pki: DevPki,
    *,
    kind: CertKind,
    email: str | None = None,
    common_name: str | None = None,
    dns_names: Sequence[str] = (),
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    key_size: int = 2048,
    organization: str | None = None,
    crl_url: str | None = None,
    ca_key: rsa.RSAPrivateKey | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """Issue a leaf certificate signed by the dev CA; the key is returned, not written.

    ``ca_key``: the CA's private key (sealed in the database); ``ca.key`` is read when it is None.

    user/org/app: SAN rfc822Name=email, KU digitalSignature+keyEncipherment (+nonRepudiation
    for user), EKU emailProtection (+clientAuth for org/app).  server: EKU serverAuth, SAN DNS.
    operator: EKU clientAuth+serverAuth+emailProtection, SAN DNS.
    """
    ca_cert = load_certificate(pki.ca_cert)
    signer = ca_key if ca_key is not None else load_private_key(pki.ca_key)
    cert, key = _issue(
        ca_cert, signer, kind=kind, email=email, common_name=common_name, organization=organization,
        dns_names=list(dns_names), not_before=not_before, not_after=not_after, key_size=key_size,
        crl_url=crl_url,
    )  # fmt: skip
    _record_serial(pki.directory, cert.serial_number, cert.subject.rfc4514_string(), kind)
    return cert, key


def revoke_certificate(pki: DevPki, serial: int, reason: x509.ReasonFlags | None = None,
                       ca_key: rsa.RSAPrivateKey | None = None) -> None:
    """Add `serial` to the revocation list (idempotent) and rewrite crl.pem, signed by the CA."""
    entries = _read_revoked(pki)
    hexserial = format(serial, "x")
    if not any(e.get("serial") == hexserial for e in entries):
        entries.append(
            {
                "serial": hexserial,
                "date": _now().replace(microsecond=0).isoformat(),
                "reason": reason.value if reason else None,
            }
        )
        write_public(pki.revoked_list, json.dumps(entries, indent=1).encode())
    _write_crl(pki, entries, ca_key)
