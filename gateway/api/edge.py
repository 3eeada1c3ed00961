"""What the API does for one authenticated request: the SMTP edge's policy and queue steps, over HTTP.

``ApiEdge.submit`` is the API's DATA: the sender rules (as MAIL FROM), each recipient through the
recipient chain exactly as RCPT TO and ``mssgw domains check`` (``gateway.policy.recipients``,
facts from ``directory.facts.recipient_facts``), the patients' rules, the content and
health-document rules on the message it builds, then ``Intake.accept`` (origin ``api``), durable
before the 202 (ARCHITECTURE rule 2). It writes the same audit records as the SMTP submission
listener (``mail``, ``rcpt``, ``data``, ``accept``; no content). Client certificates log in
through ``gateway.auth.Authenticator.check_certificate`` (registered fingerprint, APP or ORG
mailbox, chain and CRL), the same as certificate logins on the submission listener.

Idempotency (``Idempotency-Key``): the first 202 is kept per (mailbox, key) in
``api_idempotency``. The row is written *before* the queue commit, marked ``pending`` with the
queue id chosen in advance, and ``done`` after it; a retry finding a ``pending`` row asks the
queue whether that id was stored. A different body under a used key is refused (422); the same
key while the first request is still running gets 409. Refusals are not kept: they queued
nothing, and a retry is decided again.

Errors: ``Problem`` for every refusal; directory, database and disk failures are temporary (503
with the SMTP edge's 451 4.3.5, 451 4.3.0 or 452 4.3.1).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from directory.facts import recipient_facts, sender_facts
from gateway.api.models import ApiIdempotency
from gateway.api.problems import (
    S451_4_3_0_IN_PROGRESS,
    S501_5_5_4_IDEMPOTENCY_REUSED,
    S550_5_1_1_NO_SUCH,
    Problem,
)
from gateway.api.schemas import ComposeError, Submission, build_message, parse_submission
from gateway.audit.trail import AuditEvent, AuditWriter
from gateway.auth import Authenticator, certificate_fingerprint, certificate_refusal
from gateway.config import Settings
from gateway.core import replies as R
from gateway.core.errors import OutageError
from gateway.core.ttlcache import TtlCache
from gateway.documents.cda import Author
from gateway.documents.scan import inspect_message
from gateway.metrics import Metrics
from gateway.policy.content import ContentFacts, cheap_to_inspect, decide_content, inspect_content
from gateway.policy.decision import Decision
from gateway.policy.documents import DocumentFacts, DocumentsDecision, decide_documents
from gateway.policy.limits import EDGE_MAX_MESSAGE_BYTES
from gateway.policy.patients import (
    decide_patient_documents,
    decide_patient_sender,
    is_patient_domain,
    patient_nir,
)
from gateway.policy.recipients import decide_recipient
from gateway.policy.senders import decide_sender
from gateway.queue.intake import Arrival, Intake
from gateway.queue.store import QueueError, QueueStore, new_queue_id

log = logging.getLogger("mssgw.api")
T = TypeVar("T")

#: Policy answers reused this long (seconds), as on the SMTP edge (``gateway.smtp.handler``).
DECISION_CACHE_SECONDS = 5.0
DECISION_CACHE_SIZE = 20_000
#: A certificate login (or refusal) is reused this long: a revocation in the directory or a CRL, or a
#: newly registered certificate, counts within it.
LOGIN_CACHE_SECONDS = 5.0
#: A ``pending`` idempotency row older than this, whose queue id was never stored, was abandoned
#: (its node died before the queue commit): the key may be used again.
PENDING_ABANDONED = timedelta(minutes=5)
MAX_IDEMPOTENCY_KEY = 255


class Outage(OutageError):
    """The directory, the database or the spool cannot answer now."""


@dataclass(frozen=True)
class Caller:
    """Who is asking: the mailbox the client certificate logged in as, and from where."""

    identity: str
    client: str | None
    fingerprint: str
    tls: str = ""


def _recipient_decision(db: Session, address: str) -> tuple[str, Decision]:
    facts = recipient_facts(db, address)
    return facts.address, decide_recipient(facts, inbound=False)


def _sender_decision(db: Session, identity: str, address: str) -> Decision:
    return decide_sender(sender_facts(db, identity, address))


def _mailbox_author(db: Session, address: str, rpps: str | None) -> tuple[str | None, Author]:
    """The mailbox's type and the author of its documents, as ``mssgw message compose`` finds them."""
    from directory.admin import get_mailbox
    from gateway.core.errors import NotFoundError

    try:
        box = get_mailbox(db, address)
    except NotFoundError:
        return None, Author(rpps)
    person = box.practitioner
    organisation = box.organisation.name if box.organisation is not None else ""
    kind = str(box.type.value)
    if person is not None and person.id_type == "RPPS":
        return kind, Author(rpps or person.identifier, person.last_name, person.first_name, organisation)
    return kind, Author(rpps, organisation=organisation or (box.display_name or ""))


class ApiEdge:
    listener = "api"
    origin = "api"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], intake: Intake, store: QueueStore,
                 audit: AuditWriter, metrics: Metrics, authenticator: Authenticator,
                 readers: sessionmaker[Session] | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.sessions = sessions
        self.readers = readers or sessions
        self.intake = intake
        self.store = store
        self.audit_writer = audit
        self.metrics = metrics
        self.authenticator = authenticator
        self.max_recipients = settings.limits.max_recipients
        self.max_line = settings.limits.max_line_length
        self.max_size = min(settings.limits.max_message_size, EDGE_MAX_MESSAGE_BYTES)
        self.keep_keys = timedelta(hours=settings.api.idempotency_hours)
        self._decisions = TtlCache(DECISION_CACHE_SECONDS, DECISION_CACHE_SIZE)
        self._logins = TtlCache(LOGIN_CACHE_SECONDS, 4096)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- plumbing ------------------------------------------------------------------------------

    def audit(self, *events: AuditEvent) -> None:
        self.audit_writer.submit(*events)

    async def lookup(self, fn: Callable[[Session], T], *, write: bool = False,
                     expected: tuple[type[Exception], ...] = ()) -> T:  # fmt: skip
        """``fn`` in a thread on a directory session; any failure is a 503 (451 4.3.5).

        An ``expected`` exception (a unique key taken by a concurrent request) is raised as it is:
        the caller's normal case, not an outage (no warning, no ``mssgw_outages_total``)."""
        factory = self.sessions if write else self.readers

        def run() -> T:
            with factory() as db, db.begin():
                return fn(db)

        try:
            return await asyncio.to_thread(run)
        except Problem:
            raise
        except expected:
            raise
        except Exception as exc:
            log.warning("listener=api outcome=directory-unavailable error=%s", type(exc).__name__)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind="directory")
            raise Problem(503, R.S451_4_3_5_POLICY_UNAVAILABLE, "directory-unavailable") from exc

    async def cached(self, key: Hashable, fn: Callable[[Session], Any]) -> Any:
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        answer = await self.lookup(fn)
        self._decisions.put(key, answer)
        return answer

    async def sender_decision(self, identity: str, address: str) -> Decision:
        key = ("mail", identity.lower(), address.strip().lower())
        return await self.cached(key, lambda db: _sender_decision(db, identity, address))  # type: ignore[no-any-return]

    async def may_act_as(self, caller: Caller, address: str) -> bool:
        """Its own mailbox or one delegated to it: the sender rules, for reading as for sending."""
        if address.strip().lower() == caller.identity.lower():
            return True
        return (await self.sender_decision(caller.identity, address)).accepted

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # --- login ---------------------------------------------------------------------------------

    async def login(self, der: bytes | None, client: str | None, tls: str = "") -> Caller:
        """The mailbox of this verified client certificate, or a 403 (503 when the check cannot run now)."""
        if der is None:
            self.metrics.inc("mssgw_auth_total", result="no-certificate", method="certificate")
            raise Problem(403, R.S530_5_7_0_AUTH_REQUIRED.with_text(
                "A TLS client certificate registered for an APP or ORG mailbox is required"), "client-certificate")
        fingerprint = certificate_fingerprint(der)
        hit = self._logins.get(fingerprint)
        if hit is None:
            outcome = await self.authenticator.check_certificate(der, client=client, protocol="api")
            self.metrics.inc("mssgw_auth_total", result=outcome.reason, method="certificate")
            hit = outcome.identity if outcome.ok and outcome.identity else ("refused", outcome.reason)
            reply = certificate_refusal(outcome.reason)
            if not (isinstance(hit, tuple) and reply.temporary):  # outages are never remembered
                self._logins.put(fingerprint, hit)
            if isinstance(hit, tuple):
                self.audit(AuditEvent("login", "refuse", client=client, rule="client-certificate", reply=reply.short,
                                      detail={"listener": self.listener, "reason": outcome.reason}))  # fmt: skip
        if isinstance(hit, tuple):  # a refusal, remembered like a login so a loop of retries costs no lookup
            reply = certificate_refusal(hit[1])
            raise Problem(503 if reply.temporary else 403, reply, f"certificate-{hit[1]}")
        return Caller(hit, client, fingerprint, tls)

    # --- POST /v1/messages --------------------------------------------------------------------

    async def submit(self, caller: Caller, raw: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of a submission; ``Problem`` for a refusal."""
        def parse() -> tuple[Submission, str]:  # base64 of large attachments, and its digest: off the loop
            parsed = parse_submission(raw)
            return parsed, hashlib.sha256(parsed.canonical.encode("ascii")).hexdigest()

        sub, digest = await asyncio.to_thread(parse)
        if key is not None:
            earlier = await self._replay(caller, key, digest)
            if earlier is not None:
                return earlier
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._submit(caller, sub, key, digest)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _submit(self, caller: Caller, sub: Submission, key: str | None, digest: str) -> tuple[int, dict[str, Any]]:
        identity, client = caller.identity, caller.client
        decision = await self.sender_decision(identity, sub.sender)
        self.metrics.inc("mssgw_mail_total", listener=self.listener, decision=_verdict(decision), rule=decision.rule)
        self.audit(AuditEvent("mail", _verdict(decision), actor=identity, client=client, sender=sub.sender,
                              rule=decision.rule, reply=decision.reply.short))  # fmt: skip
        if not decision.accepted:
            raise Problem.from_decision(decision)
        rpps = sub.documents[0].author_rpps if sub.documents else None
        sender_type, author = await self.cached(("author", sub.sender.lower(), rpps),
                                                lambda db: _mailbox_author(db, sub.sender.lower(), rpps))
        accepted, protections, answers = await self._recipients(caller, sub, sender_type)
        if not accepted:
            first = next(a for a in answers if not a["accepted"])
            raise Problem(422, R.Reply(first["smtp_code"], first["enhanced_status"], first["reason"]), first["rule"],
                          detail=f"No recipient accepted: {first['reason']}", extra={"recipients": answers})
        # We write the header fields (a mail client wrote its own): they name the accepted recipients only.
        # An address given twice (in To:, or in To: and Cc:) is named once, where it first appears.
        taken = {given.lower() for given, answer in zip(sub.recipients, answers, strict=True) if answer["accepted"]}
        to = _once(a for a in sub.to if a.lower() in taken)
        headed = replace(sub, to=to, cc=_once((a for a in sub.cc if a.lower() in taken), {a.lower() for a in to}))
        try:
            data = await asyncio.to_thread(build_message, headed, author=author)
        except ComposeError as exc:
            refused = Decision.refuse(R.S554_5_6_0_XDM_INVALID, "document-compose", f"IHE XDM package refused: {exc}")
            self._refuse_content(caller, sub.sender, accepted, refused, 0)
            raise Problem.from_decision(refused) from None
        if len(data) > self.max_size:
            refused = Decision.refuse(R.S552_5_3_4_TOO_BIG, "message-size",
                                      f"The message would be {len(data)} octets; the limit is {self.max_size}")
            self._refuse_content(caller, sub.sender, accepted, refused, len(data))
            raise Problem.from_decision(refused)
        facts, decided = await self._check_content(data)
        documents = None
        if decided.accepted:
            documents = await self._check_documents(data, accepted)
            decided = documents.decision
        if not decided.accepted:
            self._refuse_content(caller, sub.sender, accepted, decided, len(data))
            raise Problem.from_decision(decided)
        queue_id = new_queue_id()
        fields = b"".join(f"{name}: {value}\r\n".encode("ascii") for name, value in documents.add_headers) \
            if documents is not None else b""  # fmt: skip
        stored = self._received(caller, queue_id) + fields + data
        body = {"id": queue_id, "message_id": facts.message_id, "size": len(stored), "recipients": answers,
                "links": {"self": f"/v1/messages/{queue_id}"}}  # fmt: skip
        if key is not None:
            earlier = await self._reserve(caller, key, digest, queue_id, body)
            if earlier is not None:
                return earlier
        events = [AuditEvent("accept", "accept", actor=identity, client=client, sender=sub.sender, recipient=rcpt,
                             queue_id=queue_id, rule="queued", reply=R.S250_2_6_0_QUEUED.short,
                             detail={"size": len(stored), "origin": self.origin}) for rcpt in accepted]  # fmt: skip
        arrival = Arrival(stored, sub.sender, accepted, self.origin, queue_id=queue_id, client_address=client,
                          auth_identity=identity, message_id=facts.message_id, protections=protections,
                          events=events)  # fmt: skip
        try:
            result = await self.intake.accept(arrival)
        except QueueError as exc:
            if key is not None:
                await self._forget(caller, key)
            no_space = isinstance(exc.__cause__, OSError) and exc.__cause__.errno == 28
            log.error("listener=api outcome=queue-unavailable error=%s", exc)
            self.metrics.inc("mssgw_outages_total", listener=self.listener, kind="queue")
            raise Problem(503, R.S452_4_3_1_STORAGE if no_space else R.S451_4_3_0_LOCAL_ERROR,
                          "queue-unavailable") from exc
        if key is not None:
            await self._done(caller, key)
        self.metrics.inc("mssgw_messages_queued_total", origin=self.origin)
        self.metrics.inc("mssgw_bytes_queued_total", float(len(stored)), origin=self.origin)
        log.info("listener=api outcome=queued queue_id=%s sender=%s rcpts=%d size=%d", result.queue_id, sub.sender,
                 len(accepted), len(stored))  # fmt: skip
        return 202, body

    async def _recipients(self, caller: Caller, sub: Submission,
                          sender_type: str | None) -> tuple[list[str], dict[str, str], list[dict[str, Any]]]:  # fmt: skip
        """Each recipient through the RCPT rules; (accepted addresses, protections, the answers)."""
        accepted: list[str] = []
        protections: dict[str, str] = {}
        answers: list[dict[str, Any]] = []
        for address in sub.recipients:
            normalised = address
            if len(accepted) >= self.max_recipients:
                decision = Decision.refuse(R.S452_4_5_3_TOO_MANY_RECIPIENTS, "too-many-recipients",
                                           f"at most {self.max_recipients} recipients per message")
            elif is_patient_domain(address) and not (patient := decide_patient_sender(sender_type)).accepted:
                decision = patient
            else:
                normalised, decision = await self.cached(
                    ("rcpt", False, address.strip().lower()),
                    lambda db, a=address: _recipient_decision(db, a))  # type: ignore[misc]
            outcome = _verdict(decision)
            self.metrics.inc("mssgw_rcpt_total", listener=self.listener, decision=outcome, rule=decision.rule)
            self.audit(AuditEvent("rcpt", outcome, actor=caller.identity, client=caller.client, sender=sub.sender,
                                  recipient=normalised, rule=decision.rule, reply=decision.reply.short,
                                  detail=dict(decision.facts)))  # fmt: skip
            if decision.accepted:
                accepted.append(normalised)
                protections[normalised] = dict(decision.facts).get("protection", "")
            answers.append({"address": normalised, "accepted": decision.accepted, "smtp_code": decision.reply.code,
                            "enhanced_status": decision.reply.enhanced, "rule": decision.rule,
                            "reason": decision.reason})  # fmt: skip
        return accepted, protections, answers

    async def _check_content(self, data: bytes) -> tuple[ContentFacts, Decision]:
        def run() -> tuple[ContentFacts, Decision]:
            facts = inspect_content(data, max_line_length=self.max_line)
            return facts, decide_content(facts)

        if cheap_to_inspect(data):
            return run()
        return await asyncio.to_thread(run)

    async def _check_documents(self, data: bytes, recipients: list[str]) -> DocumentsDecision:
        """The health-document rules as at DATA on the submission listener (``gateway.policy.documents``)."""
        mode = self.settings.documents.missing_headers

        def run() -> tuple[DocumentFacts, DocumentsDecision]:
            facts = inspect_message(data).policy_facts()
            return facts, decide_documents(facts, missing_headers=mode)

        found, decided = await asyncio.to_thread(run)
        self.metrics.inc("mssgw_documents_checked_total", rule=decided.decision.rule)
        patients = tuple(nir for nir in map(patient_nir, recipients) if nir is not None)
        if decided.decision.accepted and patients:
            to_patients = decide_patient_documents(patients, found.patient_nir, found.ins_kind)
            if not to_patients.accepted:
                return DocumentsDecision(to_patients)
        return decided

    def _refuse_content(self, caller: Caller, sender: str, recipients: list[str], decision: Decision,
                        size: int) -> None:  # fmt: skip
        self.metrics.inc("mssgw_content_refused_total", rule=decision.rule)
        self.audit(AuditEvent("data", "refuse", actor=caller.identity, client=caller.client, sender=sender,
                              rule=decision.rule, reply=decision.reply.short,
                              detail={"size": size, "recipients": len(recipients), "listener": self.listener}))
        log.info("listener=api outcome=refused sender=%s rcpts=%d size=%d reply=%r", sender, len(recipients), size,
                 decision.reply.short)  # fmt: skip

    def _received(self, caller: Caller, queue_id: str) -> bytes:
        """RFC 5321 4.4 trace field for a message that came in over HTTPS. No content."""
        from email.utils import format_datetime

        ip = caller.client or "unknown"
        lines = [f"Received: from [{ip}] ([{ip}])",
                 f"\tby {self.settings.hostname} (mssgw) with HTTPS id {queue_id}"
                 + (f" ({caller.tls})" if caller.tls else "") + ";",
                 f"\t{format_datetime(datetime.now(UTC))}"]  # fmt: skip
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    # --- idempotency ---------------------------------------------------------------------------

    async def _replay(self, caller: Caller, key: str, digest: str) -> tuple[int, dict[str, Any]] | None:
        """The first answer under ``key``, or None to go ahead (then nothing is kept under it yet)."""
        row = await self.lookup(lambda db: self._read_key(db, caller.identity, key), write=True)
        if row is None:
            return None
        if row["request_sha256"] != digest:
            raise Problem(422, S501_5_5_4_IDEMPOTENCY_REUSED, "idempotency-key-reused",
                          detail="This Idempotency-Key was already used with a different request body: "
                                 "use a new key for a new message")  # fmt: skip
        if row["state"] == "done":
            return int(row["status"]), json.loads(row["response"])
        stored = await asyncio.to_thread(self._queued, row["queue_id"])
        if stored:
            await self._done(caller, key)
            return int(row["status"]), json.loads(row["response"])
        if datetime.now(UTC) - row["created_at"] < PENDING_ABANDONED:
            raise Problem(409, S451_4_3_0_IN_PROGRESS, "idempotency-key-in-progress",
                          detail="A request with this Idempotency-Key is still being processed; "
                                 "retry it shortly to get its answer", retry_after=1)  # fmt: skip
        await self._forget(caller, key)
        return None

    def _read_key(self, db: Session, identity: str, key: str) -> dict[str, Any] | None:
        row = db.get(ApiIdempotency, (identity, key))
        if row is None:
            return None
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        if datetime.now(UTC) - created > self.keep_keys:
            db.delete(row)
            return None
        return {"request_sha256": row.request_sha256, "state": row.state, "status": row.status,
                "response": row.response, "queue_id": row.queue_id, "created_at": created}  # fmt: skip

    def _queued(self, queue_id: str) -> bool:
        try:
            self.store.get(queue_id)
        except QueueError:
            return False
        return True

    async def _reserve(self, caller: Caller, key: str, digest: str, queue_id: str,
                       body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:  # fmt: skip
        """Write the ``pending`` row; when another request took the key meanwhile, its answer (or 409)."""

        def insert(db: Session) -> bool:
            db.add(ApiIdempotency(identity=caller.identity, key=key, request_sha256=digest, queue_id=queue_id,
                                  state="pending", status=202, response=json.dumps(body),
                                  created_at=datetime.now(UTC)))  # fmt: skip
            return True

        try:
            await self.lookup(insert, write=True, expected=(IntegrityError,))
        except IntegrityError:  # a concurrent request with this key wrote its row first
            earlier = await self._replay(caller, key, digest)
            if earlier is None:  # taken and given back meanwhile: the client retries
                raise Problem(409, S451_4_3_0_IN_PROGRESS, "idempotency-key-in-progress", retry_after=1) from None
            return earlier
        return None

    async def _done(self, caller: Caller, key: str) -> None:
        def mark(db: Session) -> None:
            db.execute(update(ApiIdempotency).where(ApiIdempotency.identity == caller.identity,
                                                    ApiIdempotency.key == key).values(state="done"))

        try:
            await self.lookup(mark, write=True)
        except Problem:  # the message is queued: a retry finds it through the queue id
            log.warning("listener=api idempotency row left pending (the queue has the message)")

    async def _forget(self, caller: Caller, key: str) -> None:
        def drop(db: Session) -> None:
            db.execute(delete(ApiIdempotency).where(ApiIdempotency.identity == caller.identity,
                                                    ApiIdempotency.key == key))

        try:
            await self.lookup(drop, write=True)
        except Problem:
            log.warning("listener=api idempotency row of a failed request not removed")

    def purge_keys(self) -> int:
        """Remove keys older than ``api.idempotency_hours``; returns how many."""
        cutoff = datetime.now(UTC) - self.keep_keys
        with self.sessions() as db, db.begin():
            result = db.execute(delete(ApiIdempotency).where(ApiIdempotency.created_at < cutoff))
            return int(getattr(result, "rowcount", 0) or 0)

    # --- GET /v1/messages/{id} -----------------------------------------------------------------

    async def message(self, caller: Caller, queue_id: str) -> dict[str, Any]:
        """The queue's view of a message this mailbox submitted (404 for any other, existing or not)."""
        if not queue_id.isalnum() or len(queue_id) > 32:
            raise Problem(404, S550_5_1_1_NO_SUCH, "message-unknown", detail=f"No message {queue_id[:40]}")
        try:
            info = await asyncio.to_thread(self.store.get, queue_id)
        except QueueError:
            info = None
        except Exception as exc:
            raise Problem(503, R.S451_4_3_0_LOCAL_ERROR, "queue-unavailable") from exc
        if info is None or (info.get("auth_identity") or "").lower() != caller.identity.lower():
            raise Problem(404, S550_5_1_1_NO_SUCH, "message-unknown", detail=f"No message {queue_id} of yours")
        return info


def _once(addresses: Iterable[str], seen: set[str] | None = None) -> tuple[str, ...]:
    """``addresses`` without repeats (compared without case), in order; none already in ``seen``."""
    seen = set(seen or ())
    out: list[str] = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            out.append(address)
    return tuple(out)


def _verdict(decision: Decision) -> str:
    return "accept" if decision.accepted else "refuse"


def select_recent(identity: str, since: datetime) -> Any:
    """Messages ``identity`` submitted whose recipients changed after ``since`` (for the event stream)."""
    from gateway.queue.models import QueuedMessage, QueuedRecipient

    return (select(QueuedMessage.id, QueuedRecipient.address, QueuedRecipient.state, QueuedRecipient.attempts,
                   QueuedRecipient.protection, QueuedRecipient.last_reply, QueuedRecipient.updated_at)
            .join(QueuedRecipient, QueuedRecipient.message_id == QueuedMessage.id)
            .where(QueuedMessage.auth_identity == identity, QueuedRecipient.updated_at > since)
            .order_by(QueuedRecipient.updated_at))  # fmt: skip


