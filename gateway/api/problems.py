"""RFC 9457 problem details for every refusal of the API, carrying the SMTP edge's codes and reasons.

A ``Problem`` is raised by a handler and written by the server's middleware as
``application/problem+json``: ``type`` (a URN naming the rule), ``title``, ``status`` (HTTP),
``detail`` (the reason a person reads), and the extension members ``smtp_code``,
``enhanced_status`` (RFC 3463) and ``rule`` that the SMTP edge would give for the same decision
(``gateway.core.replies``, ``gateway.policy``). Validation errors add ``errors`` (a JSON pointer
and a reason per field). Temporary failures (4xx SMTP codes) are HTTP 503 or 429 with
``Retry-After``: the client tries again, never treats them as final (ARCHITECTURE rule 7).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.core import replies as R
from gateway.policy.decision import Decision

PROBLEM_TYPE = "application/problem+json"

#: API-only refusals, with the SMTP reply a mail server gives for the same situation.
S501_5_5_2_BAD_JSON = R.Reply(501, "5.5.2", "The request body is not a JSON object")
S501_5_5_4_BAD_FIELD = R.Reply(501, "5.5.4", "A field of the request is missing or of the wrong kind")
S450_4_7_1_RATE = R.Reply(450, "4.7.1", "Too many requests for this client certificate, try again later")
S550_5_7_1_NOT_YOURS = R.Reply(550, "5.7.1", "Not a message or mailbox this certificate may read")
S550_5_1_1_NO_SUCH = R.Reply(550, "5.1.1", "No such message")
S501_5_5_4_IDEMPOTENCY_REUSED = R.Reply(
    501, "5.5.4", "This Idempotency-Key was used with a different request body")
S451_4_3_0_IN_PROGRESS = R.Reply(451, "4.3.0", "A request with this Idempotency-Key is still being processed")
S500_5_5_1_NOT_FOUND = R.Reply(500, "5.5.1", "No such endpoint")
S500_5_5_1_METHOD = R.Reply(500, "5.5.1", "Method not allowed on this endpoint")

RETRY_AFTER_SECONDS = 30


class Problem(Exception):
    """A refusal to answer as RFC 9457 problem details (raised by handlers, written by the middleware)."""

    def __init__(self, status: int, reply: R.Reply, rule: str, *, detail: str | None = None,
                 title: str | None = None, extra: Mapping[str, Any] | None = None,
                 retry_after: int | None = None, headers: Mapping[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(detail or reply.text)
        self.status = status
        self.reply = reply
        self.rule = rule
        self.detail = detail or reply.text
        self.title = title or _TITLES.get(status, "Request refused")
        self.extra = dict(extra or {})
        self.retry_after = retry_after if retry_after is not None else (
            RETRY_AFTER_SECONDS if status in (429, 503) else None)
        self.headers = dict(headers or {})  # header fields the answer carries besides Retry-After
        #: The connection ends with this answer (``Connection: close``): set where the rest of the
        #: request would otherwise be read and thrown away, or expanded from its content coding.
        self.close = False

    def body(self) -> dict[str, Any]:
        return {
            "type": f"urn:mssgw:problem:{self.rule}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "smtp_code": self.reply.code,
            "enhanced_status": self.reply.enhanced,
            "rule": self.rule,
            **self.extra,
        }

    def encode(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_decision(cls, decision: Decision, *, extra: Mapping[str, Any] | None = None) -> Problem:
        """A policy refusal as the SMTP edge would send it, with the HTTP status that means the same."""
        return cls(http_status(decision.reply), decision.reply, decision.rule, detail=decision.reason, extra=extra)

    @classmethod
    def invalid(cls, errors: Sequence[tuple[str, str]]) -> Problem:
        """400: fields missing or of the wrong kind (``errors``: JSON pointer and reason each)."""
        first = errors[0]
        return cls(400, S501_5_5_4_BAD_FIELD, "request-invalid", detail=f"{first[0] or '/'}: {first[1]}",
                   extra={"errors": [{"pointer": p, "detail": d} for p, d in errors]})


_TITLES = {
    400: "Malformed request",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Refused by policy",
    429: "Too many requests",
    500: "Internal error",
    503: "Temporarily unavailable",
}


def http_status(reply: R.Reply) -> int:
    """The HTTP status for an SMTP reply (what the client must do is the same either way)."""
    if reply.temporary:
        return 503
    if reply.enhanced == "5.3.4":
        return 413  # message too big
    if reply.code == 530 or reply.enhanced.startswith("5.7."):
        return 403  # authentication, sender not owned, consumer domain...
    if reply.code in (500, 501, 553) and reply.enhanced.startswith("5.5."):
        return 400
    return 422  # unknown recipient, malformed content, a health document refused
