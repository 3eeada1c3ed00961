"""Outbound pipeline: protect each recipient's copy and hand it to its operator or to a local mailbox.

The job, for a claimed message of origin ``submission`` or ``receipt``:

1. Local recipients (our domains) get the original message in their INBOX, signed and verified
   on the way (``local_job``) and presented exactly as a peer's mail (``inbound.present``:
   Return-Path, Authentication-Results, the banner); nothing goes on the wire.
2. Remote recipients are grouped by domain, then by protection (``protection_for``):
   ``smime`` (the recipient's certificate), ``smime-domain`` (the domain-bound certificate,
   Direct Project), ``openpgp`` (PGP/MIME RFC 3156, when the recipient has a key and no
   certificate or the domain prefers it) and ``mtls-signed`` (signed only, for a whitelisted
   operator: the relay then pins the operator's certificate DN).  Each group is protected once
   (sign then encrypt for all its certificates and the sender) and relayed in one transaction.
   Mail that cannot be protected is never sent: the recipient bounces (5.7.1).
3. Outcomes: 2xx delivered; 4xx, network and TLS problems deferred (retried with backoff by the
   worker) until ``queue.lifetime_hours``, then bounced with a DSN (RFC 3464, 4.4.7); 5xx
   bounced with a DSN; a delay DSN once after ``queue.delay_warning_hours``.
4. A local sender of an original message gets a copy in its ``Sent`` folder (flag ``\\Seen``) only
   where no mail client saves one: the mailbox's ``sent_copy`` setting, else its type
   (``mailboxes.server_sent_copy``, APP by default), else yes for the HTTP API.

The crypto runs through ``Context.crypto`` (worker processes); keys travel as ``KeyRef`` paths.
A domain's route and its recipients' protections are reused for ``PLAN_TTL`` seconds (and
read afresh after any failed relay), so a burst to one peer asks the directory once.

Errors: nothing is raised for a recipient problem (it is recorded); ``PipelineError`` only for
a message with no usable sender identity.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import re
from collections import defaultdict
from collections.abc import Sequence

from directory.facts import recipient_facts
from gateway.crypto.keystore import KeyRef, KeyStoreError, TrustRef, load_keypair, load_trust
from gateway.crypto.result import SecurityResult
from gateway.delivery.receipts import DsnRecipient, receipt_author
from gateway.delivery.relay import Attempt, DsnRequest, Route
from gateway.delivery.trace import with_trace
from gateway.policy.recipients import protection_for
from gateway.process.common import Context, CryptoWorkersLost, Job, route_for
from gateway.process.verdict import RecipientState

__all__ = ["local_job", "process_outbound", "protect_job", "sign_job"]

log = logging.getLogger("mssgw.outbound")

# --- crypto jobs (module level: they run in worker processes) ------------------------------


def protect_job(data: bytes, signer: KeyRef, recipient_pems: tuple[bytes, ...], encrypt_for_sender: bool,
                outer_subject: str, content_encryption: str = "aes-256-gcm", rsa_key_transport: str = "pkcs1v15",
                rsa_signature: str = "pkcs1v15") -> bytes:  # fmt: skip
    """Sign then encrypt ``data`` (S/MIME) for the given certificates (algorithms: ``crypto.*``)."""
    from gateway.crypto.keystore import _load_cert
    from gateway.crypto.smime import protect

    cert, key = load_keypair(signer)
    return protect(
        data, signer_cert=cert, signer_key=key, recipient_certs=[_load_cert(p) for p in recipient_pems],
        encrypt_for_sender=encrypt_for_sender, outer_subject=outer_subject,
        content_encryption=content_encryption, rsa_key_transport=rsa_key_transport,  # type: ignore[arg-type]
        rsa_signature=rsa_signature,  # type: ignore[arg-type]
    )  # fmt: skip


def sign_job(data: bytes, signer: KeyRef, rsa_signature: str = "pkcs1v15") -> bytes:
    """Sign ``data`` without encryption (the mtls-signed relay), RSA as ``crypto.rsa_signature``."""
    from gateway.crypto.smime import sign_only

    cert, key = load_keypair(signer)
    return sign_only(data, signer_cert=cert, signer_key=key, rsa_signature=rsa_signature)  # type: ignore[arg-type]


# --- the pipeline ------------------------------------------------------------------------------


async def process_outbound(ctx: Context, job: Job, data: bytes) -> None:
    now = ctx.now()
    pending = job.pending
    if not pending:
        return
    try:
        # A message is signed for its sender; a receipt (null reverse-path) for its From, one of
        # our addresses (``receipt_author``: the postmaster, or the final recipient of a Direct
        # MDN), so that the peer finds the From and the signing certificate in agreement.
        author = job.sender or receipt_author(data)
        if author and (job.sender or ctx.is_local(author)):
            signer = await ctx.cached_io(("sign", author), ctx.keys.signer_for, author)
        else:
            signer = await ctx.cached_io(("sign-organisation",), ctx.keys.organisation_signer)
    except KeyStoreError as exc:
        await defer_or_bounce(ctx, job, data, [Attempt(r.address, 451, "4.7.0", str(exc)) for r in pending], None)
        return

    first_attempt = all(r.attempts == 0 for r in job.recipients)
    local = [r.address for r in pending if ctx.is_local(r.address)]
    remote: dict[str, list[str]] = defaultdict(list)
    for r in pending:
        if not ctx.is_local(r.address):
            remote[r.address.rpartition("@")[2].lower()].append(r.address)

    tasks = [_relay_domain(ctx, job, data, signer, domain, rcpts) for domain, rcpts in remote.items()]
    if local:
        tasks.append(_deliver_local(ctx, job, data, signer, local))
    await asyncio.gather(*tasks)

    if first_attempt and job.kind == "message" and job.origin in ("submission", "api") and ctx.is_local(job.sender):
        try:
            if await ctx.cached_io(("sent-copy", job.sender, job.origin), _wants_sent_copy, ctx, job.sender, job.origin):
                await ctx.io(ctx.local.deliver, job.sender, data, folder="Sent", flags="S")
        except Exception as exc:  # a missing Sent copy never fails the delivery itself
            log.warning("no Sent copy for %s: %s", job.id, type(exc).__name__)

    await _maybe_warn(ctx, job, data, now)


def _wants_sent_copy(ctx: Context, sender: str, origin: str) -> bool:
    """The directory's answer (``wants_sent_copy``): mail clients save their own Sent copy, software does not."""
    from directory.facts import wants_sent_copy

    with ctx.read() as session:
        return wants_sent_copy(session, sender, default_types=ctx.settings.mailboxes.server_sent_copy,
                               origin=origin)  # fmt: skip


def local_job(data: bytes, signer: KeyRef, trust: TrustRef, now: _dt.datetime | None,
              rsa_signature: str = "pkcs1v15") -> tuple[bytes | None, SecurityResult]:  # fmt: skip
    """Sign ``data`` for its sender and verify it as a peer's mail would be (runs in a worker process).

    Local mail never crosses a network, but its reader is owed the same check as for a peer's: the
    sender's certificate (or the organisation's) signs, our trust anchors and CRLs verify, and the
    result fills Authentication-Results and the banner. Nothing signed is delivered: the original is."""
    from gateway.crypto.smime import open_message, sign_only

    cert, key = load_keypair(signer)
    signed = sign_only(data, signer_cert=cert, signer_key=key, rsa_signature=rsa_signature)  # type: ignore[arg-type]
    return open_message(signed, recipient_cert=cert, recipient_key=key, trust=load_trust(trust), now=now,
                        require_encryption=False)  # fmt: skip


async def _deliver_local(ctx: Context, job: Job, data: bytes, signer: KeyRef, rcpts: Sequence[str]) -> None:
    """Deliver to our own mailboxes the original message, presented exactly as a peer's would be
    (``inbound.present``: Return-Path, Authentication-Results, the banner), not a signed wrapper
    that clients flag ("certificate owner does not match sender") and quote as a header block.

    A receipt for one of our mailboxes is delivered as the report it is (multipart/report at the
    top, which mail clients show as a bounce or a receipt), with its trace only."""
    from gateway.process.inbound import _domain_bound, _processed_mdns, present

    try:
        refused = await ctx.io(_not_deliverable_here, ctx, rcpts)
    except Exception as exc:
        reason = f"directory unavailable: {type(exc).__name__}"
        await defer_or_bounce(ctx, job, data, [Attempt(a, 451, "4.3.5", reason) for a in rcpts], "local")
        return
    if refused:
        await _bounce(ctx, job, data, refused, "local")
        rcpts = [a for a in rcpts if a not in {att.address for att in refused}]
        if not rcpts:
            return
    if job.is_receipt:
        presented = with_trace(data, job.sender)
    else:
        trust = await ctx.cached_io(("trust",), ctx.keys.trust)
        inner, result = await ctx.crypto(local_job, data, signer, trust, ctx.now(), ctx.settings.crypto.rsa_signature)
        if result.failure == "from-mismatch":
            result = await ctx.io(_domain_bound, ctx, result)
        if not result.ok:
            log.warning("local message %s failed its own verification: %s", job.id, result.failure)
        presented, _ = await present(ctx, job, inner if inner is not None else data, result, received=b"",
                                     transit="local")  # fmt: skip
    delivered: list[DsnRecipient] = []
    for addr in rcpts:
        try:
            await ctx.io(ctx.local.deliver, addr, presented, folder="INBOX")
        except Exception as exc:
            reason = f"local delivery failed: {type(exc).__name__}: {exc}"[:300]
            await defer_or_bounce(ctx, job, data, [Attempt(addr, 451, "4.3.0", reason)], "local")
            continue
        await ctx.record(job, addr, RecipientState.DELIVERED, reply="250 2.0.0 delivered to INBOX",
                         event="delivered-local", outcome="accept", protection="local")  # fmt: skip
        delivered.append(DsnRecipient(addr, "delivered", "2.0.0", "delivered to the mailbox", last_attempt=ctx.now()))
    await _success_dsn(ctx, job, data, delivered)
    if not job.is_receipt:  # asked for with Disposition-Notification-To, as from a peer (RFC 8098)
        await _processed_mdns(ctx, job, data, [d.address for d in delivered])


def _not_deliverable_here(ctx: Context, rcpts: Sequence[str]) -> list[Attempt]:
    """Local addresses without an active mailbox of ours, refused for good (550 5.1.1, 5.2.1).

    RCPT checks submitted mail; this catches the rest: a receipt addressed by a message's
    Disposition-Notification-To or From, a mailbox deactivated since.  A Maildir is made for
    no other address, and a name that is no mailbox is never a path.  The postmaster is always
    deliverable (RFC 5321 §4.5.1)."""
    from directory.facts import recipient_facts

    refused: list[Attempt] = []
    with ctx.read() as session:
        for addr in rcpts:
            if addr.partition("@")[0].lower() == "postmaster":
                continue
            facts = recipient_facts(session, addr)
            if not (facts.valid_syntax and facts.mailbox_known and facts.mailbox_local):
                refused.append(Attempt(addr, 550, "5.1.1", f"no mailbox {addr} here"))
            elif not facts.mailbox_active:
                refused.append(Attempt(addr, 550, "5.2.1", f"mailbox {addr} is disabled"))
    return refused


#: Protections a relay attempt can use; recorded with the recipient and reused by every later attempt.
RELAY_PROTECTIONS = frozenset({"smime", "smime-domain", "openpgp", "mtls-signed"})


def _plan(ctx: Context, domain: str, rcpts: Sequence[str],
          decided: dict[str, str]) -> tuple[Route | None, dict[str, list[str]]]:  # fmt: skip
    """The route, and the recipients grouped by protection ("none": cannot be protected).

    A recipient's protection is decided once (at RCPT time by the submission policy, or by the
    first attempt) and carried with the job (``decided``): a retry protects the same way, with
    the recipient's current keys.  Only recipients without one are looked up, with the same
    rule as RCPT (``protection_for``).  Reused for ``PLAN_TTL`` seconds (``Context.plans``): a
    burst of messages to one domain asks the directory once."""
    key = (domain, tuple(rcpts), tuple(sorted(decided.items())))
    hit = ctx.plans.get(key)
    if hit is not None:
        return hit[0], {k: list(v) for k, v in hit[1].items()}
    groups: dict[str, list[str]] = defaultdict(list)
    with ctx.read() as session:
        route = route_for(session, domain)
        for addr in rcpts:
            kind = decided.get(addr)
            if kind not in RELAY_PROTECTIONS:
                kind = protection_for(recipient_facts(session, addr))
            groups[kind or "none"].append(addr)
    ctx.plans.put(key, (route, {k: tuple(v) for k, v in groups.items()}))
    return route, groups


async def _relay_domain(ctx: Context, job: Job, data: bytes, signer: KeyRef, domain: str,
                        rcpts: list[str]) -> None:  # fmt: skip
    decided = {r.address: r.protection for r in job.pending if r.protection}
    try:
        route, groups = await ctx.io(_plan, ctx, domain, rcpts, decided)
    except Exception as exc:  # directory outage: try again later (ARCHITECTURE rule 7)
        reason = f"directory unavailable: {type(exc).__name__}"
        await defer_or_bounce(ctx, job, data, [Attempt(a, 451, "4.3.5", reason) for a in rcpts], None)
        return
    if route is None:
        for addr in rcpts:
            await _bounce(ctx, job, data, [Attempt(addr, 550, "5.7.1", f"{domain} is not in the trust list")], None)
        return
    for kind, addrs in groups.items():
        if kind == "none":
            unprotectable = [Attempt(a, 550, "5.7.1", f"no certificate, OpenPGP key or operator identity for {a}: "
                           "mail cannot be protected") for a in addrs]  # fmt: skip
            await _bounce(ctx, job, data, unprotectable, None)
            continue
        try:
            wire = await _protect(ctx, job, data, signer, kind, addrs)
        except KeyStoreError as exc:
            await defer_or_bounce(ctx, job, data, [Attempt(a, 451, "4.7.0", str(exc)) for a in addrs], kind)
            continue
        except CryptoWorkersLost as exc:  # a local outage, not the message's fault: one line, no traceback
            log.warning("protecting %s deferred: %s", job.id, exc)
            await defer_or_bounce(ctx, job, data, [Attempt(a, 451, "4.3.0", str(exc)) for a in addrs], kind)
            continue
        except Exception as exc:
            log.exception("protecting %s failed", job.id)
            reason = f"protection failed: {type(exc).__name__}"
            await defer_or_bounce(ctx, job, data, [Attempt(a, 451, "4.7.0", reason) for a in addrs], kind)
            continue
        if kind == "mtls-signed" and not route.operator_dn:
            for a in addrs:
                await _bounce(ctx, job, data, [Attempt(a, 550, "5.7.1", "signed-only mail needs a pinned operator DN")], kind)
            continue
        attempts = await ctx.relay.send(route, job.sender, addrs, wire, _dsn_request(job, addrs))
        if not all(att.ok for att in attempts):
            ctx.plans.discard((domain, tuple(rcpts), tuple(sorted(decided.items()))))  # read afresh next time
        for att in attempts:
            if att.ok:
                await ctx.record(job, att.address, RecipientState.DELIVERED, reply=att.reply, event="relayed",
                                 outcome="accept", protection=kind, detail={"remote": att.remote})  # fmt: skip
        await _success_dsn(ctx, job, data, [
            DsnRecipient(att.address, "relayed", "2.0.0", att.reply, remote_mta=att.remote.rpartition(":")[0] or None,
                         last_attempt=ctx.now())
            for att in attempts if att.ok and not att.dsn_passed  # else the peer reports (RFC 3461 §6.2)
        ])  # fmt: skip
        refused = [att for att in attempts if att.permanent]
        if refused:
            await _bounce(ctx, job, data, refused, kind)
        temporary = [att for att in attempts if not att.ok and not att.permanent]
        if temporary:
            await defer_or_bounce(ctx, job, data, temporary, kind)


def _dsn_request(job: Job, addrs: Sequence[str]) -> DsnRequest | None:
    """What the sender asked of DSNs, to pass on to a peer that supports them; None when nothing."""
    asked = {a: (r.notify, r.orcpt) for a in addrs if (r := job.recipient(a)) is not None and (r.notify or r.orcpt)}
    if not (asked or job.envid or job.ret):
        return None
    return DsnRequest(envid=job.envid, ret=job.ret, recipients=asked)


async def _protect(ctx: Context, job: Job, data: bytes, signer: KeyRef, kind: str, addrs: list[str]) -> bytes:
    settings = ctx.settings
    if kind in ("smime", "smime-domain"):
        pems: list[bytes] = []
        for a in addrs:
            pems.extend(await ctx.cached_io(("encrypt", a), ctx.keys.recipient_certs, a))
        return await ctx.crypto(
            protect_job, data, signer, tuple(dict.fromkeys(pems)),
            settings.crypto.encrypt_for_sender, settings.crypto.outer_subject, settings.crypto.content_encryption,
            settings.crypto.rsa_key_transport, settings.crypto.rsa_signature,
        )  # fmt: skip
    if kind == "mtls-signed":
        return await ctx.crypto(sign_job, data, signer, settings.crypto.rsa_signature)
    if kind == "openpgp":
        return await ctx.io(_pgp_protect, ctx, job, data, addrs)
    raise KeyStoreError(f"unknown protection {kind}")


def _pgp_protect(ctx: Context, job: Job, data: bytes, addrs: list[str]) -> bytes:
    from sqlalchemy import select

    from directory.models import PgpKey
    from gateway.crypto.openpgp import OpenPgp

    if ctx.openpgp is None:
        ctx.openpgp = OpenPgp(ctx.settings.gnupg_dir)
    pgp = ctx.openpgp
    owner = job.sender or ctx.postmaster
    with ctx.read() as session:
        signer = session.scalars(select(PgpKey).where(PgpKey.address.in_([owner, owner.rpartition("@")[2]]),
                                                     PgpKey.has_secret.is_(True), PgpKey.revoked.is_(False))).first()  # fmt: skip
        keys = list(session.scalars(select(PgpKey).where(PgpKey.address.in_(addrs), PgpKey.revoked.is_(False))))
        if signer is None:
            raise KeyStoreError(f"no OpenPGP signing key with a secret part for {owner}")
        if not keys:
            raise KeyStoreError(f"no OpenPGP key for {', '.join(addrs)}")
        for k in keys:
            pgp.import_key(k.armored)
        return bytes(pgp.protect(
            data, signer.fingerprint, [k.fingerprint for k in keys],
            encrypt_for_sender=ctx.settings.crypto.encrypt_for_sender,
            outer_subject=ctx.settings.crypto.outer_subject,
        ))  # fmt: skip


# --- receipts of success and failures -----------------------------------------------------------


async def _success_dsn(ctx: Context, job: Job, data: bytes, done: Sequence[DsnRecipient]) -> None:
    """A "delivered" (our mailbox) or "relayed" (handed to the peer operator, which is not asked
    for DSNs in turn) DSN for the recipients whose sender asked NOTIFY=SUCCESS (RFC 3461 §4.1)."""
    asked = [d for d in done if (r := job.recipient(d.address)) is not None and r.wants_dsn(d.action)]
    if asked:
        await ctx.send_dsn(job, data, asked)



async def _bounce(ctx: Context, job: Job, data: bytes, attempts: Sequence[Attempt], protection: str | None) -> None:
    for att in attempts:
        await ctx.record(job, att.address, RecipientState.BOUNCED, reply=att.reply, event="bounced",
                         outcome="refuse", protection=protection, detail={"remote": att.remote})  # fmt: skip
    await ctx.send_dsn(job, data, [
        DsnRecipient(att.address, "failed", att.enhanced if att.enhanced.startswith("5") else "5.0.0",
                     att.reply, remote_mta=att.remote.rpartition(":")[0] or None, last_attempt=ctx.now())
        for att in attempts
    ])  # fmt: skip


async def defer_or_bounce(ctx: Context, job: Job, data: bytes, attempts: Sequence[Attempt],
                          protection: str | None) -> None:  # fmt: skip
    """Temporary failures: deferred (the worker schedules the retry), or, once the message has
    outlived ``queue.lifetime_hours``, bounced with one DSN (4.4.7, RFC 3463) naming the last error."""
    if ctx.now() < job.expires_at:
        for att in attempts:
            await ctx.record(job, att.address, RecipientState.DEFERRED, reply=att.reply, event="deferred",
                             outcome="fail", protection=protection, detail={"remote": att.remote})  # fmt: skip
        return
    hours = ctx.settings.queue.lifetime_hours
    expired = [Attempt(a.address, 554, "4.4.7", f"message expired after {hours:g} hours in the queue; "
                       f"last error: {a.reply}", a.remote) for a in attempts]  # fmt: skip
    for att in expired:
        await ctx.record(job, att.address, RecipientState.BOUNCED, reply=att.reply, event="expired",
                         outcome="refuse", protection=protection, detail={"remote": att.remote})  # fmt: skip
    await ctx.send_dsn(job, data, [
        DsnRecipient(a.address, "failed", "4.4.7", a.text, remote_mta=a.remote.rpartition(":")[0] or None,
                     last_attempt=ctx.now())
        for a in expired
    ])  # fmt: skip




def _temporary_status(reply: str) -> str:
    """The enhanced status code of a recorded reply such as ``451 4.4.1 ...`` (4.0.0 if none)."""
    words = reply.split(" ")
    if len(words) > 1 and re.fullmatch(r"4\.\d{1,3}\.\d{1,3}", words[1]):
        return words[1]
    return "4.0.0"


async def _maybe_warn(ctx: Context, job: Job, data: bytes, now: _dt.datetime) -> None:
    """One delay DSN (action delayed) once the message has waited ``queue.delay_warning_hours``."""
    if job.warned_at is not None or job.is_receipt or not job.sender:
        return
    threshold = _dt.timedelta(hours=ctx.settings.queue.delay_warning_hours)
    if now - job.created_at < threshold:
        return

    # The job carries every recipient's state and last reply; this run's outcomes override them.
    verdict = ctx.verdict(job)
    waiting: list[tuple[str, str]] = []
    for r in job.recipients:
        out = verdict.decided(r.address)
        state, reply = (out.state, out.reply or r.last_reply or "") if out is not None else (r.state, r.last_reply or "")
        if state == RecipientState.DEFERRED:
            waiting.append((r.address, reply))
    if not waiting:
        return
    await ctx.mark_warned(job, now)
    await ctx.send_dsn(job, data, [
        DsnRecipient(addr, "delayed", _temporary_status(reply), reply, last_attempt=now,
                     will_retry_until=job.expires_at)
        for addr, reply in waiting
    ])  # fmt: skip
