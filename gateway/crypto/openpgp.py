"""OpenPGP protection of whole messages as PGP/MIME, through python-gnupg and the real `gpg`.

The job: the OpenPGP counterpart of smime.py for peers that use PGP.  `protect` wraps the whole
original message as message/rfc822, signs and encrypts it in one OpenPGP message (RFC 3156 §6.2,
combined method; RFC 4880/9580 packets produced by gpg) and puts it in multipart/encrypted
(RFC 3156 §4, RFC 1847 §2.2).  `open` decrypts and verifies with our keyring and checks that a
user ID of the signing key carries the From address.  It reads PGP/MIME as mail clients write it:
§6.2 (signed and encrypted in one OpenPGP message) and §6.1 (multipart/signed inside the
encryption), around a message/rfc822 wrapper or a plain MIME body; with a plain body, the outer
header gives the From (and the rest of the header) unless the protected entity carries its own
(Thunderbird's protected headers).

Trust: the keyring under `home` (mode 0700) is curated by the operator's administrators from
the directory (each node's home is kept in step with the directory's rows by the hook
`keep_in_step` registers, run before every `protect` and `open`: `gateway.crypto.keyring`),
so "key present in our keyring, not revoked or expired" is the trust decision;
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
import tempfile
from collections.abc import Callable, Mapping, Sequence
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import gnupg

from gateway.core.errors import CryptoError
from gateway.crypto import _mime
from gateway.crypto.result import SecurityResult
from gateway.crypto.smime import DEFAULT_OUTER_SUBJECT, MAX_MESSAGE_SIZE, _outer_headers, _wrap_rfc822

__all__ = ["OpenPgp", "OpenPgpError", "keep_in_step"]

#: Per GnuPG home: what brings it in step with the directory before each use (``keep_in_step``).
_IN_STEP: dict[str, Callable[[OpenPgp], None]] = {}


def keep_in_step(home: Path, sync: Callable[[OpenPgp], None] | None) -> None:
    """Run ``sync(ring)`` before every ``protect``/``open`` on the keyring at ``home`` (None: stop).

    The pipeline makes its ``OpenPgp`` objects itself; the key store of the same process
    registers here, once, the directory-backed ``gateway.crypto.keyring.KeyringSync``."""
    key = str(Path(home).resolve())
    if sync is None:
        _IN_STEP.pop(key, None)
    else:
        _IN_STEP[key] = sync


#: gpg-agent's smallest S2K iteration count: enough for a passphrase of 256 random bits.
AGENT_S2K_COUNT = 65536


class OpenPgpError(CryptoError, RuntimeError):
    """gpg could not carry out an outbound operation (its status line is in the message)."""


class OpenPgp:
    """A gpg keyring directory and the operations mssgw needs on it."""

    def __init__(self, home: Path, *, passphrase: str | None = None, gpg_binary: str = "gpg") -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        agent_conf = self.home / "gpg-agent.conf"
        if not agent_conf.exists():
            # Our secret keys are protected with the keyring passphrase, 256 random bits: stretching it
            # (gpg-agent's calibrated S2K count costs ~100-350 ms of CPU at every signature and
            # decryption) adds nothing, so the agent protects keys with the smallest count.
            agent_conf.write_text(f"s2k-count {AGENT_S2K_COUNT}\n", encoding="ascii")
        self.passphrase = passphrase
        self._gpg = gnupg.GPG(gpgbinary=gpg_binary, gnupghome=str(self.home),
                              options=["--pinentry-mode", "loopback", "--trust-model", "always"])  # fmt: skip
        self._gpg.encoding = "utf-8"

    def _in_step(self) -> None:
        sync = _IN_STEP.get(str(self.home.resolve()))
        if sync is not None:
            sync(self)

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

    def export_secret(self, fingerprint: str) -> str:
        """Our key pair, armored with its secret part (sealed in the database, never printed)."""
        data = self._gpg.export_keys(fingerprint, secret=True, armor=True, passphrase=self.passphrase or "",
                                     expect_passphrase=bool(self.passphrase))  # fmt: skip
        if not data or "PRIVATE KEY BLOCK" not in str(data):
            raise OpenPgpError(f"no secret key {fingerprint}")
        return str(data)

    def revocation_certificate(self, fingerprint: str) -> str | None:
        """The revocation certificate gpg made when it generated our key pair, if this home has it."""
        try:
            return (self.home / "openpgp-revocs.d" / f"{fingerprint}.rev").read_text()
        except OSError:
            return None

    def forget_revocation_certificate(self, fingerprint: str) -> None:
        """Remove gpg's copy of the revocation certificate (anyone holding it can revoke the key):
        once sealed in the database, no node keeps it in a file."""
        (self.home / "openpgp-revocs.d" / f"{fingerprint}.rev").unlink(missing_ok=True)

    def protect_secret_key(self, fingerprint: str) -> None:
        """Protect a secret key in this home with ``self.passphrase`` (gpg's own key protection, so
        that ``private-keys-v1.d`` never holds a key in clear); a key already protected with it is
        left as it is.  The passphrase goes to gpg on a pipe, never on its command line."""
        if not self.passphrase:
            raise OpenPgpError("no passphrase to protect the secret key with")
        done = subprocess.run(
            [self._gpg.gpgbinary, "--homedir", str(self.home), "--batch", "--pinentry-mode", "loopback",
             "--passphrase-fd", "0", "--passwd", fingerprint],
            input=(self.passphrase + "\n").encode("utf-8"), capture_output=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise OpenPgpError(f"gpg could not protect secret key {fingerprint} (exit {done.returncode})")

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

    def revoke(self, fingerprint: str, certificate: str | None = None) -> None:
        """Revoke our own key with the revocation certificate gpg made at generation time
        (``certificate``, kept sealed in the directory; else the one in this home)."""
        text = certificate or self.revocation_certificate(fingerprint)
        if text is None:
            raise OpenPgpError(f"no revocation certificate for {fingerprint}")
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
        self._in_step()
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
        """Decrypt and verify a PGP/MIME message; (inner message or None, result).

        Both signed-and-encrypted forms of RFC 3156 §6 are read: §6.2 (one OpenPGP message that
        is signed and encrypted, what `gpg --sign --encrypt`, Enigmail and Thunderbird send) and
        §6.1 (a multipart/signed entity, RFC 3156 §5, inside the encryption).  The protected
        entity may be a message/rfc822 wrapper (ours) or a plain MIME body (mail clients); see
        `_compose` for how the delivered message is rebuilt from it."""
        result = SecurityResult(method="pgp")
        self._in_step()
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
        # A compressed OpenPGP message can inflate a thousandfold: gpg stops writing at the limit.
        dec = self._gpg.decrypt(armored, passphrase=self.passphrase, always_trust=True,
                                extra_args=["--max-output", str(max_size)])  # fmt: skip
        if "exceeded --max-output limit" in str(dec.stderr or ""):
            return None, result.with_failure("too-large", f"decrypted content exceeds the {max_size}-byte limit")
        if not dec.ok:
            status = str(dec.status or "")
            code = "malformed-cms" if "no data" in status or not status else "decrypt-failed"
            return None, result.with_failure(code, f"gpg: {status or 'no OpenPGP data'}")
        # RFC 3156 §5: signed data is canonical (CRLF); clients on Unix may encrypt LF-only text.
        content = _mime.to_crlf(bytes(dec.data))
        result = result.evolve(encrypted=True, decrypted_ok=True, content_algorithm="openpgp")
        signature: gnupg.Verify = dec
        entity = content
        if not _signature_seen(dec):
            try:
                detached = _detached_signature(content)
            except ValueError as exc:
                return None, result.with_failure(
                    "malformed-cms", f"unparsable decrypted entity ({exc.__class__.__name__})"
                )
            if detached is not None:  # §6.1: multipart/signed inside multipart/encrypted
                entity, sig_armored = detached
                signature = self._verify_detached(entity, sig_armored)
        try:
            inner = _compose(entity, fields)
            from_addr = _mime.first_address(
                _mime.header_value(_mime.parse_headers(_mime.header_block(inner)), "from")
            )
        except ValueError as exc:
            return None, result.with_failure(
                "malformed-cms", f"unparsable decrypted entity ({exc.__class__.__name__})"
            )
        result = result.evolve(from_address=from_addr)
        if not _signature_seen(signature):
            return inner, result.with_failure("not-signed", "message is encrypted but not signed")
        return self._judge(signature, inner, from_addr, result)

    def _verify_detached(self, signed: bytes, sig_armored: bytes) -> gnupg.Verify:
        """gpg --verify of a detached signature (RFC 3156 §5) over the exact bytes of the signed part."""
        fd, path = tempfile.mkstemp(prefix="sig-", suffix=".asc", dir=self.home)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(sig_armored)
            return self._gpg.verify_data(path, signed)
        finally:
            os.unlink(path)

    def _judge(self, sig: gnupg.Verify, inner: bytes, from_addr: str | None,
               result: SecurityResult) -> tuple[bytes | None, SecurityResult]:  # fmt: skip
        """The verdict on a signature gpg has checked, and on the From it vouches for."""
        problems = {str(p.get("status", "")) for p in sig.problems} & _SIGNATURE_PROBLEMS
        key_status = str(sig.key_status or "")
        signer = str(sig.pubkey_fingerprint or sig.fingerprint or "") or None
        if not sig.valid:
            if "no public key" in problems:
                return inner, result.with_failure("unknown-key", f"signing key {sig.key_id} is not in our keyring",
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
            signer_subject=str(sig.username or "") or None, from_matches_signer=matches,
        )  # fmt: skip
        if not matches:
            result = result.with_failure(
                "from-mismatch", f"From {from_addr or '(none)'} is not a user ID of the key"
            )
        return inner, result


# Verification problems python-gnupg collects; NO_SECKEY ("no secret key") is not one of them:
# gpg says it while decrypting, for every other recipient the message was encrypted to.
_SIGNATURE_PROBLEMS = frozenset({"signature bad", "signature error", "signature expired", "no public key",
                                 "signing key has expired", "signing key was revoked"})  # fmt: skip

# Header fields describing the outer multipart/encrypted body, never carried over to the content.
_MIME_FIELDS = ("content-", "mime-version")


def _signature_seen(sig: gnupg.Verify) -> bool:
    """Did gpg meet a signature at all (good, bad, or by a key it lacks)?"""
    if sig.valid or sig.signature_id or sig.key_status:
        return True
    return any(str(p.get("status", "")) in _SIGNATURE_PROBLEMS for p in sig.problems)


def _detached_signature(content: bytes) -> tuple[bytes, bytes] | None:
    """(signed part, armored signature) when `content` is RFC 3156 §5 multipart/signed, else None.

    The signed part is byte-exact: from the line after the first delimiter up to, not including,
    the CRLF before the next one (RFC 1847 §2.1, RFC 2046 §5.1.1)."""
    block, body = _mime.split_entity(content)
    mtype, params = _mime.content_type(_mime.header_value(_mime.parse_headers(block), "content-type"))
    if mtype != "multipart/signed" or params.get("protocol", "").lower() != "application/pgp-signature":
        return None
    parts = _mime.split_multipart(body, params.get("boundary", ""))
    if len(parts) != 2:
        raise _mime.MimeError(f"multipart/signed with {len(parts)} parts")
    sig_block, sig_body = _mime.split_entity(parts[1])
    sig_type, _ = _mime.content_type(_mime.header_value(_mime.parse_headers(sig_block), "content-type"))
    if sig_type != "application/pgp-signature":
        raise _mime.MimeError("second part of multipart/signed is not application/pgp-signature")
    return parts[0], sig_body


def _compose(entity: bytes, outer_fields: list[tuple[str, str, bytes]]) -> bytes:
    """The message to deliver, from the protected entity and the outer (unprotected) header.

    - message/rfc822 (our wrapper, RFC 3156 §6.2 over a whole message): the wrapped message.
    - A plain MIME body (Enigmail, Thunderbird, `gpg` on a MIME part): the outer header fields
      give From, To, Subject, Date, Message-ID...; fields the protected entity carries itself
      (its Content-* fields, and Thunderbird's protected headers, `protected-headers="v1"`,
      such as a signed From or the real Subject) replace the outer ones.

    Only the outer From is unprotected here, and it is accepted only when it names a user ID of
    the key that signed the content, exactly like a From carried inside."""
    block, body = _mime.split_entity(entity)
    fields = _mime.parse_headers(block)
    mtype, _ = _mime.content_type(_mime.header_value(fields, "content-type"))
    if mtype == "message/rfc822":
        block, body = _mime.split_entity(body)
        fields = _mime.parse_headers(block)
        if _mime.header_value(fields, "from") is not None:
            return _unwrap(entity)
    own = {name for name, _, _ in fields}
    carried = [raw for name, _, raw in outer_fields if not name.startswith(_MIME_FIELDS) and name not in own]
    inner = [raw if raw.endswith(b"\n") else raw + b"\r\n" for _, _, raw in fields]
    if "mime-version" not in own:
        inner.insert(0, b"MIME-Version: 1.0\r\n")
    return _mime.to_crlf(b"".join(carried) + b"".join(inner) + b"\r\n" + body)


def _unwrap(content: bytes) -> bytes:
    block, body = _mime.split_entity(content)
    mtype, _ = _mime.content_type(_mime.header_value(_mime.parse_headers(block), "content-type"))
    return body if mtype == "message/rfc822" else content
