"""Making an audit event storable on every database before it is queued or written.

One record that the database refuses must never wedge the trail: a lone surrogate
(what ``surrogateescape`` makes of a non-UTF-8 byte in an SMTP path) cannot be
encoded, PostgreSQL refuses NUL characters in text and raises on a value longer
than its ``VARCHAR(n)`` (SQLite stores anything). So every text value is escaped and
cut to its column's length here, the lengths read from the model itself so that
they can never drift from the schema. The escapes are plain text (``\\udcff``,
``\\u0000``): an auditor reads which byte arrived, and the record hashes and
stores like any other. Fields that had to be cut are named in ``detail.truncated``.
A patient's mailbox address (``<INS>@patient.mssante.fr``) is pseudonymised first
(``gateway.audit.redact``): the trail never holds an INS.

Errors: none; anything is turned into storable text.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

from gateway.audit.models import AuditRecord
from gateway.audit.redact import redact, redact_value

#: Longest ``detail`` kept (JSON text): the trail records decisions, not documents.
DETAIL_MAX = 4000
_DEPTH_MAX = 8

_TEXT_FIELDS = ("event", "outcome", "actor", "client", "sender", "recipient", "queue_id", "rule", "reply")
#: Column lengths, from the table definition (``String(n)``).
LENGTHS: dict[str, int] = {
    name: int(getattr(AuditRecord.__table__.c[name].type, "length", 0) or 0) for name in _TEXT_FIELDS
}
# Lone surrogates (surrogateescape) and NUL (refused by PostgreSQL text).
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def storable_text(value: object, limit: int = 0) -> tuple[str, bool]:
    """``value`` as text any database stores, cut to ``limit`` characters (0: no limit); True when cut."""
    text = value if isinstance(value, str) else str(value)
    text = _UNSTORABLE.sub(_escape, text)
    if limit and len(text) > limit:
        return text[:limit], True
    return text, False


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON data with storable strings: dict keys and strings escaped, other objects as text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth > _DEPTH_MAX:
        return "..."
    if isinstance(value, dict):
        return {storable_text(k)[0]: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v, depth + 1) for v in value]
    return storable_text(value)[0]


def _storable_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """The detail as plain JSON data with storable strings; a detail too long to keep is summarised."""
    clean: dict[str, Any] = _plain(detail)
    size = len(json.dumps(clean, sort_keys=True, ensure_ascii=False))
    if size > DETAIL_MAX:
        return {"detail_too_long": size}
    return clean


def _storable_as_is(text: str, limit: int) -> bool:
    """The common case, cheaply: ASCII without NUL (or no unstorable character), within the limit."""
    if limit and len(text) > limit:
        return False
    return "\x00" not in text if text.isascii() else _UNSTORABLE.search(text) is None


def _dumps(detail: dict[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, ensure_ascii=False, default=str)


def storable_with_detail(ev: Any) -> tuple[Any, str | None]:
    """``storable(ev)`` and its detail as the JSON text stored (``append`` dumps it once, here).

    Called for every event (``AuditWriter.submit`` and ``append``): the clean case costs a
    few string checks and the one ``json.dumps`` of the detail, not a rebuild.
    """
    ev = _without_patient_ins(ev)
    changes: dict[str, Any] = {}
    cut: list[str] = []
    for name in _TEXT_FIELDS:
        value = getattr(ev, name)
        if value is None or (type(value) is str and _storable_as_is(value, LENGTHS[name])):
            continue
        text, was_cut = storable_text(value, LENGTHS[name])
        if was_cut:
            cut.append(name)
        changes[name] = text
    detail = ev.detail
    if not cut:
        if not detail:
            return (replace(ev, **changes) if changes else ev), None
        if type(detail) is dict:
            try:
                raw = _dumps(detail)
            except (TypeError, ValueError):  # keys that cannot be sorted, circular data: the walk copes
                raw = None
            if raw is not None and len(raw) <= DETAIL_MAX and _storable_as_is(raw, 0):
                return (replace(ev, **changes) if changes else ev), raw
    detail = detail if isinstance(detail, dict) else {"detail": detail}
    clean = _storable_detail(detail) if detail else {}
    if cut:
        clean = {**clean, "truncated": cut}
    changes["detail"] = clean
    return replace(ev, **changes), _dumps(clean)


def _without_patient_ins(ev: Any) -> Any:
    """The event with patients' mailbox addresses pseudonymised (the same object when there is none)."""
    changes: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(ev, name)
        if isinstance(value, str) and "patient.mssante.fr" in value.lower():
            changes[name] = redact(value)
    if ev.detail and "patient.mssante.fr" in repr(ev.detail).lower():
        changes["detail"] = redact_value(ev.detail)
    return replace(ev, **changes) if changes else ev


def storable(ev: Any) -> Any:
    """An ``AuditEvent`` whose every field is storable; the same object when nothing had to change."""
    return storable_with_detail(ev)[0]
