"""What the submission and inbound handlers share: the aiosmtpd hooks behind every listener's protocol engine.

``EdgeHandler`` is called by ``gateway.smtp.server.GatewaySMTP`` (the engine: commands, DATA,
TLS, replies) and subclassed by ``gateway.smtp.submission`` and ``gateway.smtp.inbound``. It
holds connect and exception auditing (``handle_exception`` never leaks the exception text and
never answers 5xx: an unexpected error is 451 4.3.0), directory lookups off the event loop
with a short cache of MAIL and RCPT decisions (an outage answers 451 4.3.5, ``Outage``), the
content checks run off the loop for large messages, the ``Received:`` trace field (RFC 5321
4.4) and the durable enqueue step (``Intake.accept``: the 250 after DATA follows the commit).

Errors: ``Outage`` (a temporary failure with its reply) for the directory, database or spool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, TypeVar

from aiosmtpd.smtp import Envelope, Session, TLSSetupException
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from directory.facts import recipient_facts, sender_facts
from gateway.audit.trail import AuditEvent, AuditWriter
from gateway.config import Settings
from gateway.core import replies as R
from gateway.core.errors import OutageError
from gateway.core.tls import peer_certificate, tls_summary
from gateway.core.ttlcache import TtlCache
from gateway.metrics import Metrics
from gateway.policy.content import ContentFacts, cheap_to_inspect, decide_content, inspect_content
from gateway.policy.decision import Decision
from gateway.policy.recipients import decide_recipient
from gateway.policy.senders import decide_sender
from gateway.queue.intake import Arrival, Intake
from gateway.queue.store import Enqueued, QueueError
from gateway.smtp.dsn import RcptDsn
from gateway.smtp.server import NULL_PATH, GatewayEnvelope, GatewaySession, GatewaySMTP

log = logging.getLogger("mssgw.smtp")
T = TypeVar("T")


#: What of a client's HELO name may appear in our ``Received:`` field.
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-\[\]:_]")

#: RCPT and MAIL decisions are reused for this long (seconds) and at most this many are kept. A
#: directory change (mailbox deactivated, domain blocked, delegation removed) reaches RCPT and
#: MAIL within this delay; the delivery side reads the directory again, and logins (passwords,
#: certificates) are never cached here.
RCPT_CACHE_SECONDS = 5.0
RCPT_CACHE_SIZE = 20_000


@dataclass
class EdgeDeps:
    """What a handler needs; built once by ``gateway.app.Gateway``."""

    settings: Settings
    sessions: sessionmaker[DbSession]
    intake: Intake  # the queue's one door: durable when ``accept`` returns
    audit: AuditWriter
    metrics: Metrics
    readers: sessionmaker[DbSession] | None = None  # directory lookups (SQLite: never take the write lock)


class Outage(OutageError):
    """The directory, database or spool cannot answer now: a temporary failure."""

    def __init__(self, reply: R.Reply) -> None:
        super().__init__(reply.short)
        self.reply = reply


class EdgeHandler:
    """Shared behaviour of the submission and inbound handlers (aiosmtpd hooks)."""

    listener = "smtp"
    origin = "submission"
    #: Whether EHLO offers DSN (RFC 3461) and MAIL/RCPT take its parameters (the submission listeners).
    offers_dsn = False

    def __init__(self, deps: EdgeDeps) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.metrics = deps.metrics
        self.max_recipients = deps.settings.limits.max_recipients
        self.max_line = deps.settings.limits.max_line_length
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._decisions = TtlCache(RCPT_CACHE_SECONDS, RCPT_CACHE_SIZE)

    # --- hooks every listener shares ------------------------------------------------------

    def on_connect(self, server: GatewaySMTP) -> None:
        self.metrics.inc("mssgw_sessions_total", listener=self.listener)
        self.audit(AuditEvent("connect", "info", client=server.gw_session().client_ip,
                              detail={"listener": self.listener}))  # fmt: skip

    def on_exception(self, server: GatewaySMTP, error: Exception) -> str:
        session = server.gw_session()
        if isinstance(error, TLSSetupException):
            cause = error.__cause__
            log.info("listener=%s client=%s outcome=tls-failed error=%s", self.listener, session.client_ip,
                     type(cause).__name__ if cause else "unknown")
            self.metrics.inc("mssgw_tls_failures_total", listener=self.listener)
            self.audit(AuditEvent("tls", "refuse", client=session.client_ip, rule="tls-handshake",
                                  detail={"listener": self.listener,
                                          "error": getattr(cause, "reason", None) or type(cause).__name__}))
            return str(R.S554_5_7_0_TLS_FAILED)
        if isinstance(error, Outage):  # a step that did not catch its own outage: the same reply
            return str(error.reply)
        if isinstance(error, OutageError):  # any store that cannot answer now: try again later
            log.warning("listener=%s client=%s outcome=outage error=%s", self.listener, session.client_ip,
                        type(error).__name__)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind=type(error).__name__)
            return str(R.S451_4_3_0_LOCAL_ERROR)
        log.error("listener=%s client=%s outcome=error error=%s", self.listener, session.client_ip,
                  type(error).__name__, exc_info=error)
        self.metrics.inc("mssgw_errors_total", listener=self.listener)
        return str(R.S451_4_3_0_LOCAL_ERROR)

    async def handle_EHLO(self, server: GatewaySMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        # Never advertise an empty AUTH line (inbound has no mechanisms); our replies carry
        # enhanced status codes (RFC 2034).
        kept = [r for r in responses if r.rstrip() != "250-AUTH"]
        dsn = ["250-DSN"] if self.offers_dsn else []
        return [*kept[:-1], *dsn, "250-ENHANCEDSTATUSCODES", kept[-1]]

    async def handle_RCPT(self, server: GatewaySMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        """The recipient rules, exactly as ``mssgw domains check`` (``--inbound`` on the inbound listener)."""
        inbound = self.origin == "inbound"
        assert isinstance(envelope, GatewayEnvelope)
        sess = server.gw_session()
        dsn = envelope.dsn_pending
        if isinstance(dsn, R.Reply):  # a malformed NOTIFY or ORCPT (RFC 3461 §4.1, §4.2)
            return str(dsn)
        if len(envelope.rcpt_tos) >= self.max_recipients:
            decision = Decision.refuse(R.S452_4_5_3_TOO_MANY_RECIPIENTS, "too-many-recipients",
                                       f"at most {self.max_recipients} recipients per message")
            normalised = address
        else:
            try:
                normalised, decision = await self.recipient_decision(address, inbound)
            except Outage as exc:
                return str(exc.reply)
        outcome = verdict(decision)
        self.metrics.inc("mssgw_rcpt_total", listener=self.listener, decision=outcome, rule=decision.rule)
        self.audit(AuditEvent("rcpt", outcome, actor=sess.identity or sess.peer_domain, client=sess.client_ip,
                              sender=envelope.mail_from, recipient=normalised, rule=decision.rule,
                              reply=decision.reply.short, detail=dict(decision.facts)))  # fmt: skip
        if decision.accepted:
            envelope.rcpt_tos.append(normalised)
            envelope.protections[normalised] = dict(decision.facts).get("protection", "")
            if isinstance(dsn, RcptDsn) and (dsn.notify or dsn.orcpt):
                envelope.dsn_rcpt[normalised] = dsn
        return str(decision.reply)

    async def recipient_decision(self, address: str, inbound: bool) -> tuple[str, Decision]:
        """The recipient chain's answer, reused for ``RCPT_CACHE_SECONDS`` (no thread hop on a hit)."""
        key = ("rcpt", inbound, address.strip().lower())
        return await self.cached_lookup(key, lambda db: _rcpt_decision(db, address, inbound))  # type: ignore[no-any-return]

    async def cached_lookup(self, key: Hashable, fn: Callable[[DbSession], Any]) -> Any:
        """``lookup`` reused for ``RCPT_CACHE_SECONDS`` under ``key``: a hit costs no thread hop.

        Outages are never cached (``lookup`` raises before anything is stored).
        """
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        answer = await self.lookup(fn)
        self._decisions.put(key, answer)
        return answer

    async def check_content(self, data: bytes) -> tuple[ContentFacts, Decision]:
        """The content rules: on the event loop when cheap, else in a thread (a large MIME tree)."""
        opaque = self.origin == "inbound"

        def run() -> tuple[ContentFacts, Decision]:
            facts = inspect_content(data, max_line_length=self.max_line, opaque_crypto=opaque)
            return facts, decide_content(facts)

        if cheap_to_inspect(data, opaque_crypto=opaque):
            return run()
        return await asyncio.to_thread(run)

    async def check_authors(self, sess: GatewaySession, envelope: Envelope, facts: ContentFacts) -> Decision:
        """``From:``, ``Sender:``, ``Resent-From:`` and ``Resent-Sender:`` name only mailboxes the identity may send as.

        The same sender rules as MAIL FROM (own mailbox or delegated, active), reused from the
        decision cache; the envelope sender was checked at MAIL already. The first field that
        names another mailbox refuses the message (550 5.7.1) and says which field it was.
        """
        identity = sess.identity
        assert identity is not None
        mail_from = (envelope.mail_from or "").lower()
        for field, address in (("from", facts.from_addresses[0]), *facts.other_senders):
            if address == mail_from:
                continue
            decision = await self.cached_lookup(
                ("mail", identity.lower(), address.strip().lower()),
                functools.partial(_sender_decision, identity=identity, address=address))
            if not decision.accepted:
                reply = R.S550_5_7_1_FROM_MISMATCH if field == "from" else R.S550_5_7_1_SENDER_HEADER_MISMATCH
                name = "-".join(part.capitalize() for part in field.split("-"))
                return Decision.refuse(reply, f"{field}-header-not-owned",
                                       f"{identity} may not use {address} in the {name}: header")
        return Decision.accept(R.S250_2_6_0_QUEUED, "from-header", "author and sender fields name mailboxes it may use")

    def refuse_content(self, sess: GatewaySession, envelope: Envelope, decision: Decision, size: int) -> str:
        assert isinstance(envelope, GatewayEnvelope)
        self.metrics.inc("mssgw_content_refused_total", rule=decision.rule)
        self.audit(AuditEvent("data", "refuse", actor=sess.identity or sess.peer_domain, client=sess.client_ip,
                              sender=envelope.mail_from, rule=decision.rule, reply=decision.reply.short,
                              detail={"size": size, "recipients": len(envelope.rcpt_tos)}))  # fmt: skip
        self.log_outcome("refused", envelope, size=size, reply=decision.reply.short)
        return str(decision.reply)

    def accept_events(self, sess: GatewaySession, envelope: Envelope, queue_id: str, size: int) -> list[AuditEvent]:
        return [
            AuditEvent("accept", "accept", actor=sess.identity or sess.peer_domain, client=sess.client_ip,
                       sender=sender_of(envelope), recipient=rcpt, queue_id=queue_id, rule="queued",
                       reply=R.S250_2_6_0_QUEUED.short, detail={"size": size, "origin": self.origin})
            for rcpt in envelope.rcpt_tos
        ]  # fmt: skip

    # --- helpers ----------------------------------------------------------------------------

    def audit(self, *events: AuditEvent) -> None:
        self.deps.audit.submit(*events)

    async def lookup(self, fn: Callable[[DbSession], T]) -> T:
        """Run a read of the directory in a thread; any failure is an ``Outage`` (451 4.3.5)."""

        factory = self.deps.readers or self.deps.sessions

        def run() -> T:
            with factory() as db, db.begin():
                return fn(db)

        try:
            return await asyncio.to_thread(run)
        except Exception as exc:
            log.warning("listener=%s outcome=directory-unavailable error=%s", self.listener, type(exc).__name__)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind="directory")
            raise Outage(R.S451_4_3_5_POLICY_UNAVAILABLE) from exc

    def received_header(self, server: GatewaySMTP, envelope: Envelope, queue_id: str) -> bytes:
        """RFC 5321 4.4 trace field; RFC 3848 / RFC 6531 protocol names. No content."""
        session = server.gw_session()
        helo = _HELO_SAFE.sub("", session.host_name or "unknown")[:255] or "unknown"
        tls = tls_summary(session.ssl_object)
        proto = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") + ("S" if tls else "") + (
            "A" if session.identity else "")
        lines = [
            f"Received: from {helo} ([{session.client_ip or 'unknown'}])",
            f"\tby {self.settings.hostname} (mssgw) with {proto} id {queue_id}" + (f" ({tls})" if tls else "") + ";",
            f"\t{format_datetime(datetime.now(UTC))}",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def peer_der(self, server: GatewaySMTP) -> bytes | None:
        return peer_certificate(server.gw_session().ssl_object)

    # --- the end of a transaction ---------------------------------------------------------

    async def store(self, server: GatewaySMTP, envelope: GatewayEnvelope, data: bytes, *, queue_id: str,
                    events: list[AuditEvent], **envelope_facts: Any) -> Enqueued:
        """Hand the message to the queue (``Intake.accept``); returns only once it is committed."""
        self._inflight += 1
        self._idle.clear()
        server.busy = True
        arrival = Arrival(data, sender_of(envelope), list(envelope.rcpt_tos), self.origin, queue_id=queue_id,
                          client_address=server.gw_session().client_ip, protections=envelope.protections,
                          events=events, dsn_envid=envelope.dsn.envid, dsn_ret=envelope.dsn.ret,
                          dsn_notify={a: d.notify for a, d in envelope.dsn_rcpt.items() if d.notify},
                          dsn_orcpt={a: d.orcpt for a, d in envelope.dsn_rcpt.items() if d.orcpt},
                          **envelope_facts)  # fmt: skip
        try:
            return await self.deps.intake.accept(arrival)
        except QueueError as exc:
            no_space = isinstance(exc.__cause__, OSError) and exc.__cause__.errno == 28
            log.error("listener=%s outcome=queue-unavailable error=%s", self.listener, exc)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind="queue")
            raise Outage(R.S452_4_3_1_STORAGE if no_space else R.S451_4_3_0_LOCAL_ERROR) from exc
        finally:
            server.busy = False
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def log_outcome(self, outcome: str, envelope: GatewayEnvelope, *, queue_id: str = "-", size: int = 0,
                    reply: str = "") -> None:
        elapsed = (time.monotonic() - envelope.started) * 1000
        log.info("listener=%s outcome=%s queue_id=%s sender=%s rcpts=%d size=%d ms=%.1f%s", self.listener, outcome,
                 queue_id, envelope.mail_from or "<>", len(envelope.rcpt_tos), size, elapsed,
                 f" reply={reply!r}" if reply else "")  # fmt: skip


def sender_of(envelope: Envelope) -> str:
    """The envelope sender as queued: "" for the null reverse-path."""
    sender = envelope.mail_from or ""
    return "" if sender == NULL_PATH else sender


def verdict(decision: Decision) -> str:
    return "accept" if decision.accepted else "refuse"


def _sender_decision(db: DbSession, *, identity: str, address: str) -> Decision:
    return decide_sender(sender_facts(db, identity, address))


def _rcpt_decision(db: DbSession, address: str, inbound: bool) -> tuple[str, Decision]:
    facts = recipient_facts(db, address)
    return facts.address, decide_recipient(facts, inbound=inbound)
