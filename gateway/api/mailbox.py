"""Reading a local mailbox for the API: list, describe, remove messages, and find the receipts of a message.

The mailbox store is Maildir (``gateway.delivery.maildir``): a message's id is its file's unique
name (before ``:2,``), stable across ``new/`` -> ``cur/`` moves by IMAP clients. Everything here
is blocking file work, called in a thread by the server.

``describe`` parses a delivered message: header fields, the verification result the inbound
pipeline wrote (``Authentication-Results``, RFC 8601), the text body, the attachments' names,
types and sizes, and the health documents' metadata (``gateway.documents.describe.summarise``:
document types, authors, whether the IHE XDM package passed its checks). A message delivered
inside the gateway's signed wrapper (``multipart/signed`` around ``message/rfc822``) is described
by its inner message.

``reports_about`` finds the MDNs (RFC 8098) and DSNs (RFC 3464) in a mailbox whose
``Original-Message-ID`` (or returned ``Message-ID``, or our ``X-Mssgw-Queue-ID``) names a message.

Bounds: at most ``MAX_LIST`` entries per listing, headers read up to ``HEADER_BYTES``, files over
``MAX_DESCRIBE_BYTES`` described by their headers only, reports looked for in files under
``MAX_REPORT_BYTES``.
"""

from __future__ import annotations

import builtins
import os
import re
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from gateway.delivery.maildir import MaildirDelivery, mailbox_events

MAX_LIST = 500
HEADER_BYTES = 64 * 1024
MAX_DESCRIBE_BYTES = 64 * 1024 * 1024
MAX_REPORT_BYTES = 2 * 1024 * 1024
MESSAGE_ID = re.compile(r"[A-Za-z0-9._=-]{1,200}\Z")
SUMMARY_FIELDS = ("From", "To", "Subject", "Date", "Message-ID")
DESCRIBE_FIELDS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To", "Disposition-Notification-To",
                   "X-MSS-CODECDA", "X-MSS-INS")  # fmt: skip
_RESULT = re.compile(r"(?:^|[;\s])([a-z][a-z0-9-]*)=(pass|fail|none|neutral|policy|temperror|permerror|softfail)\b",
                     re.I)  # fmt: skip


class Mailbox:
    """One local mailbox's folder (INBOX by default) as the API reads it."""

    def __init__(self, mail_root: Path, address: str, folder: str = "INBOX") -> None:
        self.store = MaildirDelivery(mail_root)
        self.address = address
        self.inbox = self.store.mailbox_path(address)
        self.path = self.store.folder_path(address, folder)

    def files(self) -> list[Path]:
        out: list[Path] = []
        for sub in ("new", "cur"):
            try:
                with os.scandir(self.path / sub) as entries:
                    out.extend(Path(e.path) for e in entries if e.is_file() and not e.name.startswith("."))
            except FileNotFoundError:
                continue
        return out

    def find(self, message_id: str) -> Path | None:
        if not MESSAGE_ID.match(message_id):
            return None
        for path in self.files():
            if path.name.split(":", 1)[0] == message_id:
                return path
        return None

    def list(self, since: datetime | None = None, limit: int = MAX_LIST) -> builtins.list[dict[str, Any]]:
        """Messages received after ``since`` (oldest first), with a few header fields each."""
        stamped: list[tuple[float, Path]] = []
        for path in self.files():
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:  # moved or removed meanwhile
                continue
            # Compared as the microsecond times the listing shows, so ``since=<a received_at>`` excludes it.
            if since is None or datetime.fromtimestamp(mtime, UTC) > since:
                stamped.append((mtime, path))
        stamped.sort()
        return [entry for entry in (_summary(p, t) for t, p in stamped[:limit]) if entry is not None]

    def remove(self, message_id: str) -> bool:
        path = self.find(message_id)
        if path is None:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        mailbox_events.changed(self.inbox)  # IMAP sessions in IDLE re-read the folder
        return True

    def reports_about(self, message_id: str | None, queue_id: str, since: datetime) -> builtins.list[dict[str, Any]]:
        """Receipts received for the message ``message_id`` (its Message-ID) or ``queue_id``."""
        wanted = {v for v in (_bare(message_id or ""), queue_id) if v}
        out: list[dict[str, Any]] = []
        floor = since.timestamp() - 5  # file times are coarser than database times on some systems
        for path in self.files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime < floor or st.st_size > MAX_REPORT_BYTES:
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if b"report-type" not in data[:HEADER_BYTES] and b"report-type" not in data:
                continue
            report = read_report(data)
            if report is not None and report["refers_to"] & wanted:
                out.append({"kind": report["kind"], "mailbox_message": path.name.split(":", 1)[0],
                            "received_at": _iso(st.st_mtime), "recipients": report["recipients"]})  # fmt: skip
        out.sort(key=lambda r: r["received_at"])
        return out


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="microseconds")


def _bare(message_id: str) -> str:
    return message_id.strip().strip("<>").strip().lower()


def _flags(name: str) -> str:
    _, sep, info = name.partition(":2,")
    return info if sep else ""


def _summary(path: Path, mtime: float) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            head = handle.read(HEADER_BYTES)
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    fields = BytesHeaderParser(policy=default_policy).parsebytes(head)
    entry: dict[str, Any] = {"id": path.name.split(":", 1)[0], "received_at": _iso(mtime), "size": size,
                             "flags": _flags(path.name)}  # fmt: skip
    for name in SUMMARY_FIELDS:
        entry[name.lower().replace("-", "_")] = _field(fields, name)
    return entry


def _field(msg: Message, name: str) -> str | None:
    try:
        value = msg.get(name)
    except Exception:  # a malformed field the policy cannot parse: shown raw
        value = msg.get_all(name, [None])[0] if hasattr(msg, "get_all") else None
    return None if value is None else str(value)


def _parse(data: bytes) -> EmailMessage:
    msg = message_from_bytes(data, _class=EmailMessage, policy=default_policy)
    assert isinstance(msg, EmailMessage)
    return msg


def _unwrap(msg: EmailMessage) -> EmailMessage:
    """The message inside the gateway's signed wrapper (multipart/signed around message/rfc822)."""
    if msg.get_content_type() == "multipart/signed":
        first = msg.get_payload()[0]  # type: ignore[index]
        if isinstance(first, Message) and first.get_content_type() == "message/rfc822":
            inner = first.get_payload()[0]  # type: ignore[index]
            if isinstance(inner, EmailMessage):
                return inner
    return msg


def verification(outer: Message, inner: Message) -> dict[str, Any]:
    """The inbound pipeline's verdict: the Authentication-Results field and its results by method."""
    fields = [str(v) for v in (outer.get_all("Authentication-Results") or inner.get_all("Authentication-Results") or [])]
    results: dict[str, str] = {}
    for value in fields:
        for method, result in _RESULT.findall(value):
            results.setdefault(method.lower(), result.lower())
    return {"authentication_results": fields, "results": results}


def describe(data: bytes) -> dict[str, Any]:
    """Headers, verification, text, attachments and health documents of one delivered message."""
    from gateway.documents.describe import summarise
    from gateway.documents.loinc import label

    if len(data) > MAX_DESCRIBE_BYTES:
        head = BytesHeaderParser(policy=default_policy).parsebytes(data[:HEADER_BYTES])
        return {"headers": {n: _field(head, n) for n in DESCRIBE_FIELDS if head.get(n) is not None},
                "size": len(data), "truncated": True}  # fmt: skip
    outer = _parse(data)
    msg = _unwrap(outer)
    headers = {name: _field(msg, name) for name in DESCRIBE_FIELDS if msg.get(name) is not None}
    text: str | None = None
    html: str | None = None
    body = msg.get_body(preferencelist=("plain",))
    if body is not None:
        text = _content(body)
    body_html = msg.get_body(preferencelist=("html",))
    if body_html is not None:
        html = _content(body_html)
    attachments = []
    for part in msg.iter_attachments() if msg.is_multipart() else ():
        payload = part.get_payload(decode=True)
        attachments.append({"filename": part.get_filename(), "content_type": part.get_content_type(),
                            "size": len(payload) if isinstance(payload, bytes) else 0})  # fmt: skip
    summary = summarise(data)
    documents = None
    if summary is not None:
        documents = {"verified": summary.ok, "rule": summary.rule, "reason": summary.reason or None,
                     "types": [{"loinc": c, "label": label(c)} for c in summary.codes],
                     "authors_rpps": list(summary.authors)}  # fmt: skip
    report = read_report(data)
    return {"headers": headers, "size": len(data), "verification": verification(outer, msg), "text": text,
            "html": html, "attachments": attachments, "documents": documents,
            "report": None if report is None else {"kind": report["kind"], "recipients": report["recipients"]}}


def _content(part: MIMEPart) -> str | None:
    try:
        value = part.get_content()
    except (LookupError, ValueError):  # an unknown charset or broken encoding: nothing rather than an error
        return None
    return value if isinstance(value, str) else None


def read_report(data: bytes) -> dict[str, Any] | None:
    """An MDN or DSN: its kind, what it refers to (Message-IDs, queue ids) and per-recipient fields."""
    try:
        msg = _parse(data)
    except Exception:  # not a message we can read: not a report
        return None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype not in ("message/disposition-notification", "message/delivery-status"):
            continue
        blocks = [b for b in (part.get_payload() or []) if isinstance(b, Message)]
        refers: set[str] = set()
        recipients: list[dict[str, Any]] = []
        for block in blocks:
            for name in ("Original-Message-ID", "X-Mssgw-Queue-ID"):
                if block.get(name):
                    refers.add(_bare(str(block[name])))
            final = block.get("Final-Recipient")
            if final:
                entry = {"final_recipient": str(final).split(";", 1)[-1].strip()}
                for name in ("Disposition", "Action", "Status", "Diagnostic-Code"):
                    if block.get(name):
                        entry[name.lower().replace("-", "_")] = " ".join(str(block[name]).split())
                recipients.append(entry)
        for other in msg.walk():
            if other.get_content_type() in ("text/rfc822-headers", "message/rfc822-headers"):
                returned = BytesHeaderParser(policy=default_policy).parsebytes(
                    other.get_payload(decode=True) or b"")  # type: ignore[arg-type]
                if returned.get("Message-ID"):
                    refers.add(_bare(str(returned["Message-ID"])))
        kind = "mdn" if ctype == "message/disposition-notification" else "dsn"
        return {"kind": kind, "refers_to": refers, "recipients": recipients}
    return None
