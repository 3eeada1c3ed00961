"""Message submission (RFC 6409) for mail clients and software: who sends, to whom, what.

Listeners: STARTTLS on ``listen.submission`` (RFC 3207; nothing but EHLO, STARTTLS,
NOOP and QUIT before it) and implicit TLS on ``listen.submissions`` (RFC 8314).
AUTH PLAIN and LOGIN (RFC 4954, RFC 4616) are offered only under TLS and checked by
``gateway.auth.Authenticator`` (throttled, locked after repeated failures: 454 4.7.0).
Software may instead present a TLS client certificate registered for an APP or ORG
mailbox: it is mapped to that mailbox at MAIL FROM when no AUTH happened, only while it
is unrevoked (directory and CRL) and valid; otherwise MAIL FROM answers 530 5.7.0 with
the reason (454 4.7.0 when the CRL is stale or missing and ``crypto.crl_soft_fail`` is off).

Each step asks policy and sends the ``Decision``'s reply: MAIL FROM the sender rules
(550 5.7.1), each RCPT TO the recipient rules exactly as ``mssgw domains check``,
DATA the content rules (550 5.6.0), the ``From:`` rule (550 5.7.1) and the health-document
rules (``gateway.policy.documents``: an IHE XDM package that fails its checks, a malformed INS
or X-MSS fields contradicting the package answer 554 5.6.0; missing X-MSS fields are added from
the package or refused, per ``documents.missing_headers``). An accepted
message gets a ``Received:`` field (and Message-ID/Date when missing, RFC 6409 8),
is committed to the queue with its audit records, and only then answered
250 2.6.0 with its queue id. A directory, database or disk failure answers 4xx.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from base64 import b64decode
from datetime import UTC, datetime
from email.utils import format_datetime

from aiosmtpd.smtp import MISSING, Envelope, Session
from sqlalchemy.orm import Session as DbSession

from directory.facts import sender_facts
from gateway.audit.trail import AuditEvent
from gateway.auth import Authenticator, certificate_refusal
from gateway.core import replies as R
from gateway.documents.scan import inspect_message
from gateway.policy.content import ContentFacts
from gateway.policy.decision import Decision
from gateway.policy.documents import DocumentFacts, DocumentsDecision, decide_documents
from gateway.policy.patients import (
    decide_patient_documents,
    decide_patient_sender,
    is_patient_domain,
    patient_nir,
)
from gateway.policy.senders import auth_required, decide_sender
from gateway.queue.store import new_queue_id
from gateway.smtp.dsn import MailDsn
from gateway.smtp.handler import EdgeDeps, EdgeHandler, Outage, verdict
from gateway.smtp.server import GatewayEnvelope, GatewaySession, GatewaySMTP

log = logging.getLogger("mssgw.smtp")

#: RFC 4954 4: the server's challenges for AUTH LOGIN (base64-encoded by aiosmtpd).
LOGIN_USER_CHALLENGE = "Username:"
LOGIN_PASSWORD_CHALLENGE = "Password:"  # noqa: S105 (a prompt, not a secret)


class SubmissionHandler(EdgeHandler):
    listener = "submission"
    origin = "submission"
    offers_dsn = True

    def __init__(self, deps: EdgeDeps, authenticator: Authenticator) -> None:
        super().__init__(deps)
        self.auth = authenticator

    # --- AUTH ------------------------------------------------------------------------------

    async def handle_AUTH(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          args: list[str]) -> str | None:
        credentials = await self._read_credentials(server, args)
        if credentials is None:
            return None  # the reply was sent while reading (bad base64, '*')
        login, password = credentials
        sess = server.gw_session()
        outcome = await self.auth.check_password(login, password, client=sess.client_ip, protocol="smtp")
        self.metrics.inc("mssgw_auth_total", result=outcome.reason, method="password")
        if outcome.ok:
            sess.authenticated = True
            sess.identity = outcome.identity
            sess.auth_method = "password"
            return str(R.S235_2_7_0_AUTH_OK)
        if outcome.reason == "locked":
            return str(R.S454_4_7_0_AUTH_LOCKED)
        if outcome.reason == "unavailable":
            return str(R.S454_4_7_0_AUTH_UNAVAILABLE)
        return str(R.S535_5_7_8_AUTH_FAILED)

    async def _read_credentials(self, server: GatewaySMTP, args: list[str]) -> tuple[str, str] | None:
        mechanism = args[0].upper()
        initial = args[1] if len(args) > 1 else None
        if mechanism == "PLAIN":
            blob = await self._decode(server, initial) if initial is not None else await server.challenge_auth("")
            if blob is MISSING or blob is None:
                return None
            assert isinstance(blob, bytes)
            parts = blob.split(b"\x00")
            if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
                await server.push(str(R.S501_5_5_4_SYNTAX_ARGS.with_text("Malformed AUTH PLAIN response")))
                return None
            return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")
        user = await self._decode(server, initial) if initial is not None else await server.challenge_auth(
            LOGIN_USER_CHALLENGE)
        if user is MISSING or user is None:
            return None
        password = await server.challenge_auth(LOGIN_PASSWORD_CHALLENGE)
        if password is MISSING:
            return None
        assert isinstance(user, bytes) and isinstance(password, bytes)
        return user.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    @staticmethod
    async def _decode(server: GatewaySMTP, text: str) -> bytes | None:
        try:
            return b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            await server.push(str(R.S501_5_5_4_SYNTAX_ARGS.with_text("Cannot decode base64")))
            return None

    async def _certificate_login(self, server: GatewaySMTP, sess: GatewaySession) -> R.Reply | None:
        """Map a TLS client certificate to the APP/ORG mailbox it is registered for (once per TLS
        session when it succeeds); a refusal is the reply for this MAIL FROM, and AUTH stays possible."""
        if sess.cert_checked or sess.identity is not None:
            return None
        der = self.peer_der(server)
        if der is None:
            sess.cert_checked = True
            return None
        outcome = await self.auth.check_certificate(der, client=sess.client_ip, protocol="smtp")
        self.metrics.inc("mssgw_auth_total", result=outcome.reason, method="certificate")
        if not outcome.ok:
            return certificate_refusal(outcome.reason, instead="use AUTH")
        sess.cert_checked = True
        sess.authenticated = True
        sess.identity = outcome.identity
        sess.auth_method = "certificate"
        return None

    # --- MAIL, RCPT --------------------------------------------------------------------------

    async def handle_MAIL(self, server: GatewaySMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        sess = server.gw_session()
        assert isinstance(envelope, GatewayEnvelope)
        dsn = envelope.dsn_pending
        refused = await self._certificate_login(server, sess)
        if refused is not None:
            self.audit(AuditEvent("mail", "refuse", client=sess.client_ip, sender=address, rule="client-certificate",
                                  reply=refused.short))  # fmt: skip
            return str(refused)
        identity = sess.identity
        if identity is None:
            decision = auth_required()
        else:
            try:
                decision = await self.cached_lookup(("mail", identity.lower(), address.strip().lower()),
                                                    lambda db: decide_sender(sender_facts(db, identity, address)))
            except Outage as exc:
                return str(exc.reply)
        if decision.accepted and isinstance(dsn, R.Reply):  # a malformed ENVID or RET (RFC 3461 §4.3, §4.4)
            return str(dsn)
        self.metrics.inc("mssgw_mail_total", listener=self.listener, decision=verdict(decision), rule=decision.rule)
        self.audit(AuditEvent("mail", verdict(decision), actor=identity, client=sess.client_ip, sender=address,
                              rule=decision.rule, reply=decision.reply.short))  # fmt: skip
        if decision.accepted:
            envelope.mail_from = address
            envelope.dsn = dsn if isinstance(dsn, MailDsn) else MailDsn()
            envelope.mail_options.extend(mail_options)
            envelope.started = time.monotonic()
        return str(decision.reply)

    # --- DATA --------------------------------------------------------------------------------

    async def handle_DATA(self, server: GatewaySMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, GatewayEnvelope) and envelope.original_content is not None
        data = envelope.original_content
        sess = server.gw_session()
        try:
            facts, decision = await self.check_content(data)
            if decision.accepted:
                decision = await self._check_from(sess, envelope, facts)
            documents = None
            if decision.accepted:
                documents = await self._check_documents(data, facts.headers_end, envelope.rcpt_tos)
                decision = documents.decision
            if not decision.accepted:
                return self.refuse_content(sess, envelope, decision, len(data))
            queue_id = new_queue_id()
            stored = self.received_header(server, envelope, queue_id) + _missing_headers(
                facts, queue_id, self.settings.hostname) + _fields(documents) + data
            events = self.accept_events(sess, envelope, queue_id, len(stored))
            result = await self.store(server, envelope, stored, queue_id=queue_id, events=events,
                                      auth_identity=sess.identity, message_id=facts.message_id)
        except Outage as exc:
            self.log_outcome("deferred", envelope, size=len(data), reply=exc.reply.short)
            return str(exc.reply)
        self.metrics.inc("mssgw_messages_queued_total", origin=self.origin)
        self.metrics.inc("mssgw_bytes_queued_total", float(len(stored)), origin=self.origin)
        self.log_outcome("queued", envelope, queue_id=result.queue_id, size=len(stored))
        return str(R.S250_2_6_0_QUEUED.with_text(f"Message accepted for delivery, queued as {result.queue_id}"))

    async def _check_documents(self, data: bytes, headers_end: int, recipients: list[str]) -> DocumentsDecision:
        """The health-document rules, in a thread (zips are inflated, XML parsed); skipped when the
        message has no zip attachment (base64 ``UEsDB``, or raw ``PK``) and no X-MSS field. A message
        to patients' mailboxes must name each patient's INS in its package (``policy.patients``)."""
        head = data[:headers_end].lower()
        patients = tuple(nir for nir in map(patient_nir, recipients) if nir is not None)
        if b"x-mss-" not in head and b"UEsDB" not in data and b"PK\x03\x04" not in data:
            found = _NO_DOCUMENTS
            decided = decide_documents(found)
        else:
            mode = self.settings.documents.missing_headers

            def run() -> tuple[DocumentFacts, DocumentsDecision]:
                facts = inspect_message(data).policy_facts()
                return facts, decide_documents(facts, missing_headers=mode)

            found, decided = await asyncio.to_thread(run)
            self.metrics.inc("mssgw_documents_checked_total", rule=decided.decision.rule)
        if decided.decision.accepted and patients:
            to_patients = decide_patient_documents(patients, found.patient_nir, found.ins_kind)
            if not to_patients.accepted:
                return DocumentsDecision(to_patients)
        return decided

    async def handle_RCPT(self, server: GatewaySMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        """A patient's mailbox takes mail from PER and ORG mailboxes only; then the recipient chain."""
        if is_patient_domain(address):
            refused = await self._patient_sender(server, envelope, address)
            if refused is not None:
                return refused
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def _patient_sender(self, server: GatewaySMTP, envelope: Envelope, address: str) -> str | None:
        sess = server.gw_session()
        sender = (envelope.mail_from or "").strip().lower()
        try:
            mailbox_type = await self.cached_lookup(("mailbox-type", sender), lambda db: _mailbox_type(db, sender))
        except Outage as exc:
            return str(exc.reply)
        decision = decide_patient_sender(mailbox_type)
        if decision.accepted:
            return None
        self.metrics.inc("mssgw_rcpt_total", listener=self.listener, decision="refuse", rule=decision.rule)
        self.audit(AuditEvent("rcpt", "refuse", actor=sess.identity, client=sess.client_ip, sender=envelope.mail_from,
                              recipient=address, rule=decision.rule, reply=decision.reply.short,
                              detail=dict(decision.facts)))  # fmt: skip
        return str(decision.reply)

    async def _check_from(self, sess: GatewaySession, envelope: Envelope, facts: ContentFacts) -> Decision:
        """From:, Sender:, Resent-From: and Resent-Sender: (``EdgeHandler.check_authors``)."""
        return await self.check_authors(sess, envelope, facts)

_NO_DOCUMENTS = DocumentFacts()


def _mailbox_type(db: DbSession, address: str) -> str | None:
    """PER, ORG or APP for a mailbox of the directory, None when unknown."""
    from directory.admin import get_mailbox
    from gateway.core.errors import NotFoundError

    try:
        return str(get_mailbox(db, address).type.value)
    except NotFoundError:
        return None


def _fields(documents: DocumentsDecision | None) -> bytes:
    """X-MSS fields policy asks to add (values are codes and O/N: no folding or encoding needed)."""
    if documents is None:
        return b""
    return b"".join(f"{name}: {value}\r\n".encode("ascii") for name, value in documents.add_headers)


def _missing_headers(facts: ContentFacts, queue_id: str, hostname: str) -> bytes:
    """RFC 6409 8.2/8.3: a submission server may add Date and Message-ID when they are missing."""
    out = b""
    if facts.message_id is None:
        out += f"Message-ID: <{queue_id}@{hostname}>\r\n".encode()
    if not facts.has_date:
        out += f"Date: {format_datetime(datetime.now(UTC))}\r\n".encode()
    return out
