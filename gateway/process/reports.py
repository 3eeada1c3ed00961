"""Two things the inbound pipeline owes people besides delivering: peers' clear reports, and quarantine notices.

- A peer operator's MTA (Postfix's own bounce, a Direct HISP's MDN) sends its DSNs (RFC 3464) and
  MDNs (RFC 8098) in clear, from the null reverse-path.  When it arrived over our inbound
  listener from a verified peer, the transport vouches for who sent it, even though the content
  is unsigned: ``transport_report`` says when to deliver such a report instead of quarantining
  it, and ``peer_report_results`` writes the Authentication-Results value that says exactly
  that (``smime=none``, ``x-peer-tls=pass``), so that nobody mistakes it for signed content.
- Nothing is kept aside silently (ARCHITECTURE rule 2): ``quarantine_notice`` tells a recipient
  that a message from an envelope sender was held and why, with none of its content (no
  subject, no body, no attachment names): only envelope addresses, the queue id and our
  own failure code.

Errors: none; bad input headers are read leniently (a malformed report is simply not a report).
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Sequence
from email.utils import format_datetime

from gateway.crypto import _mime
from gateway.crypto.result import AUTH_METHODS, SecurityResult, pvalue
from gateway.delivery.receipts import build_notice, original_headers
from gateway.process.verdict import Job

__all__ = ["PEER_TLS", "peer_report_results", "quarantine_notice", "transport_report"]

PEER_TLS = "peer-tls"  # recipient protection of a report trusted for its transport only
REPORT_TYPES = {"delivery-status", "disposition-notification", "global-delivery-status"}
_MACHINE_PART = re.compile(
    rb"(?im)^content-type:[ \t]*message/(?:global-)?(?:delivery-status|disposition-notification)\b"
)
_CTL = re.compile(r"[\r\n\x00]")


def transport_report(job: Job, data: bytes, result: SecurityResult, pending: Sequence[str],
                     is_local: Callable[[str], bool]) -> bool:  # fmt: skip
    """True for a clear report from a verified peer about our own mail: deliver, do not quarantine.

    All must hold: it came in on the inbound listener (origin ``inbound``) from a peer whose
    certificate matched the trust list (``peer_operator`` is set only then); the reverse-path is
    null (RFC 3464 §2, RFC 8098 §3: reports never come from a person); the content is neither
    signed nor encrypted (a report with a broken signature or that we cannot decrypt stays
    suspect); it is ``multipart/report`` of a delivery or disposition type with its
    machine-readable part; and every recipient is one of our mailboxes, i.e. it reports on a
    message one of our users sent (the listener already refused recipients we do not host).
    """
    if job.origin != "inbound" or job.sender or not job.peer_operator:
        return False
    if result.encrypted or result.signed or not pending or not all(is_local(a) for a in pending):
        return False
    try:
        fields = _mime.parse_headers(original_headers(data))
    except ValueError:
        return False
    mtype, params = _mime.content_type(_mime.header_value(fields, "content-type"))
    if mtype != "multipart/report" or params.get("report-type", "").lower() not in REPORT_TYPES:
        return False
    return _MACHINE_PART.search(data) is not None


def peer_report_results(authserv_id: str, result: SecurityResult, peer: str) -> str:
    """Authentication-Results value (RFC 8601) for a report trusted for its transport only."""
    reason = f"content unsigned: {result.failure or 'not signed'}"
    # The operator is a domain or a certificate DN (spaces, commas): quoted when it is no token.
    return (f'{authserv_id}; {AUTH_METHODS[result.method]}=none reason="{reason}"; '
            f"x-peer-tls=pass policy.peer-operator={pvalue(_clean(peer) or 'unknown')}")  # fmt: skip


_REASONS = {
    "not-encrypted": "it was not encrypted",
    "not-signed": "it carries no valid signature",
    "wrong-recipient": "it was not encrypted for a key of ours",
    "decrypt-failed": "it could not be decrypted",
    "from-mismatch": "its sender address does not match its signature",
}


def _clean(value: str) -> str:
    return _CTL.sub(" ", value).strip()


def quarantine_notice(*, hostname: str, postmaster: str, to: str, job: Job, failure: str | None,
                      now: _dt.datetime) -> bytes:  # fmt: skip
    """A plain notice to ``to`` that the message ``job`` was held, and why: envelope facts only."""
    sender = f"<{_clean(job.sender)}>" if job.sender else "<> (a report or automatic message)"
    peer = f" through the peer operator {_clean(job.peer_operator)}" if job.peer_operator else ""
    why = _REASONS.get(failure or "", f"it failed security verification ({_clean(failure or 'not verified')})")
    text = (
        f"A message from {sender}{peer} to <{_clean(to)}> was received by {hostname}\n"
        f"on {format_datetime(job.created_at)} and held in quarantine, because {why}.\n"
        "It has not been delivered to you.\n"
        "\n"
        f"Queue id: {job.id}\n"
        "Your administrator can release it (mssgw queue quarantine release) or delete it.\n"
        "This notice carries none of the message's content.\n"
    )
    return build_notice(
        from_addr=f"Mail Delivery System <{postmaster}>", to=to,
        subject="A message to you was held in quarantine", text=text,
        domain=postmaster.rpartition("@")[2] or hostname, now=now, extra=[("X-Mssgw-Quarantined", job.id)],
    )  # fmt: skip
