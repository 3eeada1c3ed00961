"""The outcome of opening a protected message: what was checked, what held, and why not.

The job: one immutable value that the inbound pipeline, the audit trail and the
Authentication-Results header (RFC 8601 syntax; the `smime` / `pgp` method names follow the
registry practice of RFC 7001 §2.7) all read the same way.  It never carries message content,
only identities, algorithms and verdicts.

Failure codes (`SecurityResult.failure`, exactly one, the first problem found):
    malformed-cms, too-large, not-encrypted, wrong-recipient, decrypt-failed, weak-cipher,
    not-signed, weak-digest, tampered-content, bad-signed-attributes, no-signer-certificate,
    untrusted-ca, expired, not-yet-valid, bad-key-usage, revoked, crl-unavailable, crl-stale,
    from-mismatch, bad-signature (OpenPGP), unknown-key (OpenPGP).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = ["FAILURE_CODES", "CrlStatus", "SecurityResult"]

CrlStatus = Literal["good", "revoked", "stale", "unavailable"]

FAILURE_CODES: frozenset[str] = frozenset(
    {
        "malformed-cms",
        "too-large",
        "not-encrypted",
        "wrong-recipient",
        "decrypt-failed",
        "weak-cipher",
        "not-signed",
        "weak-digest",
        "tampered-content",
        "bad-signed-attributes",
        "no-signer-certificate",
        "untrusted-ca",
        "expired",
        "not-yet-valid",
        "bad-key-usage",
        "revoked",
        "crl-unavailable",
        "crl-stale",
        "from-mismatch",
        "bad-signature",
        "unknown-key",
    }
)


def _quote(value: str) -> str:
    """RFC 8601 `value` as a quoted-string (RFC 5322 §3.2.4), with CR/LF removed."""
    cleaned = value.replace("\r", " ").replace("\n", " ").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{cleaned}"'


@dataclass(frozen=True, slots=True)
class SecurityResult:
    """Verdict on one message.  Build with keywords; use `with_failure` to record the first failure."""

    method: Literal["smime", "pgp"] = "smime"
    encrypted: bool = False
    decrypted_ok: bool = False
    encryption_required: bool = True
    content_algorithm: str | None = None
    key_transport: str | None = None
    signed: bool = False
    signature_valid: bool = False
    signer_email: str | None = None
    signer_emails: tuple[str, ...] = ()
    signer_subject: str | None = None
    signer_fingerprint: str | None = None
    chain_valid: bool = False
    trust_anchor: str | None = None
    revoked: bool | None = None
    crl_status: CrlStatus | None = None
    from_address: str | None = None
    from_matches_signer: bool | None = None
    digest_algorithm: str | None = None
    signature_algorithm: str | None = None
    failure: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.failure is not None and self.failure not in FAILURE_CODES:
            raise ValueError(f"unknown failure code {self.failure!r}")

    def with_failure(self, failure: str, detail: str, **changes: Any) -> SecurityResult:
        """Return a copy recording `failure` (kept if one is already recorded: the first one wins)."""
        if self.failure is not None:
            return replace(self, **changes)
        return replace(self, failure=failure, detail=detail, **changes)

    def evolve(self, **changes: Any) -> SecurityResult:
        return replace(self, **changes)

    @property
    def ok(self) -> bool:
        """Decrypted (when required), signed, signature valid, chain trusted, not revoked, From matches."""
        return (
            self.failure is None
            and (self.decrypted_ok or not self.encryption_required)
            and self.signed
            and self.signature_valid
            and self.chain_valid
            and self.revoked is not True
            and self.from_matches_signer is True
        )

    @property
    def verdict(self) -> Literal["pass", "fail", "none"]:
        if self.ok:
            return "pass"
        if not self.signed and not self.encrypted and self.failure in (None, "not-signed", "not-encrypted"):
            return "none"
        return "fail"

    def auth_results_header(self, authserv_id: str) -> str:
        """Value for an Authentication-Results header, e.g.
        `mx.a.test; smime=pass header.from=dr@a.test policy.signer="CN=..."`."""
        parts = [f"{self.method}={self.verdict}"]
        if self.failure:
            parts.append(f"reason={_quote(self.failure + (': ' + self.detail if self.detail else ''))}")
        if self.from_address:
            parts.append(f"header.from={self.from_address}")
        if self.signer_email:
            parts.append(
                f"header.s={self.signer_email}"
                if self.method == "pgp"
                else f"smime.signer={self.signer_email}"
            )
        if self.signer_subject:
            parts.append(f"policy.signer={_quote(self.signer_subject)}")
        if self.signer_fingerprint:
            parts.append(f"policy.fingerprint={self.signer_fingerprint}")
        if self.crl_status:
            parts.append(f"policy.crl={self.crl_status}")
        return f"{authserv_id}; " + " ".join(parts)

    def audit_fields(self) -> dict[str, Any]:
        """Flat dictionary for the audit trail: identities, algorithms, verdicts, never content."""
        data = asdict(self)
        data["signer_emails"] = list(self.signer_emails)
        data["ok"] = self.ok
        return data
