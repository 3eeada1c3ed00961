"""OpenPGP protection of whole messages as PGP/MIME, through python-gnupg and the real `gpg`.

The job: the OpenPGP counterpart of smime.py for peers that use PGP.  `protect` wraps the whole
original message as message/rfc822, signs and encrypts it in one OpenPGP message (RFC 3156 §6.2,
combined method; RFC 4880/9580 packets produced by gpg) and puts it in multipart/encrypted
(RFC 3156 §4, RFC 1847 §2.2).  `open` decrypts and verifies with our keyring and checks that a
user ID of the signing key carries the inner From address.

Trust: the keyring under `home` (mode 0700) is curated by the operator's administrators from
the directory, so "key present in our keyring, not revoked or expired" is the trust decision;
gpg's web of trust is therefore turned off with `--trust-model always` for encryption and
verification.  Every call runs `gpg --batch --pinentry-mode loopback` as a subprocess (~10-20 ms
each): keep that cost in mind, it is measured in bench/bench_crypto.py.

Errors: `OpenPgpError` when gpg refuses an outbound operation (unknown key, no secret key,
gpg missing).  `open` never raises for bad input; its `SecurityResult.failure` is one of
malformed-cms (not PGP/MIME or unparsable), not-encrypted, decrypt-failed, not-signed,
unknown-key, bad-signature, expired, revoked, from-mismatch, too-large.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import gnupg

from gateway.crypto import _mime
from gateway.crypto.result import SecurityResult
from gateway.crypto.smime import DEFAULT_OUTER_SUBJECT, MAX_MESSAGE_SIZE, _outer_headers, _wrap_rfc822

__all__ = ["OpenPgp", "OpenPgpError"]


class OpenPgpError(RuntimeError):
    """gpg could not carry out an outbound operation (its status line is in the message)."""


class OpenPgp:
    """A gpg keyring directory and the operations mssgw needs on it."""

    def __init__(self, home: Path, *, passphrase: str | None = None, gpg_binary: str = "gpg") -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        self.passphrase = passphrase
        self._gpg = gnupg.GPG(gpgbinary=gpg_binary, gnupghome=str(self.home),
                              options=["--pinentry-mode", "loopback", "--trust-model", "always"])  # fmt: skip
        self._gpg.encoding = "utf-8"

    # ------------------------------------------------------------ key management

    def generate_key(self, address: str, name: str, *, key_length: int = 2048) -> str:
        """Create an RSA sign+encrypt key pair for `address`; returns its fingerprint (dev/test use)."""
        params: dict[str, Any] = {"key_type": "RSA", "key_length": key_length, "name_real": name,
                                  "name_email": address, "expire_date": "2y"}  # fmt: skip
        if self.passphrase:
            params["passphrase"] = self.passphrase
        else:
            params["no_protection"] = True
        result = self._gpg.gen_key(self._gpg.gen_key_input(**params))
        if not result.fingerprint:
            raise OpenPgpError(f"gpg key generation failed: {result.status or result.stderr[-200:]}")
        return str(result.fingerprint)

    def import_key(self, armored: str | bytes) -> list[str]:
        result = self._gpg.import_keys(armored)
        return [str(f) for f in result.fingerprints]

    def list_keys(self, *, secret: bool = False) -> list[dict[str, Any]]:
        return list(self._gpg.list_keys(secret=secret))

    def export_public(self, fingerprint: str) -> str:
        data = self._gpg.export_keys(fingerprint, armor=True)
        if not data:
            raise OpenPgpError(f"no public key {fingerprint}")
        return str(data)

    def delete(self, fingerprint: str) -> None:
        """Remove a key (secret part first, if any) from the keyring."""
        if any(k["fingerprint"] == fingerprint for k in self.list_keys(secret=True)):
            self._gpg.delete_keys(fingerprint, secret=True, passphrase=self.passphrase or "",
                                  expect_passphrase=bool(self.passphrase))  # fmt: skip
        result = self._gpg.delete_keys(fingerprint)
        if str(result) != "ok":
            raise OpenPgpError(f"cannot delete key {fingerprint}: {result}")

    def revoke(self, fingerprint: str) -> None:
        """Revoke our own key with the revocation certificate gpg made at generation time."""
        rev = self.home / "openpgp-revocs.d" / f"{fingerprint}.rev"
        try:
            text = rev.read_text()
        except OSError as exc:
            raise OpenPgpError(f"no revocation certificate for {fingerprint}") from exc
        # gpg protects the stored certificate against accidental import with a leading ':'.
        cert = text.replace(":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----")
        self._gpg.import_keys(cert)

    def _key_emails(self, fingerprint: str) -> tuple[tuple[str, ...], str | None]:
        for k in self._gpg.list_keys(keys=[fingerprint]):
            emails = tuple(a.lower() for uid in k.get("uids", []) for _, a in getaddresses([uid]) if "@" in a)
            return emails, k.get("trust")
        return (), None

    def close(self) -> None:
        """Stop the gpg-agent serving this keyring (started on demand by gpg)."""
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
                       capture_output=True, check=False)  # fmt: skip

    # ------------------------------------------------------------ messages

    def protect(
        self,
        message_bytes: bytes,
        signer_fpr: str,
        recipient_fprs: Sequence[str],
        *,
        encrypt_for_sender: bool = True,
        outer_subject: str = DEFAULT_OUTER_SUBJECT,
        outer_headers: Mapping[str, str] | None = None,
        max_size: int = MAX_MESSAGE_SIZE,
    ) -> bytes:
        """Sign+encrypt the whole message as PGP/MIME multipart/encrypted; return the outer message."""
        if not recipient_fprs:
            raise OpenPgpError("no recipient key to encrypt for")
        if len(message_bytes) > max_size:
            raise OpenPgpError(f"message exceeds the {max_size}-byte limit")
        message = _mime.to_crlf(message_bytes)
        headers = _outer_headers(message, outer_subject, outer_headers)
        recipients = [*recipient_fprs, signer_fpr] if encrypt_for_sender else list(recipient_fprs)
        enc = self._gpg.encrypt(_wrap_rfc822(message), list(dict.fromkeys(recipients)), sign=signer_fpr,
                                always_trust=True, armor=True, passphrase=self.passphrase)  # fmt: skip
        if not enc.ok:
            raise OpenPgpError(f"gpg could not sign and encrypt: {enc.status}")
        armored = _mime.to_crlf(enc.data)
        b = _mime.new_boundary(armored).encode()
        return headers + b"".join(
            [
                b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n boundary="', b,
                b'"\r\n\r\nThis is an OpenPGP/MIME encrypted message (RFC 3156).\r\n--', b, b"\r\n",
                b"Content-Type: application/pgp-encrypted\r\nContent-Description: PGP/MIME version identification"
                b"\r\n\r\nVersion: 1\r\n\r\n--", b, b"\r\n",
                b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
                b'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n', armored, b"\r\n--", b, b"--\r\n",
            ]
        )  # fmt: skip

    def open(self, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> tuple[bytes | None, SecurityResult]:
        """Decrypt and verify a PGP/MIME message; (inner message or None, result)."""
        result = SecurityResult(method="pgp")
        if len(data) > max_size:
            return None, result.with_failure(
                "too-large", f"{len(data)} bytes exceeds the {max_size}-byte limit"
            )
        try:
            block, body = _mime.split_entity(data)
            fields = _mime.parse_headers(block)
            mtype, params = _mime.content_type(_mime.header_value(fields, "content-type"))
            if mtype != "multipart/encrypted":
                return None, result.with_failure(
                    "not-encrypted", "message is not PGP/MIME multipart/encrypted"
                )
            if params.get("protocol", "").lower() != "application/pgp-encrypted":
                return None, result.with_failure("malformed-cms", "multipart/encrypted with another protocol")
            parts = _mime.split_multipart(body, params.get("boundary", ""))
            if len(parts) != 2:
                return None, result.with_failure(
                    "malformed-cms", f"multipart/encrypted with {len(parts)} parts"
                )
            armored = _mime.split_entity(parts[1])[1]
        except ValueError as exc:
            return None, result.with_failure(
                "malformed-cms", f"unparsable PGP/MIME ({exc.__class__.__name__})"
            )
        dec = self._gpg.decrypt(armored, passphrase=self.passphrase, always_trust=True)
        if not dec.ok:
            status = str(dec.status or "")
            code = "malformed-cms" if "no data" in status or not status else "decrypt-failed"
            return None, result.with_failure(code, f"gpg: {status or 'no OpenPGP data'}")
        content = bytes(dec.data)
        result = result.evolve(encrypted=True, decrypted_ok=True, content_algorithm="openpgp")
        inner = _unwrap(content)
        from_addr = _mime.first_address(
            _mime.header_value(_mime.parse_headers(_mime.split_entity(inner)[0]), "from")
        )
        result = result.evolve(from_address=from_addr)
        problems = {str(p.get("status", "")) for p in getattr(dec, "problems", [])}
        key_status = str(getattr(dec, "key_status", "") or "")
        if not dec.valid and not problems and not key_status and not dec.signature_id:
            return inner, result.with_failure("not-signed", "message is encrypted but not signed")
        signer = str(dec.pubkey_fingerprint or dec.fingerprint or "") or None
        if not dec.valid:
            if "no public key" in problems:
                return inner, result.with_failure("unknown-key", f"signing key {dec.key_id} is not in our keyring",
                                                  signed=True)  # fmt: skip
            if "revoked" in key_status:
                code = "revoked"
            elif "expired" in key_status or "signature expired" in problems:
                code = "expired"
            else:
                code = "bad-signature"
            return None if code == "bad-signature" else inner, result.with_failure(
                code,
                f"gpg: {key_status or ', '.join(sorted(problems)) or 'invalid signature'}",
                signed=True,
                signer_fingerprint=signer,
                revoked=code == "revoked",
            )
        emails, _trust = self._key_emails(signer or "")
        matches = from_addr is not None and from_addr in emails
        result = result.evolve(
            signed=True, signature_valid=True, chain_valid=True, trust_anchor="keyring", revoked=False,
            signer_fingerprint=signer, signer_email=emails[0] if emails else None, signer_emails=emails,
            signer_subject=str(dec.username or "") or None, from_matches_signer=matches,
        )  # fmt: skip
        if not matches:
            result = result.with_failure(
                "from-mismatch", f"From {from_addr or '(none)'} is not a user ID of the key"
            )
        return inner, result


def _unwrap(content: bytes) -> bytes:
    block, body = _mime.split_entity(content)
    mtype, _ = _mime.content_type(_mime.header_value(_mime.parse_headers(block), "content-type"))
    return body if mtype == "message/rfc822" else content
