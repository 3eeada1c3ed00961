"""Checks of the identifiers the directory stores: mail addresses, RPPS, ADELI, FINESS, SIRET."""

from __future__ import annotations

import re

from gateway.core.errors import DirectoryError

_LOCAL_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf"{_LOCAL_ATOM}(?:\.{_LOCAL_ATOM})*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"^{_LOCAL}@{_LABEL}(?:\.{_LABEL})+$")


class InvalidIdentifier(DirectoryError, ValueError):
    """An identifier or address that is not well formed; the message says why."""


def normalise_address(address: str) -> str:
    """A lower-cased ``local@domain`` address, or ``InvalidIdentifier``."""
    cleaned = address.strip().strip("<>").strip()
    if len(cleaned) > 254 or not _ADDRESS.match(cleaned):
        raise InvalidIdentifier(f"not a valid mail address: {address!r}")
    local, _, domain = cleaned.rpartition("@")
    if len(local) > 64:
        raise InvalidIdentifier(f"local part longer than 64 characters: {address!r}")
    return f"{local}@{domain}".lower()


def normalise_domain(domain: str) -> str:
    cleaned = domain.strip().rstrip(".").lower()
    if len(cleaned) > 253 or not re.match(rf"^{_LABEL}(?:\.{_LABEL})+$", cleaned):
        raise InvalidIdentifier(f"not a valid domain name: {domain!r}")
    return cleaned


#: Each digit doubled, its two digits added (the Luhn step): 5 -> 10 -> 1.
_LUHN_DOUBLED = str.maketrans("0123456789", "0246813579")


def luhn_valid(digits: str) -> bool:
    """The Luhn check over a string of ASCII digits (no Python step per digit: imports call it per line)."""
    doubled = digits[-2::-2].translate(_LUHN_DOUBLED)
    return (sum(digits[-1::-2].encode()) + sum(doubled.encode()) - 48 * len(digits)) % 10 == 0


def check_rpps(rpps: str) -> str:
    """An RPPS number: 11 digits whose last is a Luhn check digit. Accepts the ``8``-prefixed national id."""
    value = rpps.strip()
    if len(value) == 12 and value.startswith("8"):
        value = value[1:]
    if not (len(value) == 11 and value.isascii() and value.isdigit()):
        raise InvalidIdentifier(f"RPPS must be 11 digits, got {rpps!r}")
    if not luhn_valid(value):
        raise InvalidIdentifier(f"RPPS {value} fails its Luhn check digit")
    return value


def check_adeli(adeli: str) -> str:
    value = adeli.strip()
    if len(value) == 10 and value.startswith("0"):
        value = value[1:]
    if not (len(value) == 9 and value.isdigit()):
        raise InvalidIdentifier(f"ADELI must be 9 digits, got {adeli!r}")
    return value


def check_practitioner_id(id_type: str, identifier: str) -> tuple[str, str]:
    kind = id_type.strip().upper()
    if kind in {"RPPS", "8"}:
        return "RPPS", check_rpps(identifier)
    if kind in {"ADELI", "0"}:
        return "ADELI", check_adeli(identifier)
    raise InvalidIdentifier(f"unknown practitioner identifier type {id_type!r} (RPPS or ADELI)")
