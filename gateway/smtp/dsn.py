"""The DSN extension's SMTP parameters (RFC 3461): read, checked and taken out of MAIL and RCPT lines.

A listener that offers ``DSN`` in its EHLO answer accepts ``ENVID`` and ``RET`` on MAIL FROM
(RFC 3461 §4.3, §4.4) and ``NOTIFY`` and ``ORCPT`` on RCPT TO (§4.1, §4.2).  ``take_params``
removes them from the command's argument, so that aiosmtpd, which knows none of them, sees only
the parameters it handles; what was found (or why it is refused) is given to the handler's hook.

Values are kept decoded from xtext (§4): the DSN writes them in its ``Original-Envelope-Id`` and
``Original-Recipient`` fields (RFC 3464 §2.2.1, §2.3.1).  A decoded value is printable US-ASCII
only, so nothing a client sent can break a header line.

Errors: ``DsnSyntaxError`` with a reason a person can read, answered 501 5.5.4 by the handler:
a malformed xtext, an unknown RET or NOTIFY keyword, NEVER combined with another keyword, a value
too long (ENVID 100 characters, ORCPT 500, §4.2 and §4.4) or a parameter given twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAIL_PARAMS", "NOTIFY_KEYWORDS", "RCPT_PARAMS", "DsnSyntaxError", "MailDsn", "RcptDsn",
           "parse_mail", "parse_rcpt", "take_params", "xtext_decode"]

#: RFC 3461 §4.4: "the ENVID parameter MUST NOT exceed 100 characters".
MAX_ENVID = 100
#: RFC 3461 §4.2: the ORCPT parameter (address type, ";" and the xtext) at most 500 characters.
MAX_ORCPT = 500
MAIL_PARAMS = frozenset({"ENVID", "RET"})
RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})
#: The order NOTIFY values are stored in (RFC 3461 §4.1).
NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")

# RFC 3461 §4: xchar is "!" to "~" except "+" and "="; hexchar is "+" and two hex digits.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class DsnSyntaxError(ValueError):
    """A DSN parameter the grammar of RFC 3461 does not produce; the message is the reason given."""


@dataclass(frozen=True)
class MailDsn:
    """ENVID (decoded) and RET (FULL or HDRS) of one transaction; None when not given."""

    envid: str | None = None
    ret: str | None = None


@dataclass(frozen=True)
class RcptDsn:
    """NOTIFY (``NEVER`` or a comma list of ``NOTIFY_KEYWORDS``) and ORCPT (``type;address``, decoded)."""

    notify: str | None = None
    orcpt: str | None = None


def xtext_decode(value: str, what: str) -> str:
    """The text an xtext stands for; printable US-ASCII only (RFC 3461 §4)."""
    if _XTEXT.fullmatch(value) is None:
        raise DsnSyntaxError(f"{what} is not xtext (RFC 3461 section 4)")
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)
    if _PRINTABLE.fullmatch(decoded) is None:
        raise DsnSyntaxError(f"{what} decodes to characters other than printable US-ASCII")
    return decoded


def _once(params: dict[str, str | None]) -> dict[str, str]:
    for name, value in params.items():
        if value is None:
            raise DsnSyntaxError(f"{name} given twice")
    return {name: value or "" for name, value in params.items()}


def parse_mail(taken: dict[str, str | None]) -> MailDsn:
    """ENVID and RET from the MAIL parameters taken by ``take_params``."""
    params = _once(taken)
    envid = ret = None
    if "ENVID" in params:
        raw = params["ENVID"]
        if not raw or len(raw) > MAX_ENVID:
            raise DsnSyntaxError(f"ENVID must have 1 to {MAX_ENVID} characters")
        envid = xtext_decode(raw, "ENVID")
    if "RET" in params:
        ret = params["RET"].upper()
        if ret not in ("FULL", "HDRS"):
            raise DsnSyntaxError("RET must be FULL or HDRS")
    return MailDsn(envid, ret)


def parse_rcpt(taken: dict[str, str | None]) -> RcptDsn:
    """NOTIFY and ORCPT from the RCPT parameters taken by ``take_params``."""
    params = _once(taken)
    notify = orcpt = None
    if "NOTIFY" in params:
        words = params["NOTIFY"].upper().split(",")
        if words == ["NEVER"]:
            notify = "NEVER"
        elif len(set(words)) != len(words) or not set(words) <= set(NOTIFY_KEYWORDS):
            raise DsnSyntaxError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE and DELAY, each once")
        else:
            notify = ",".join(k for k in NOTIFY_KEYWORDS if k in words)
    if "ORCPT" in params:
        raw = params["ORCPT"]
        addr_type, semicolon, address = raw.partition(";")
        if len(raw) > MAX_ORCPT or not semicolon or not address or _ADDR_TYPE.fullmatch(addr_type) is None:
            raise DsnSyntaxError(f"ORCPT must be addr-type;xtext of at most {MAX_ORCPT} characters")
        orcpt = f"{addr_type.lower()};{xtext_decode(address, 'ORCPT')}"
    return RcptDsn(notify, orcpt)


def take_params(arg: str, keyword: str, names: frozenset[str],
                getaddr: Callable[[str], tuple[str | None, str | None]]) -> tuple[str, dict[str, str | None]]:
    """``arg`` (``FROM:<a> ENVID=x SIZE=9``) without the parameters in ``names``, and those parameters.

    The path is found with the engine's own ``getaddr``; an argument it cannot read is returned
    unchanged (aiosmtpd then answers it as before).  A parameter given twice is taken with the
    value None, which ``parse_mail``/``parse_rcpt`` refuse.
    """
    if arg[: len(keyword)].upper() != keyword:
        return arg, {}
    rest_of_arg = arg[len(keyword):].strip()
    address, params = getaddr(rest_of_arg)
    if not address or not params or not params.strip() or not rest_of_arg.endswith(params):
        return arg, {}
    path = rest_of_arg[: len(rest_of_arg) - len(params)].rstrip()
    kept: list[str] = []
    found: dict[str, str | None] = {}
    for token in params.split():
        name, _, value = token.partition("=")
        upper = name.upper()
        if upper not in names:
            kept.append(token)
            continue
        found[upper] = None if upper in found else value
    return " ".join([f"{keyword}{path}", *kept]), found
