"""Inbound pipeline: open what a peer operator sent, and deliver the authentic original or keep it aside.

The job, for a claimed message of origin ``inbound``:

1. Decrypt and verify with our keys (S/MIME RFC 8551 via ``smime.open_message``, trying each
   local recipient's key then the domain's; PGP/MIME RFC 3156 via ``OpenPgp.open``).
   A signature by the sending domain's organisation certificate is accepted for a From of
   that domain when the certificate is the one registered for the domain or its subject is
   the trust list's operator DN (Direct Project domain-bound certificates).
   MSSanté mode: a message signed but not encrypted is accepted when it came over the inbound
   listener from a verified peer operator (``peer_operator``) whose trust-list row does not
   require end-to-end encryption, and its From is in a domain of that same operator
   (``directory.facts.signed_only_accepted``); the signature must hold as always. It is
   recorded as ``mtls-signed`` and its Authentication-Results adds
   ``x-peer-tls=pass policy.peer-operator=...`` and says it was not encrypted end to end.
2. Verified: the recovered original goes to each local recipient's INBOX (``present``) with
   ``Return-Path`` and the ``Received`` fields of the peer hop (RFC 5321 §4.4), an
   ``Authentication-Results`` header (RFC 8601; forged ones claiming our host are removed
   first) and, if ``crypto.banner`` is set, a short banner in ``crypto.banner_language``
   (``gateway.process.banner``: the signer as the directory knows them, "revocation not
   checked" when the CRL was not current) where every client shows it: a text/plain body
   prefix, a first text part of a multipart/mixed, or else a multipart/mixed around the
   original (attachments and inner signatures untouched). Mail between two of our own
   mailboxes is delivered the same way (``gateway.process.outbound``).
   IHE XDM packages are checked as at submission (``gateway.documents.describe``): the banner
   names the document types in words and their authors as the directory knows them, or says
   the check failed and why; ``Authentication-Results`` carries ``x-mss-xdm=pass|fail|none``.
   A failed check is shown, never silently dropped.
   An MDN ``processed`` (RFC 8098) answers a ``Disposition-Notification-To``, plus
   ``dispatched`` when the Direct final-delivery option asks for it.
3. A report (DSN RFC 3464 / MDN RFC 8098) that is neither signed nor encrypted, from the null
   reverse-path, over the inbound listener from a verified peer operator (``peer_operator`` is
   only set once the peer's certificate matched the trust list) and addressed to our own
   mailboxes, is delivered (``gateway.process.reports``): peers' MTAs (Postfix bounces) send
   their reports in clear, and quarantining them would hide from our senders that their
   message failed.  Its Authentication-Results says: transport authenticated, content unsigned.
4. Not verified: every recipient is QUARANTINED (never delivered), audited with the verdict,
   each recipient gets a notice without content (who sent it, why it is held; queued once per
   message via a dedupe key), one log line names the reason, and the sender gets an MDN
   ``failed`` (when it asked for MDNs) or a DSN (per ``receipts.dsn_on_quarantine``).
   Receipts never answer receipts.

Errors: nothing raised for bad input (the verdict says why); local delivery problems defer.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re

from gateway.crypto import _mime
from gateway.crypto.keystore import KeyRef, KeyStoreError, TrustRef, load_keypair, load_trust
from gateway.crypto.result import SecurityResult
from gateway.delivery.receipts import (
    DsnRecipient,
    build_mdn,
    is_report,
    mdn_from,
    mdn_goes_to_its_sender,
    mdn_request,
)
from gateway.delivery.relay import Attempt, dn_equal
from gateway.delivery.trace import peer_trace, with_trace
from gateway.documents.describe import (
    DocumentSummary,
    auth_results_method,
    banner_line,
    may_carry_documents,
    summarise,
)
from gateway.process.banner import Transit, banner_text
from gateway.process.common import Context, Job
from gateway.process.outbound import defer_or_bounce
from gateway.process.reports import PEER_TLS, peer_report_results, quarantine_notice, transport_report
from gateway.process.verdict import RELEASED, RecipientState

MTLS_SIGNED = "mtls-signed"  # a recipient's protection: signed, over pinned mutual TLS (MSSanté mode)

__all__ = ["annotate", "open_job", "present", "process_inbound"]

log = logging.getLogger("mssgw.inbound")

_RETRY_WITH_NEXT_KEY = {"wrong-recipient", "decrypt-failed"}


def open_job(data: bytes, candidates: tuple[KeyRef, ...], trust: TrustRef, now: _dt.datetime | None,
             require_encryption: bool = True) -> tuple[bytes | None, SecurityResult]:  # fmt: skip
    """Decrypt + verify S/MIME with the first candidate key that opens it (runs in a worker process).

    ``require_encryption`` False: a signed message that is not encrypted may still verify (a peer
    in MSSanté mode, ``_signed_only_peer``); the caller then checks its From's domain."""
    from gateway.crypto.smime import open_message

    store = load_trust(trust)
    inner: bytes | None = None
    result = SecurityResult(method="smime").with_failure("wrong-recipient", "no key of ours for this message")
    for ref in candidates:
        try:
            cert, key = load_keypair(ref)
        except KeyStoreError:
            continue
        inner, result = open_message(data, recipient_cert=cert, recipient_key=key, trust=store, now=now,
                                     require_encryption=require_encryption)  # fmt: skip
        if result.failure not in _RETRY_WITH_NEXT_KEY:
            break
    return inner, result


def _is_pgp(data: bytes) -> bool:
    try:
        fields = _mime.parse_headers(_mime.split_entity(data[:65536])[0])
    except ValueError:
        return False
    mtype, params = _mime.content_type(_mime.header_value(fields, "content-type"))
    return mtype == "multipart/encrypted" and params.get("protocol", "").lower() == "application/pgp-encrypted"


# --- annotation --------------------------------------------------------------------------------


def _fold(name: str, value: str, width: int = 76) -> str:
    """Fold a structured header at spaces outside quoted strings (RFC 5322 §2.2.3)."""
    tokens, buf, quoted = [], "", False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == " " and not quoted:
            tokens.append(buf)
            buf = ""
        else:
            buf += ch
    tokens.append(buf)
    lines, line = [], f"{name}:"
    for tok in filter(None, tokens):
        if len(line) + 1 + len(tok) > width and line.strip() != f"{name}:":
            lines.append(line)
            line = "\t" + tok
        else:
            line += " " + tok
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def annotate(inner: bytes, result: SecurityResult, *, authserv_id: str, banner: bool,
             signer: str | None = None, results: str | None = None, documents: str | None = None,
             extra_result: str | None = None, language: str = "en", transit: Transit = "peer",
             released: bool = False) -> bytes:  # fmt: skip
    """Prepend Authentication-Results (removing forged ones for ``authserv_id``) and maybe a banner.

    ``results`` replaces the header value built from ``result`` (a report trusted for its transport);
    ``extra_result`` is one more resinfo (``x-mss-xdm=...``) and ``documents`` a second banner line.
    The banner (``gateway.process.banner``: ``signer`` is the directory's label, ``language``,
    ``transit`` and ``released`` its wording) says what was checked, and what failed if anything."""
    inner = _mime.to_crlf(inner)
    block, body = _mime.split_entity(inner)
    fields = _mime.parse_headers(block)
    kept = []
    for name, value, raw in fields:
        if name == "authentication-results" and value.split(";", 1)[0].strip().lower() == authserv_id.lower():
            continue
        kept.append(raw)
    value = results if results is not None else result.auth_results_header(authserv_id)
    if extra_result:
        value = f"{value}; {extra_result}"
    header = _fold("Authentication-Results", value).encode("utf-8")
    if banner:
        text = banner_text(result, label=signer, language=language, transit=transit, released=released)
        text += f"\r\n{documents}" if documents else ""
        body, kept = _with_banner(fields, kept, body, text)
    return header + b"".join(kept) + b"\r\n" + body


_CONTENT_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition", "content-id",
                   "content-description", "content-language", "content-location", "content-md5")  # fmt: skip


def _banner_part(text: str) -> bytes:
    return (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            b"Content-Disposition: inline\r\n\r\n" + text.encode("utf-8") + b"\r\n")  # fmt: skip


def _with_banner(fields: list[tuple[str, str, bytes]], kept: list[bytes], body: bytes,
                 text: str) -> tuple[bytes, list[bytes]]:  # fmt: skip
    """The banner where every mail client shows it, without touching what it does not own.

    * plain 7/8-bit text (us-ascii or utf-8): the banner opens the body (the part becomes utf-8, 8bit:
      us-ascii is a subset);
    * multipart/mixed: a first inline text part, the other parts byte for byte;
    * a report (multipart/report: DSN, MDN) stays as it is, without a banner;
    * anything else (multipart/alternative or related, HTML, base64 or quoted-printable text, a
      single attachment, a signed or encrypted entity): the original content becomes the second
      part of a new multipart/mixed whose first part is the banner (its Content-* fields move
      with it; a signature inside still covers the same bytes)."""
    mtype, params = _mime.content_type(_mime.header_value(fields, "content-type"))
    cte = (_mime.header_value(fields, "content-transfer-encoding") or "7bit").strip().lower()
    charset = params.get("charset", "us-ascii").lower()
    if mtype == "text/plain" and cte in ("7bit", "8bit") and charset in ("us-ascii", "utf-8"):
        extra = "".join(f"; {k}={_mime_param(v)}" for k, v in params.items() if k not in ("charset",))
        rest = [raw for raw in kept if _name(raw) not in ("content-type", "content-transfer-encoding")]
        if not any(_name(raw) == "mime-version" for raw in rest):
            rest.append(b"MIME-Version: 1.0\r\n")
        rest += [f"Content-Type: text/plain; charset=utf-8{extra}\r\n".encode(),
                 b"Content-Transfer-Encoding: 8bit\r\n"]  # fmt: skip
        return text.encode("utf-8") + b"\r\n\r\n" + body, rest
    boundary = params.get("boundary", "")
    if mtype == "multipart/mixed" and boundary:
        delim = b"--" + boundary.encode("ascii", "replace")
        m = re.search(rb"(?:\A|\r\n)" + re.escape(delim) + rb"[ \t]*\r\n", body)
        if m:
            at = m.start() + (2 if body[m.start():m.start() + 2] == b"\r\n" else 0)
            return body[:at] + delim + b"\r\n" + _banner_part(text) + body[at:], kept
    if mtype == "multipart/report" or (mtype.startswith("multipart/") and not boundary):
        # A receipt (RFC 6522) must stay a report at the top for clients to show it as one; a
        # broken structure is left as received. Authentication-Results still says what was checked.
        return body, kept
    moved = [raw for raw in kept if _name(raw) in _CONTENT_FIELDS]
    if not any(_name(raw) == "content-type" for raw in moved):
        moved.insert(0, b"Content-Type: text/plain; charset=us-ascii\r\n")
    rest = [raw for raw in kept if _name(raw) not in _CONTENT_FIELDS]
    new_boundary = _mime.new_boundary(body, text.encode("utf-8"))
    if not any(_name(raw) == "mime-version" for raw in rest):
        rest.append(b"MIME-Version: 1.0\r\n")
    rest.append(f'Content-Type: multipart/mixed; boundary="{new_boundary}"\r\n'.encode("ascii"))
    delim = b"--" + new_boundary.encode("ascii")
    wrapped = (delim + b"\r\n" + _banner_part(text) + delim + b"\r\n" + b"".join(moved) + b"\r\n"
               + body + b"\r\n" + delim + b"--\r\n")  # fmt: skip
    return wrapped, rest


def _name(raw: bytes) -> str:
    return raw.partition(b":")[0].strip().decode("ascii", "replace").lower()


def _mime_param(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9!#$&+.^_`|~-]+", value) else '"' + value.replace('"', "") + '"'


# --- the pipeline --------------------------------------------------------------------------------


async def _signer_label(ctx: Context, email: str) -> str | None:
    """The signer as the directory knows them ("Dr Anne Martin (RPPS ...)"), or None.

    Reused for ``PLAN_TTL`` seconds (``Context.plans``; a hit costs no thread hop): a peer's
    messages come in bursts from the same few signers.
    """
    from directory.facts import signer_label

    def read() -> str | None:
        with ctx.read() as session:
            return signer_label(session, email)

    key = ("signer-label", email.strip().lower())
    hit = ctx.plans.get(key)
    if hit is not None:
        return hit[0]  # type: ignore[no-any-return]
    label = await ctx.io(read)
    ctx.plans.put(key, (label,))
    return label


def _documents_rule(documents: DocumentSummary | None) -> str:
    """What the audit trail keeps of the documents check: the rule that decided (no content)."""
    return documents.rule if documents is not None else "none"


async def _author_labels(ctx: Context, rpps_numbers: tuple[str, ...]) -> dict[str, str]:
    """Document authors as the directory knows them ("Dr Anne Martin (RPPS ...)"); unknown ones left out."""
    if not rpps_numbers:
        return {}
    from directory.admin import find_practitioner
    from gateway.core.errors import NotFoundError

    def read() -> dict[str, str]:
        out: dict[str, str] = {}
        with ctx.read() as session:
            for rpps in rpps_numbers[:8]:
                try:
                    person = find_practitioner(session, rpps)
                except NotFoundError:
                    continue
                title = {"DR": "Dr", "PR": "Pr"}.get((person.civility or "").upper(), "")
                if not title and person.profession_code in {"10", "40"}:
                    title = "Dr"
                out[rpps] = " ".join(filter(None, [title, person.first_name, person.last_name])) + f" (RPPS {rpps})"
        return out

    return await ctx.io(read)


def _domain_bound(ctx: Context, result: SecurityResult) -> SecurityResult:
    """Accept a From-domain signature by that domain's organisation certificate (Direct Project)."""
    if result.failure != "from-mismatch" or not (result.signature_valid and result.chain_valid):
        return result
    if result.revoked is True or not result.from_address or "@" not in result.from_address:
        return result
    domain = result.from_address.rpartition("@")[2]
    ok = bool(result.signer_fingerprint and result.signer_fingerprint in ctx.keys.known_fingerprints(domain))
    if not ok and result.signer_subject:
        from directory.facts import get_domain

        with ctx.read() as session:
            row = get_domain(session, domain)
            ok = bool(row and row.operator_dn and dn_equal(row.operator_dn, result.signer_subject))
    if not ok:
        return result
    return result.evolve(failure=None, detail="", from_matches_signer=True)


async def process_inbound(ctx: Context, job: Job, data: bytes) -> None:
    released = [r.address for r in job.pending if r.protection == RELEASED]
    pending = [r.address for r in job.pending if r.protection != RELEASED]
    if not pending and not released:
        return
    now = ctx.now()
    relaxed = await _signed_only_peer(ctx, job, job.peer_operator or "")
    inner, result = await _open(ctx, data, pending or released, now, require_encryption=not relaxed)
    if result.failure == "from-mismatch":
        result = await ctx.io(_domain_bound, ctx, result)
    if relaxed and not result.encrypted:
        result = await _mssante_mode(ctx, job, result)
    accept = result.ok or (
        not ctx.settings.crypto.require_signature_inbound
        and result.failure == "not-signed" and result.decrypted_ok and inner is not None
    )  # fmt: skip
    if released:
        await _deliver_released(ctx, job, data, inner, result, released)
    if not pending:
        return
    await ctx.set_security(job, result.audit_fields())
    if not accept and transport_report(job, data, result, pending, ctx.is_local):
        await _deliver_report(ctx, job, data, result, pending)
        return
    if not accept or inner is None:
        await _quarantine(ctx, job, data, inner, result, pending)
        return
    delivered_bytes, documents = await present(ctx, job, inner, result, received=peer_trace(data), transit="peer")
    delivered: list[str] = []
    for addr in pending:
        try:
            await ctx.io(ctx.local.deliver, addr, delivered_bytes, folder="INBOX")
        except Exception as exc:
            reason = f"local delivery failed: {type(exc).__name__}"
            await defer_or_bounce(ctx, job, data, [Attempt(addr, 451, "4.3.0", reason)], result.method)
            continue
        signed_only = result.transport_peer is not None and not result.encrypted
        await ctx.record(job, addr, RecipientState.DELIVERED, reply="250 2.0.0 verified and delivered to INBOX",
                         event="delivered-inbound", outcome="accept",
                         protection=MTLS_SIGNED if signed_only else result.method,
                         detail={"verdict": result.verdict, "signer": result.signer_email,
                                 "documents": _documents_rule(documents),
                                 **({"peer": job.peer_operator} if signed_only else {})})  # fmt: skip
        delivered.append(addr)
    await ctx.send_dsn(job, data, [  # only for a NOTIFY=SUCCESS the peer passed on (RFC 3461 §6.2)
        DsnRecipient(addr, "delivered", "2.0.0", "delivered to the mailbox", last_attempt=ctx.now())
        for addr in delivered
    ])  # fmt: skip
    await _processed_mdns(ctx, job, inner, delivered)


async def present(ctx: Context, job: Job, inner: bytes, result: SecurityResult, *, received: bytes,
                  transit: Transit, released: bool = False) -> tuple[bytes, DocumentSummary | None]:  # fmt: skip
    """The message as a clinician's mail client gets it, the same for a peer's mail and ours.

    Trace first (RFC 5321 §4.4): ``Return-Path`` (the envelope sender), ``Authentication-Results``
    (RFC 8601), then ``received`` (the ``Received`` fields of the hops that the unwrapped outer
    message carried), then the original's own fields. The banner (``crypto.banner``, in
    ``crypto.banner_language``) names the signer as the directory knows them and says what was
    checked; IHE XDM packages are described and checked (``gateway.documents.describe``)."""
    banner = ctx.settings.crypto.banner
    signer = await _signer_label(ctx, result.signer_email) if banner and result.signer_email else None
    documents = await ctx.io(summarise, inner) if may_carry_documents(inner) else None  # CPU: in a thread
    doc_line = banner_line(documents, await _author_labels(ctx, documents.authors),
                           language=ctx.settings.crypto.banner_language) if documents and banner else None
    annotated = annotate(received + _mime.to_crlf(inner), result, authserv_id=ctx.settings.hostname, banner=banner,
                         signer=signer, documents=doc_line,
                         extra_result=auth_results_method(documents) if documents else None,
                         language=ctx.settings.crypto.banner_language, transit=transit,
                         released=released)  # fmt: skip
    return with_trace(annotated, job.sender), documents


async def _deliver_released(ctx: Context, job: Job, data: bytes, inner: bytes | None, result: SecurityResult,
                            released: list[str]) -> None:  # fmt: skip
    """An admin released these recipients from quarantine: deliver the message as it is, once.

    No new verdict and no second failure notice: the quarantine's verification result goes
    in the Authentication-Results header (what could be opened is delivered, else the bytes
    received), the banner says in words what failed and that an administrator released it, and
    the release is in the audit trail (``quarantine-release``).
    """
    if inner is not None:
        body, _ = await present(ctx, job, inner, result, received=peer_trace(data), transit="peer", released=True)
    else:
        body = with_trace(annotate(data, result, authserv_id=ctx.settings.hostname, banner=False), job.sender)
    for addr in released:
        try:
            await ctx.io(ctx.local.deliver, addr, body, folder="INBOX")
        except Exception as exc:
            reason = f"local delivery failed: {type(exc).__name__}"
            await defer_or_bounce(ctx, job, data, [Attempt(addr, 451, "4.3.0", reason)], RELEASED)
            continue
        await ctx.record(job, addr, RecipientState.DELIVERED, reply="250 2.0.0 released by an admin and delivered",
                         event="delivered-released", outcome="accept", protection=RELEASED,
                         detail={"verdict": result.verdict, "failure": result.failure})  # fmt: skip


async def _deliver_report(ctx: Context, job: Job, data: bytes, result: SecurityResult, pending: list[str]) -> None:
    """A verified peer's clear report about our mail: delivered as received, marked for what it is.

    Never answered (it is a report), never bannered; a local delivery problem defers it."""
    results = peer_report_results(ctx.settings.hostname, result, job.peer_operator or "")
    body = with_trace(annotate(data, result, authserv_id=ctx.settings.hostname, banner=False, results=results),
                      job.sender)  # fmt: skip
    for addr in pending:
        try:
            await ctx.io(ctx.local.deliver, addr, body, folder="INBOX")
        except Exception as exc:
            reason = f"local delivery failed: {type(exc).__name__}"
            await defer_or_bounce(ctx, job, data, [Attempt(addr, 451, "4.3.0", reason)], PEER_TLS)
            continue
        await ctx.record(job, addr, RecipientState.DELIVERED,
                         reply="250 2.0.0 report from a verified peer delivered (content unsigned)",
                         event="delivered-peer-report", outcome="accept", protection=PEER_TLS,
                         detail={"verdict": result.verdict, "failure": result.failure,
                                 "peer": job.peer_operator})  # fmt: skip


async def _signed_only_peer(ctx: Context, job: Job, from_domain: str) -> bool:
    """Whether the verified peer that sent ``job`` may send mail from ``from_domain`` signed but not
    encrypted (``directory.facts.signed_only_accepted``; reused for ``PLAN_TTL`` seconds).

    Only for a message that came in on the inbound listener, where ``peer_operator`` is set once
    the peer's client certificate matched the trust list; never for anything else."""
    if job.origin != "inbound" or not job.peer_operator or not from_domain:
        return False
    from directory.facts import signed_only_accepted

    peer, domain = job.peer_operator.lower(), from_domain.lower()

    def read() -> bool:
        with ctx.read() as session:
            return signed_only_accepted(session, peer, domain)

    return await ctx.cached_io(("signed-only", peer, domain), read)


async def _mssante_mode(ctx: Context, job: Job, result: SecurityResult) -> SecurityResult:
    """A signed, unencrypted message from a peer that need not encrypt: accepted only when its
    From's domain is served by that same peer (then marked ``transport_peer`` for the
    Authentication-Results); else it is "not-encrypted", as from any other peer."""
    from_domain = (result.from_address or "").rpartition("@")[2]
    if result.failure is None and await _signed_only_peer(ctx, job, from_domain):
        return result.evolve(transport_peer=job.peer_operator)
    return result.evolve(encryption_required=True).with_failure(
        "not-encrypted", "message is not S/MIME enveloped-data")


async def _open(ctx: Context, data: bytes, pending: list[str], now: _dt.datetime, *,
                require_encryption: bool = True) -> tuple[bytes | None, SecurityResult]:  # fmt: skip
    if _is_pgp(data):
        def pgp_open() -> tuple[bytes | None, SecurityResult]:
            from gateway.crypto.openpgp import OpenPgp

            if ctx.openpgp is None:
                ctx.openpgp = OpenPgp(ctx.settings.gnupg_dir)
            return ctx.openpgp.open(data)  # type: ignore[no-any-return]

        return await ctx.io(pgp_open)
    try:
        candidates: list[KeyRef] = []
        for addr in pending:
            candidates.extend(await ctx.cached_io(("decrypt", addr), ctx.keys.decryption_keys, addr))
        trust = await ctx.cached_io(("trust",), ctx.keys.trust)
    except KeyStoreError as exc:
        return None, SecurityResult().with_failure("wrong-recipient", str(exc))
    unique = tuple(dict.fromkeys(candidates))
    return await ctx.crypto(open_job, data, unique, trust, now, require_encryption)


async def _quarantine(ctx: Context, job: Job, data: bytes, inner: bytes | None, result: SecurityResult,
                      pending: list[str]) -> None:  # fmt: skip
    reply = f"550 5.7.0 quarantined: {result.failure or 'not verified'}: {result.detail}"[:500]
    for addr in pending:
        await ctx.record(job, addr, RecipientState.QUARANTINED, reply=reply, event="quarantined",
                         outcome="refuse", detail={"security": result.audit_fields()})  # fmt: skip
    log.warning("quarantined queue_id=%s from=<%s> peer=%s recipients=%d reason=%s", job.id, job.sender,
                job.peer_operator or "-", len(pending), result.failure or "not-verified")  # fmt: skip
    for addr in pending:
        notice = quarantine_notice(hostname=ctx.settings.hostname, postmaster=ctx.postmaster, to=addr, job=job,
                                   failure=result.failure, now=ctx.now())  # fmt: skip
        await ctx.enqueue_receipt(job, notice, kind="notice", to=addr, event="quarantine-notice",
                                  detail={"failure": result.failure},
                                  dedupe_key=f"quarantine-notice|{job.id}")  # fmt: skip
    if not job.sender or is_report(data, envelope_sender=job.sender) or (inner and is_report(inner)):
        return
    req = mdn_request(inner) if inner else None
    if req is not None:
        for addr in pending:
            profile = ctx.settings.receipts.mdn_profile  # processed/error (RFC 8098) or Direct's failed
            mdn = build_mdn(reporting_ua=ctx.settings.hostname, to=job.sender, final_recipient=addr,
                            from_addr=mdn_from(profile, postmaster=ctx.postmaster, final_recipient=addr),
                            original=inner or data, disposition="failed", failed_form=profile,
                            error=f"security verification failed: {result.failure}", now=ctx.now())  # fmt: skip
            await ctx.enqueue_receipt(job, mdn, kind="mdn", to=job.sender, event="mdn-failed")
        return
    if ctx.settings.receipts.dsn_on_quarantine:
        await ctx.send_dsn(job, data, [
            DsnRecipient(addr, "failed", "5.7.0", f"message failed security verification ({result.failure})",
                         last_attempt=ctx.now())
            for addr in pending
        ])  # fmt: skip


async def _processed_mdns(ctx: Context, job: Job, inner: bytes, delivered: list[str]) -> None:
    if not delivered or not ctx.settings.receipts.mdn_processed:
        return
    if not job.sender or job.is_receipt or is_report(inner, envelope_sender=job.sender):
        return
    req = mdn_request(inner)
    if req is None:
        return
    if not mdn_goes_to_its_sender(req, inner, envelope_sender=job.sender):
        log.info("no MDN for %s: Disposition-Notification-To names neither the sender nor the From (RFC 8098 "
                 "section 2.1)", job.id)  # fmt: skip
        return
    for addr in delivered:
        dispositions = ["processed", "dispatched"] if req.dispatched else ["processed"]
        for disposition in dispositions:
            from_addr = mdn_from(ctx.settings.receipts.mdn_profile, postmaster=ctx.postmaster, final_recipient=addr)
            mdn = build_mdn(reporting_ua=ctx.settings.hostname, from_addr=from_addr, to=req.address,
                            final_recipient=addr, original=inner, disposition=disposition, now=ctx.now())  # fmt: skip
            await ctx.enqueue_receipt(job, mdn, kind="mdn", to=req.address, event=f"mdn-{disposition}")
