"""Keep patients' INS out of the audit trail and the logs: their mailbox addresses are pseudonymised.

The national patient messaging (Mon Espace Santé) gives each patient the address
``<INS>@patient.mssante.fr`` (Référentiel socle MSSanté #2, 3.4.2.3), so a recipient address is
itself a national health identifier. Wherever such an address would be recorded (audit
fields, log lines), it becomes ``ins-<16 hex>@patient.mssante.fr``: an HMAC-SHA-256 of the INS
under a salt, the same for one patient while the salt stays, so an auditor can follow one
patient's messages without the number. The salt is per process unless ``set_salt`` gives a
persistent one (an operator's secret); without the salt the pseudonym reveals nothing.

``install_log_redaction`` makes every log record pass through ``redact`` (a log record
factory: it sees every logger, including libraries' ones such as aiosmtpd's ``mail.log``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from pathlib import Path
from typing import Any

PATIENT_DOMAIN = "patient.mssante.fr"
#: Any local part at the patient domain: an INS, but also a NIR without its key, a name, or anything
#: else someone typed there is about a patient (never kept in clear); a pseudonym is left as it is.
PATIENT_ADDRESS = re.compile(
    r"(?<![^\s<>\"'(),;:=\[\]])(?!ins-[0-9a-f]{16}@)([^\s<>@\"'(),;:=\[\]]{1,64})@patient\.mssante\.fr\b", re.I)

_salt = os.urandom(32)


def set_salt(salt: bytes) -> None:
    """Use ``salt`` (an operator's persistent secret) so pseudonyms stay the same across restarts."""
    global _salt
    _salt = bytes(salt)


def load_or_create_salt(path: Path) -> bytes:
    """The operator's pseudonym salt (32 random bytes, mode 0600), made on first use."""
    try:
        salt = path.read_bytes()
        if len(salt) >= 16:
            return salt
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(salt)
        out.flush()
        os.fsync(out.fileno())
    return salt


def pseudonym(nir: str) -> str:
    """``ins-`` and 16 hex digits of HMAC-SHA-256(salt, NIR)."""
    return "ins-" + hmac.new(_salt, nir.upper().encode("ascii", "replace"), hashlib.sha256).hexdigest()[:16]


def redact(text: str) -> str:
    """``text`` with every patient mailbox address pseudonymised (cheap when there is none)."""
    if "patient.mssante.fr" not in text.lower():
        return text
    return PATIENT_ADDRESS.sub(lambda m: f"{pseudonym(m.group(1))}@{PATIENT_DOMAIN}", text)


def redact_value(value: Any) -> Any:
    """``redact`` applied through strings, lists and dicts (audit ``detail``)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


_installed = False


def install_log_redaction() -> None:
    """Route every log record's message through ``redact`` (idempotent)."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return record
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
