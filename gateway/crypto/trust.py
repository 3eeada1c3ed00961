"""Trust anchors, X.509 path validation and CRL revocation checking for signer and peer certificates.

The job: answer "does this certificate chain to one of our anchors, for this purpose, at this
time, and is it revoked?".  Path building and the RFC 5280 §6 checks (signatures, validity,
basicConstraints, keyUsage, name chaining, depth) are done by `cryptography.x509.verification`
(the Rust verifier); the extended key usage is checked by our own extension policy so that the
same code serves S/MIME (emailProtection, RFC 8550 §4.4.4), mutual TLS client certificates
(clientAuth) and servers (serverAuth).  Revocation uses CRLs (RFC 5280 §5): each CRL signature
is checked against its issuer in the validated chain; a CRL past its nextUpdate is "stale".
Anchors may be scoped to mail domains (a Direct trust bundle): for S/MIME such an anchor vouches
only for signatures speaking for one of its domains, so a peer's CA cannot vouch for another's.

Errors: `validate` never raises for a bad certificate; it returns a `ChainResult` whose
`failure` is one of untrusted-ca, expired, not-yet-valid, bad-key-usage, revoked,
crl-unavailable, crl-stale (the last two only when `require_crl` is set).
`load_trust_store` raises `TrustStoreError` when a file cannot be read or parsed.
"""

from __future__ import annotations

import datetime as _dt
import functools
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.core.errors import CryptoError
from gateway.crypto.result import CrlStatus

__all__ = ["ChainResult", "Purpose", "TrustStore", "TrustStoreError", "fingerprint", "load_trust_store"]

Purpose = Literal["emailProtection", "clientAuth", "serverAuth"]

_PURPOSE_OID = {
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
}
DEFAULT_CRL_MAX_AGE = _dt.timedelta(days=8)
MAX_CHAIN_DEPTH = 6
#: How long a successfully built path is reused for the same leaf and intermediates (seconds of
#: monotonic time).  Validity at the requested time and revocation are still checked every call.
PATH_CACHE_SECONDS = 300.0
PATH_CACHE_SIZE = 1024


class TrustStoreError(CryptoError):
    """A trust-anchor or CRL file is missing or cannot be parsed."""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, lower-case hex without separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class ChainResult:
    valid: bool
    chain: tuple[x509.Certificate, ...] = ()
    trust_anchor: str | None = None
    revoked: bool | None = None
    crl_status: CrlStatus = "unavailable"
    failure: str | None = None
    detail: str = ""
    emails: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.valid and self.failure is None


def _eku_validator(purpose: Purpose):  # type: ignore[no-untyped-def]
    oid = _PURPOSE_OID[purpose]

    def check(policy: Policy, cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
        # RFC 5280 §4.2.1.12: absence of EKU means "any purpose"; anyExtendedKeyUsage is accepted too.
        if ext is None:
            return
        if oid not in ext and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in ext:
            raise ValueError(f"extended key usage lacks {purpose}")

    return check


def _ku_validator(purpose: Purpose):  # type: ignore[no-untyped-def]
    def check(policy: Policy, cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
        if ext is None:
            return
        if not (ext.digital_signature or ext.content_commitment or ext.key_encipherment):
            raise ValueError(f"key usage does not allow {purpose}")

    return check


class TrustStore:
    """Anchors (e.g. the IGC-Santé roots and intermediates we accept) plus CRLs."""

    def __init__(
        self,
        anchors: Sequence[x509.Certificate],
        crls: Sequence[x509.CertificateRevocationList] = (),
        *,
        crl_max_age: _dt.timedelta = DEFAULT_CRL_MAX_AGE,
        require_crl: bool = False,
        scopes: Mapping[x509.Certificate, Iterable[str]] | None = None,
    ) -> None:
        """`scopes` maps an anchor to the mail domains it vouches for (a Direct trust bundle,
        Applicability Statement 1.2 §4 / Direct Trust bundles): for S/MIME, a path ending at a
        scoped anchor holds only for a From in one of those domains.  Anchors not in `scopes`
        vouch for every domain.  Mutual TLS (clientAuth, serverAuth) ignores scopes: peers are
        pinned by their operator DN there."""
        if not anchors:
            raise TrustStoreError("a trust store needs at least one anchor")
        self.scopes: dict[x509.Certificate, frozenset[str]] = {
            cert: frozenset(d.strip().lower().rstrip(".") for d in domains) for cert, domains in (scopes or {}).items()
        }
        self.anchors = list(anchors)
        self.crls = list(crls)
        self.crl_max_age = crl_max_age
        self.require_crl = require_crl
        self._store = Store(self.anchors)
        self._policies: dict[Purpose, tuple[ExtensionPolicy, ExtensionPolicy]] = {}
        self._lock = threading.Lock()
        # (purpose, leaf, intermediates) -> (monotonic expiry, _Path); successes only.
        self._paths: dict[tuple[object, ...], tuple[float, _Path]] = {}
        # id(crl) -> (crl, {issuer: signature valid}); the CRL is kept so that its id stays unique.
        self._crl_sigs: dict[int, tuple[x509.CertificateRevocationList, dict[x509.Certificate, bool]]] = {}

    def add_crl(self, crl: x509.CertificateRevocationList) -> None:
        self.crls.append(crl)

    def clear_cache(self) -> None:
        """Forget built paths and CRL signature checks (they are also bounded in time and size)."""
        with self._lock:
            self._paths.clear()
            self._crl_sigs.clear()

    def _extension_policies(self, purpose: Purpose) -> tuple[ExtensionPolicy, ExtensionPolicy]:
        if purpose not in self._policies:
            ee = (
                ExtensionPolicy.webpki_defaults_ee()
                .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_validator(purpose))
                .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ku_validator(purpose))
                # S/MIME and client certificates may carry only an rfc822Name, or no SAN at all.
                .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
            )
            self._policies[purpose] = (ExtensionPolicy.webpki_defaults_ca(), ee)
        return self._policies[purpose]

    def validate(
        self,
        cert: x509.Certificate,
        intermediates: Sequence[x509.Certificate] = (),
        *,
        purpose: Purpose = "emailProtection",
        at: _dt.datetime | None = None,
        domain: str | None = None,
    ) -> ChainResult:
        """Path-validate `cert` for `purpose` at time `at` (default now) and check revocation.

        `domain` is the mail domain the signature speaks for (the From's): an anchor scoped to
        other domains does not vouch for it (untrusted-ca), nor for a signature with no domain."""
        at = at or _dt.datetime.now(_dt.UTC)
        # Report the leaf's own validity with a precise code before the generic path search.
        if at < cert.not_valid_before_utc:
            return ChainResult(False, failure="not-yet-valid",
                               detail=f"certificate valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z")  # fmt: skip
        if at > cert.not_valid_after_utc:
            return ChainResult(False, failure="expired",
                               detail=f"certificate expired {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z")  # fmt: skip
        # The anchors (self._store) are fixed for the life of this store and CRLs are consulted
        # below on every call, so the leaf, the intermediates offered and the purpose are the key.
        key = (purpose, cert, *intermediates)
        path = self._cached_path(key, at)
        if path is None:
            ca_policy, ee_policy = self._extension_policies(purpose)
            builder = (
                PolicyBuilder()
                .store(self._store)
                .time(at)
                .max_chain_depth(MAX_CHAIN_DEPTH)
                .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
            )
            try:
                verified = builder.build_client_verifier().verify(cert, list(intermediates))
            except VerificationError as exc:
                text = str(exc)
                if "not valid at validation time" in text:
                    code = "expired"
                elif "extended key usage" in text or "key usage" in text:
                    code = "bad-key-usage"
                else:
                    code = "untrusted-ca"
                return ChainResult(False, failure=code, detail=_short(text))
            path = _Path(tuple(verified.chain),
                         tuple(str(n.value) for n in (verified.subjects or []) if isinstance(n, x509.RFC822Name)))  # fmt: skip
            self._remember_path(key, path)
        chain, emails, anchor = path.chain, path.emails, path.anchor
        allowed = self.scopes.get(chain[-1]) if purpose == "emailProtection" else None
        if allowed is not None and (domain or "").strip().lower().rstrip(".") not in allowed:
            return ChainResult(False, chain, anchor, None, "unavailable", "untrusted-ca",
                               f"anchor {anchor} is trusted only for {', '.join(sorted(allowed))}", emails)  # fmt: skip
        status, revoked_detail = self._revocation(chain, at)
        if status == "revoked":
            return ChainResult(False, chain, anchor, True, status, "revoked", revoked_detail, emails)
        failure = None
        if self.require_crl and status in ("stale", "unavailable"):
            failure = "crl-stale" if status == "stale" else "crl-unavailable"
        return ChainResult(failure is None, chain, anchor, False if status == "good" else None, status,
                           failure, revoked_detail, emails)  # fmt: skip

    def _cached_path(self, key: tuple[object, ...], at: _dt.datetime) -> _Path | None:
        """A path built earlier for exactly this leaf and these intermediates, if still fresh and
        if every certificate on it is within its validity period at `at`: the verifier would
        accept the same path at `at` (signatures, constraints and usages do not depend on time)."""
        with self._lock:
            hit = self._paths.get(key)
        if hit is None:
            return None
        expiry, path = hit
        if time.monotonic() >= expiry or not path.not_before <= at <= path.not_after:
            return None
        return path

    def _remember_path(self, key: tuple[object, ...], path: _Path) -> None:
        with self._lock:
            if len(self._paths) >= PATH_CACHE_SIZE:
                now = time.monotonic()
                for k in [k for k, (exp, _) in self._paths.items() if exp <= now]:
                    del self._paths[k]
                while len(self._paths) >= PATH_CACHE_SIZE:
                    del self._paths[next(iter(self._paths))]  # oldest first (insertion order)
            self._paths[key] = (time.monotonic() + PATH_CACHE_SECONDS, path)

    def _crl_signature_valid(self, crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
        with self._lock:
            entry = self._crl_sigs.get(id(crl))
            if entry is None or entry[0] is not crl:
                entry = self._crl_sigs[id(crl)] = (crl, {})
            known = entry[1].get(issuer)
        if known is not None:
            return known
        try:
            valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        except (TypeError, ValueError, InvalidSignature):
            valid = False
        with self._lock:
            entry[1][issuer] = valid
        return valid

    def _revocation(self, chain: Sequence[x509.Certificate], at: _dt.datetime) -> tuple[CrlStatus, str]:
        """Worst status over the non-anchor certificates of the chain: revoked > stale > unavailable > good."""
        rank = {"good": 0, "unavailable": 1, "stale": 2, "revoked": 3}
        worst: CrlStatus = "good"
        detail = ""
        for cert, issuer in pairwise(chain):
            status, why = self._status_one(cert, issuer, at)
            if rank[status] > rank[worst]:
                worst, detail = status, why
        return worst, detail

    def _status_one(
        self, cert: x509.Certificate, issuer: x509.Certificate, at: _dt.datetime
    ) -> tuple[CrlStatus, str]:
        best: CrlStatus = "unavailable"
        why = ""
        found = False
        for crl in self.crls:
            if crl.issuer != issuer.subject or not self._crl_signature_valid(crl, issuer):
                continue
            found = True
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                return (
                    "revoked",
                    f"serial {cert.serial_number:x} is on the CRL of {issuer.subject.rfc4514_string()}",
                )
            nxt = crl.next_update_utc
            fresh = (nxt is None or at <= nxt) and at - crl.last_update_utc <= self.crl_max_age
            if fresh:
                best = "good"
                why = ""
            elif best != "good":
                best, why = "stale", f"CRL of {issuer.subject.rfc4514_string()} is past its nextUpdate"
        if not found:
            why = f"no CRL from {_subject_text(issuer)}"
        return best, why


@dataclass(frozen=True)
class _Path:
    """A path the verifier accepted: leaf first, anchor last, and the leaf's rfc822Name SANs."""

    chain: tuple[x509.Certificate, ...]
    emails: tuple[str, ...]
    anchor: str = field(init=False)
    not_before: _dt.datetime = field(init=False)
    not_after: _dt.datetime = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor", _subject_text(self.chain[-1]))
        object.__setattr__(self, "not_before", max(c.not_valid_before_utc for c in self.chain))
        object.__setattr__(self, "not_after", min(c.not_valid_after_utc for c in self.chain))


@functools.lru_cache(maxsize=256)
def _subject_text(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _short(text: str, limit: int = 200) -> str:
    text = text.split(" (encountered processing")[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_pem_or_der_certs(data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)
    return [x509.load_der_x509_certificate(data)]


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def load_trust_store(
    anchor_paths: Iterable[Path],
    crl_paths: Iterable[Path] = (),
    *,
    crl_max_age: _dt.timedelta = DEFAULT_CRL_MAX_AGE,
    require_crl: bool = False,
) -> TrustStore:
    """Read anchors (PEM bundles or DER files; a directory means every *.pem/*.crt/*.cer/*.der in it) and CRLs."""
    anchors: list[x509.Certificate] = []
    for path in _expand(anchor_paths, ("*.pem", "*.crt", "*.cer", "*.der")):
        try:
            anchors.extend(_load_pem_or_der_certs(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise TrustStoreError(f"cannot load trust anchor {path}: {exc}") from exc
    crls: list[x509.CertificateRevocationList] = []
    for path in _expand(crl_paths, ("*.pem", "*.crl", "*.der")):
        try:
            crls.append(_load_crl(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise TrustStoreError(f"cannot load CRL {path}: {exc}") from exc
    return TrustStore(anchors, crls, crl_max_age=crl_max_age, require_crl=require_crl)


def _expand(paths: Iterable[Path], patterns: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for pat in patterns:
                out.extend(sorted(p.glob(pat)))
        else:
            out.append(p)
    return out
