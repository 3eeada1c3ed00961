"""Inbound SMTP from peer operators: mutual TLS, trust list, our mailboxes only, deduplicated.

A peer must say STARTTLS before MAIL (RFC 3207; else 530 5.7.0) and present a client
certificate that chains to our trust anchors (checked by the TLS layer,
``gateway.core.tls``). At MAIL FROM the certificate must belong to the operator of
the sender's domain: that domain must be in the trust list, and the certificate must
name it (a SAN dNSName, exactly: a wildcard never stands for a mail domain, RFC 5280
4.2.1.6, RFC 6125 7.2) or carry the subject recorded for it as
``operator_dn`` (the MSSanté whitelist's DNCertificatOperateur). Otherwise:
530 5.7.0 (no certificate), 550 5.7.1 (not in the trust list, or mismatch).

The null reverse-path ``MAIL FROM:<>`` (RFC 5321 4.5.5: delivery status and
disposition notifications) names no domain: the peer's domain is then the trust-list
domain its certificate names (SAN dNSName or ``operator_dn``); a certificate naming
none is refused 550 5.7.1. Every peer certificate is also checked against the CRLs of
our trust anchors (``KeyStore.trust_store()``, purpose clientAuth): a revoked one is
refused 550 5.7.1 with the revocation detail; revocation status "unavailable" or
"stale" does not refuse (the TLS layer has verified the chain) but is logged. The
trust store cannot be loaded: 451 4.3.5.

RCPT TO accepts only our own active mailboxes (``decide_recipient(..., inbound=True)``).
An accepted message is queued with ``origin="inbound"``, the peer's domain, and the
dedupe key ``"{peer domain}|{Message-ID}"``, deduplicated per recipient by the queue: a
recipient already accepted is acknowledged again and not queued twice (a transaction whose
recipients all were is answered 250 with the first queue id and stored nowhere); one not
yet accepted (another protection group, a retry after a 4xx at RCPT) is always queued.
There is no AUTH.  DSN (RFC 3461) is offered as on submission: a peer passes its sender's
ENVID, RET, NOTIFY and ORCPT on (§6.2), kept with the message; a local delivery then answers
NOTIFY=SUCCESS with a "delivered" DSN, and NOTIFY=NEVER silences our failure reports.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

from aiosmtpd.smtp import Envelope, Session
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from directory.facts import recipient_facts
from directory.models import Domain, DomainKind
from gateway.audit.trail import AuditEvent
from gateway.core import replies as R
from gateway.core.tls import certificate_names
from gateway.core.ttlcache import TtlCache
from gateway.crypto.keystore import KeyStore
from gateway.crypto.trust import ChainResult, TrustStore
from gateway.policy.chain import Rule, evaluate
from gateway.policy.decision import Decision
from gateway.queue.store import new_queue_id
from gateway.smtp.dsn import MailDsn
from gateway.smtp.handler import RCPT_CACHE_SECONDS, EdgeDeps, EdgeHandler, Outage, verdict
from gateway.smtp.server import NULL_PATH, GatewayEnvelope, GatewaySMTP

log = logging.getLogger("mssgw.smtp")

#: Peer decisions (certificate, sender) kept at most this many; each lives ``RCPT_CACHE_SECONDS``.
PEER_CACHE_SIZE = 2_000


@dataclass(frozen=True)
class PeerFacts:
    """The sending operator as the trust list and its certificate describe it."""

    domain: str
    domain_kind: str | None  # local, trusted, blocked, or None
    operator_dn: str | None
    cert_names: tuple[str, ...]  # SAN dNSNames
    cert_subject: str


def normalise_dn(dn: str) -> frozenset[tuple[str, str]]:
    """``CN=x, O=y`` and ``/O=y/CN=x`` (OpenSSL style) compare equal; case of types and values ignored."""
    parts = [p for p in re.split(r"[,/]", dn) if "=" in p]
    return frozenset((k.strip().upper(), v.strip().lower()) for k, v in (p.split("=", 1) for p in parts))


def _name_matches(pattern: str, domain: str) -> bool:
    """A certificate names a mail domain only by that exact dNSName (case aside).

    A wildcard (``*.mssante.test``) may match a host name for a relay's host check, never a
    mail domain identity: otherwise one operator's wildcard certificate would speak for every
    sibling operator under the same parent domain.
    """
    return not pattern.startswith("*") and pattern.lower() == domain.lower()


def _not_trusted(f: PeerFacts) -> Decision | None:
    if f.domain_kind == "trusted":
        return None
    return Decision.refuse(R.S550_5_7_1_PEER_NOT_TRUSTED, "peer-not-trusted",
                           f"sending operator is not in the trust list: {f.domain or '(no domain)'}")


def _mismatch(f: PeerFacts) -> Decision | None:
    if any(_name_matches(n, f.domain) for n in f.cert_names):
        return None
    if f.operator_dn and normalise_dn(f.operator_dn) == normalise_dn(f.cert_subject):
        return None
    return Decision.refuse(R.S550_5_7_1_PEER_CERT_MISMATCH, "peer-cert-mismatch",
                           f"client certificate {f.cert_subject} does not belong to the operator of {f.domain}")


def _accept(f: PeerFacts) -> Decision:
    return Decision.accept(R.S250_2_1_0_SENDER_OK, "peer-trusted", f"trusted operator of {f.domain}")


PEER_CHAIN: tuple[Rule[PeerFacts], ...] = (
    Rule("peer-not-trusted", "the sender's domain is in the trust list", _not_trusted),
    Rule("peer-cert-mismatch", "the client certificate names that domain or its operator DN", _mismatch),
)


def decide_peer(facts: PeerFacts) -> Decision:
    return evaluate(PEER_CHAIN, facts, _accept)


def peer_domain_of(db: DbSession, names: tuple[str, ...], subject: str) -> tuple[str | None, str | None]:
    """The trust-list domain a peer certificate belongs to (SAN dNSName first, then operator DN)."""
    candidates = {n.lower() for n in names if not n.startswith("*")}  # a wildcard names no mail domain
    rows = db.execute(
        select(Domain.name, Domain.operator_dn).where(Domain.kind == DomainKind.TRUSTED, Domain.name.in_(candidates))
    ).all()
    for name, dn in sorted(rows):
        if any(_name_matches(n.lower(), name) for n in names):
            return name, dn
    wanted = normalise_dn(subject)
    rows = db.execute(
        select(Domain.name, Domain.operator_dn).where(Domain.kind == DomainKind.TRUSTED, Domain.operator_dn.is_not(None))
    ).all()
    for name, dn in sorted(rows):
        if dn and normalise_dn(dn) == wanted:
            return name, dn
    return None, None


def revocation_decision(result: ChainResult) -> Decision | None:
    """A refusal when the peer certificate is revoked, else ``None``."""
    if result.failure != "revoked":
        return None
    detail = result.detail or "listed in its authority's CRL"
    return Decision.refuse(R.S550_5_7_1_PEER_CERT_REVOKED, "peer-cert-revoked",
                           f"client certificate revoked: {detail}")


class InboundHandler(EdgeHandler):
    listener = "inbound"
    origin = "inbound"
    #: RFC 3461 §6.2: a peer passes its sender's DSN request on; delivery reports answer it.
    offers_dsn = True

    def __init__(self, deps: EdgeDeps) -> None:
        super().__init__(deps)
        self._keystore = KeyStore(deps.settings, deps.readers or deps.sessions)
        self._peer_cache = TtlCache(RCPT_CACHE_SECONDS, PEER_CACHE_SIZE)

    async def handle_MAIL(self, server: GatewaySMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        sess = server.gw_session()
        assert isinstance(envelope, GatewayEnvelope)
        dsn = envelope.dsn_pending
        der = self.peer_der(server)
        null_path = address == NULL_PATH
        peer_domain: str | None = None
        if der is None:
            decision = Decision.refuse(R.S530_5_7_0_CLIENT_CERT_REQUIRED, "client-cert-required",
                                       "a TLS client certificate of a trusted operator is required")
        else:
            try:
                decision, peer_domain = await self.peer_decision(der, address)
            except Outage as exc:
                return str(exc.reply)
        if decision.accepted and isinstance(dsn, R.Reply):  # a malformed ENVID or RET (RFC 3461 §4.3, §4.4)
            return str(dsn)
        if decision.accepted:
            sess.peer_domain = peer_domain
            envelope.dsn = dsn if isinstance(dsn, MailDsn) else MailDsn()
            envelope.mail_from = address  # NULL_PATH for <>: aiosmtpd needs a non-empty sender for RCPT
            envelope.mail_options.extend(mail_options)
            envelope.started = time.monotonic()
        self.metrics.inc("mssgw_mail_total", listener=self.listener, decision=verdict(decision), rule=decision.rule)
        self.audit(AuditEvent("mail", verdict(decision), actor=sess.peer_domain, client=sess.client_ip,
                              sender="" if null_path else address, rule=decision.rule, reply=decision.reply.short,
                              detail={"reason": decision.reason} if not decision.accepted else {}))  # fmt: skip
        return str(decision.reply)

    async def peer_decision(self, der: bytes, address: str) -> tuple[Decision, str | None]:
        """The peer rules for this certificate and sender, reused for ``RCPT_CACHE_SECONDS``.

        A peer sends many messages on one certificate: a hit costs no thread hop, no CRL
        check and no directory read. Outages are never cached.
        """
        null_path = address == NULL_PATH
        key = (der, "" if null_path else address.strip().lower())
        hit = self._peer_cache.get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        names, subject = certificate_names(der)
        peer_domain: str | None = None
        revoked = revocation_decision(await self._check_revocation(der))
        if revoked is not None:
            decision = revoked
        elif null_path:
            domain, dn = await self.lookup(lambda db: peer_domain_of(db, tuple(names), subject))
            decision = decide_peer(PeerFacts(domain or "", "trusted" if domain else None, dn,
                                             tuple(names), subject))  # fmt: skip
            peer_domain = domain
        else:
            facts = await self.lookup(lambda db: recipient_facts(db, address))
            decision = decide_peer(PeerFacts(facts.domain, facts.domain_kind, facts.operator_dn,
                                             tuple(names), subject))  # fmt: skip
            peer_domain = address.rpartition("@")[2].lower()
        self._peer_cache.put(key, (decision, peer_domain))
        return decision, peer_domain

    async def _check_revocation(self, der: bytes) -> ChainResult:
        """Path and CRL check of the peer certificate for clientAuth; the trust store not loading is an outage."""

        def run() -> ChainResult:
            store: TrustStore = self._keystore.trust_store()
            return store.validate(x509.load_der_x509_certificate(der), purpose="clientAuth")

        try:
            result = await asyncio.to_thread(run)
        except Exception as exc:
            log.warning("listener=%s outcome=trust-store-unavailable error=%s", self.listener, type(exc).__name__)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind="trust-store")
            raise Outage(R.S451_4_3_5_POLICY_UNAVAILABLE) from exc
        if result.crl_status != "good" or not result.valid:
            log.info("listener=%s peer-cert crl_status=%s failure=%s", self.listener, result.crl_status,
                     result.failure or "-")
        return result

    async def handle_DATA(self, server: GatewaySMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, GatewayEnvelope) and envelope.original_content is not None
        data = envelope.original_content
        sess = server.gw_session()
        peer = sess.peer_domain or ""
        try:
            facts, decision = await self.check_content(data)
            if not decision.accepted:
                return self.refuse_content(sess, envelope, decision, len(data))
            queue_id = new_queue_id()
            stored = self.received_header(server, envelope, queue_id) + data
            events = self.accept_events(sess, envelope, queue_id, len(stored))
            dedupe = f"{peer}|{facts.message_id}"[:400] if facts.message_id else None
            result = await self.store(server, envelope, stored, queue_id=queue_id, events=events,
                                      peer_operator=peer, message_id=facts.message_id, dedupe_key=dedupe)
        except Outage as exc:
            self.log_outcome("deferred", envelope, size=len(data), reply=exc.reply.short)
            return str(exc.reply)
        if result.duplicate:
            self.metrics.inc("mssgw_duplicates_total")
            self.audit(AuditEvent("duplicate", "info", actor=peer, client=sess.client_ip, sender=envelope.mail_from,
                                  queue_id=result.queue_id, rule="dedupe", reply=R.S250_2_6_0_QUEUED.short))
            self.log_outcome("duplicate", envelope, queue_id=result.queue_id, size=len(data))
        else:
            self.metrics.inc("mssgw_messages_queued_total", origin=self.origin)
            self.metrics.inc("mssgw_bytes_queued_total", float(len(stored)), origin=self.origin)
            self.log_outcome("queued", envelope, queue_id=result.queue_id, size=len(stored))
        return str(R.S250_2_6_0_QUEUED.with_text(f"Message accepted for delivery, queued as {result.queue_id}"))
