"""The outcome of opening a protected message: what was checked, what held, and why not.

The job: one immutable value that the inbound pipeline, the audit trail and the
Authentication-Results header all read the same way.  It never carries message content, only
identities, algorithms and verdicts.

Authentication-Results (RFC 8601) uses registered names only: the `smime` method of RFC 7281
with its registered `body.smime-identifier`, `body.smime-serial` and `body.smime-issuer`
properties (serial and issuer together or not at all, RFC 7281 §3.2.3); OpenPGP has no
registered method, so it is the unregistered `x-pgp` (readers skip methods they do not know)
with `header.from`, the address checked against the key's user IDs.  No DKIM property appears.
A signed message accepted without encryption because a verified peer operator carried it over
pinned mutual TLS (the MSSanté mode) also gets the transport's result, the unregistered
`x-peer-tls=pass policy.peer-operator=<domain>`, and a comment saying it was not encrypted end
to end.
What has no registered property (the signer's subject, fingerprint, CRL state, the From that
was checked) goes in a comment, which every reader skips.  Results are those of RFC 7281 §3:
pass; policy (the signature verifies but our policy refuses its algorithm, key usage, stale CRL
or the From it vouches for); temperror (revocation could not be checked now); permerror (too
large: refused unread); none (not signed); fail for the rest (altered, unverifiable,
untrusted, expired or revoked signer, undecryptable or not for our keys, which is also what an
altered encryption layer looks like).

Failure codes (`SecurityResult.failure`, exactly one, the first problem found):
    malformed-cms, too-large, not-encrypted, wrong-recipient, decrypt-failed, weak-cipher,
    not-signed, weak-digest, tampered-content, bad-signed-attributes, no-signer-certificate,
    untrusted-ca, expired, not-yet-valid, bad-key-usage, revoked, crl-unavailable, crl-stale,
    from-mismatch, bad-signature (OpenPGP), unknown-key (OpenPGP).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = ["AUTH_METHODS", "FAILURE_CODES", "CrlStatus", "SecurityResult", "pvalue"]

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


# Method names written in Authentication-Results for SecurityResult.method.
AUTH_METHODS: dict[str, str] = {"smime": "smime", "pgp": "x-pgp"}

# A signature that verifies but that our policy does not accept (algorithm, key use, the From it
# vouches for, a CRL past its update time); everything else that is wrong is "fail".
_POLICY_FAILURES = frozenset({"weak-cipher", "weak-digest", "bad-key-usage", "from-mismatch", "crl-stale"})
_PERMANENT_ERRORS = frozenset({"too-large"})  # refused unread: nothing could be checked, ever
_TEMPORARY_ERRORS = frozenset({"crl-unavailable"})
_DOT_ATOM_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                               r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")  # fmt: skip
_HEX = re.compile(r"[0-9A-Fa-f]+")


def _ascii(value: str) -> str:
    """Printable US-ASCII only (header fields without RFC 6532): accents dropped, the rest '?'."""
    flat = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")
    return "".join(ch if " " <= ch <= "~" else "?" for ch in flat)


def _quote(value: str) -> str:
    """RFC 8601 `value` as a quoted-string (RFC 5322 §3.2.4), with CR/LF removed."""
    cleaned = _ascii(value.replace("\r", " ").replace("\n", " ")).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{cleaned}"'


_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")


def pvalue(value: str) -> str:
    """An RFC 8601 pvalue: the value as it is when it is a token or a domain, else a quoted-string."""
    return value if _TOKEN.fullmatch(value) else _quote(value)


def _comment(items: list[str]) -> str:
    """An RFC 5322 §3.2.2 comment: parentheses and backslashes quoted, ASCII only."""
    text = "; ".join(_ascii(i.replace("\r", " ").replace("\n", " ")) for i in items)
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


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
    signer_serial: str | None = None  # hexadecimal certificate serial number (S/MIME)
    signer_issuer: str | None = None  # the certificate issuer's DN, RFC 4514 (S/MIME)
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
    # The verified peer operator (its trust-list domain) whose pinned mutual TLS carried a message
    # accepted signed but not encrypted (MSSanté mode, ``directory.facts.signed_only_accepted``).
    transport_peer: str | None = None

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

    @property
    def auth_result(self) -> str:
        """The RFC 8601 / RFC 7281 result keyword for this verdict."""
        if self.ok:
            return "pass"
        if self.failure in _TEMPORARY_ERRORS:
            return "temperror"
        if self.failure in _PERMANENT_ERRORS:
            return "permerror"
        if not self.signed and self.failure in (None, "not-signed", "not-encrypted"):
            return "none"
        if self.failure in _POLICY_FAILURES and self.signature_valid:
            return "policy"
        return "fail"

    def auth_results_header(self, authserv_id: str) -> str:
        """Value for an Authentication-Results header (RFC 8601), e.g.
        `mx.b.test; smime=pass body.smime-identifier=dr@a.test (from dr@a.test; ...)`.

        Quoted values come last in a result: some readers (the `authres` package) take a
        quoted-string only at the end of a resinfo."""
        method = AUTH_METHODS[self.method]
        parts = [f"{method}={self.auth_result}"]
        if self.failure:
            parts.append(f"reason={_quote(self.failure + (': ' + self.detail if self.detail else ''))}")
        notes: list[str] = []
        if self.method == "smime":
            if self.signer_email and _DOT_ATOM_ADDRESS.fullmatch(self.signer_email):
                parts.append(f"body.smime-identifier={self.signer_email}")
            if self.from_address:
                notes.append(f"from {self.from_address}")
        elif self.from_address and _DOT_ATOM_ADDRESS.fullmatch(self.from_address):
            parts.append(f"header.from={self.from_address}")
        if self.signer_subject:
            notes.append(f"signer {self.signer_subject}")
        if self.signer_fingerprint:
            notes.append(f"{'key' if self.method == 'pgp' else 'sha256'} {self.signer_fingerprint}")
        if self.crl_status:
            notes.append(f"crl {self.crl_status}")
        if self.transport_peer and not self.encrypted:
            notes.append("signed, not encrypted end to end")
        if notes:
            parts.append(_comment(notes))
        if self.method == "smime" and self.signer_serial and self.signer_issuer and _HEX.fullmatch(self.signer_serial):
            parts += [f"body.smime-serial={self.signer_serial}", f"body.smime-issuer={_quote(self.signer_issuer)}"]
        value = f"{authserv_id}; " + " ".join(parts)
        if self.transport_peer:  # the transport's own result: mutual TLS with the pinned operator
            value += f"; x-peer-tls=pass policy.peer-operator={pvalue(self.transport_peer)}"
        return value

    def audit_fields(self) -> dict[str, Any]:
        """Flat dictionary for the audit trail: identities, algorithms, verdicts, never content."""
        data = asdict(self)
        data["signer_emails"] = list(self.signer_emails)
        data["ok"] = self.ok
        return data
