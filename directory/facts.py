"""What the gateway asks the directory: the facts its policy rules and pipeline steps decide on.

The SMTP edge and the API read recipients and senders only through ``recipient_facts`` and
``sender_facts`` (inputs of ``gateway.policy``); the pipeline asks ``signer_label``,
``wants_sent_copy`` and ``signed_only_accepted``; the running gateway watches the trust list
through ``trust_counter`` and ``trust_signature``. Reads only: nothing here changes a row.
Functions take an open SQLAlchemy ``Session``; an address that is not one answers with facts
saying so (``valid_syntax=False``), never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Exists, Select, bindparam, exists, func, or_, select, true
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import BindParameter

from directory.consumer import consumer_pattern_for
from directory.identifiers import InvalidIdentifier, normalise_address
from directory.models import (
    Certificate,
    Delegation,
    Domain,
    DomainKind,
    Mailbox,
    MailboxType,
    PgpKey,
)


def get_domain(session: Session, name: str) -> Domain | None:
    return session.get(Domain, name.lower().rstrip("."))


def encryption_required(row: Domain) -> bool:
    """Whether mail from this peer must be encrypted end to end: yes unless the admin (or the
    whitelist) relaxed it and the peer's identity is pinned (``operator_dn``), the MSSanté model."""
    return bool(row.require_encryption) or not row.operator_dn


def signed_only_accepted(session: Session, peer_domain: str, from_domain: str) -> bool:
    """May a signed, unencrypted message whose From is in ``from_domain`` be accepted when it
    came over mutual TLS from the verified peer operator of ``peer_domain``?

    Both domains must be trusted peers that do not require end-to-end encryption, with the same
    pinned operator identity (one operator serving both): the transport then vouches for the
    operator, and the signature (checked by the caller) for the author. Anything else: no."""
    peer, origin = get_domain(session, peer_domain), get_domain(session, from_domain)
    if peer is None or origin is None or peer.kind != DomainKind.TRUSTED or origin.kind != DomainKind.TRUSTED:
        return False
    if encryption_required(peer) or encryption_required(origin):
        return False
    return peer.name == origin.name or _same_dn(peer.operator_dn or "", origin.operator_dn or "")


def _same_dn(a: str, b: str) -> bool:
    """``CN=x, O=y`` and ``/O=y/CN=x`` compare equal (RDN order, spaces and case aside)."""

    def norm(dn: str) -> frozenset[tuple[str, str]]:
        parts = [p for p in re.split(r"[,/]", dn) if "=" in p]
        return frozenset((k.strip().upper(), v.strip().lower()) for k, v in (p.split("=", 1) for p in parts))

    return bool(a and b) and norm(a) == norm(b)


#: The key of ``trust_signature`` under which the trust anchors are summed up.
ANCHORS_KEY = "*anchors*"


def trust_counter(session: Session) -> tuple[object, ...]:
    """A cheap summary that changes whenever ``trust_signature`` may have: two aggregate reads.

    Counts and maxima of the domain and certificate tables (a row added, removed, updated,
    revoked, or given a key changes one of them); the running gateway reads this every few
    seconds and computes the per-domain ``trust_signature`` only when it moved.
    """
    domains = session.execute(select(func.count(), func.max(Domain.updated_at)).select_from(Domain)).one()
    certs = session.execute(select(func.count(), func.max(Certificate.id), func.count(Certificate.revoked_at),
                                   func.count(Certificate.key_path)).select_from(Certificate)).one()  # fmt: skip
    return (*domains, *certs)


def trust_signature(session: Session) -> dict[str, str]:
    """A digest per domain of what decides exchanges with it, and one for the trust anchors.

    The running gateway compares two of these every few seconds (``gateway.app``): a
    changed digest means an admin changed that domain's trust, route, pinned identity or
    certificates (``mssgw peers``, ``domains``, ``certs import``, ``certs trust-anchor``),
    so TLS contexts and caches are rebuilt and that domain's deferred mail is retried now,
    without a restart. Two small indexed reads; no row is changed.
    """
    import hashlib

    parts: dict[str, list[str]] = {}
    for d in session.execute(select(Domain.name, Domain.kind, Domain.relay, Domain.operator_dn, Domain.use_mx,
                                    Domain.prefers_openpgp, Domain.reason, Domain.require_encryption)):  # fmt: skip
        parts.setdefault(d.name, []).append(repr(tuple(d)))
    for c in session.execute(select(Certificate.address, Certificate.purpose, Certificate.fingerprint,
                                    Certificate.revoked_at, Certificate.key_path)
                             .order_by(Certificate.fingerprint, Certificate.purpose)):  # fmt: skip
        owner = ANCHORS_KEY if c.purpose == "anchor" else (c.address or "").rpartition("@")[2]
        parts.setdefault(owner, []).append(repr(tuple(c)))
    return {k: hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest() for k, v in parts.items()}


def wants_sent_copy(session: Session, address: str, *, default_types: Iterable[str], origin: str) -> bool:
    """Whether a message ``address`` sent gets a server-side copy in its Sent folder.

    Mail clients (Thunderbird, Outlook, neomutt) APPEND their own copy, so a server copy would be a
    duplicate: the mailbox's own setting decides, else its type (``default_types``, the types whose
    senders are software), else the way in: the HTTP API (``origin == "api"``) has no client that
    keeps a copy. An address that is not a local mailbox gets none."""
    try:
        addr = normalise_address(address)
    except InvalidIdentifier:
        return False
    row = session.scalar(select(Mailbox).where(Mailbox.address == addr, Mailbox.local.is_(True)))
    if row is None:
        return False
    if row.sent_copy is not None:
        return bool(row.sent_copy)
    return origin == "api" or row.type.value in {t.upper() for t in default_types}


def signer_label(session: Session, email: str) -> str | None:
    """How a signer is shown to a reader: "Dr Anne Martin (RPPS 10000000009)" or the mailbox's name."""
    try:
        addr = normalise_address(email)
    except InvalidIdentifier:
        return None
    box = session.scalar(select(Mailbox).where(Mailbox.address == addr))
    if box is None:
        return None
    p = box.practitioner
    if p is not None:
        title = {"DR": "Dr", "PR": "Pr"}.get((p.civility or "").upper(), "")
        if not title and p.profession_code in {"10", "40"}:  # physicians and dentists are doctors
            title = "Dr"
        return " ".join(filter(None, [title, p.first_name, p.last_name])) + f" ({p.id_type} {p.identifier})"
    return f"{box.display_name} <{addr}>" if box.display_name else None


@dataclass(frozen=True)
class RecipientFacts:
    """What the directory knows about a recipient address (input of the recipient rules)."""

    address: str
    valid_syntax: bool
    domain: str = ""
    domain_kind: str | None = None  # local, trusted, blocked, or None when unknown
    domain_reason: str | None = None
    consumer_pattern: str | None = None
    mailbox_known: bool = False
    mailbox_active: bool = False
    mailbox_local: bool = False
    mailbox_type: str | None = None
    has_certificate: bool = False  # the recipient's own encryption certificate
    has_openpgp_key: bool = False
    domain_has_certificate: bool = False  # a domain-bound certificate (Direct Project)
    operator_dn: str | None = None  # the peer's TLS identity (MSSanté whitelist)
    prefers_openpgp: bool = False  # the peer domain asks for OpenPGP when the recipient has a key

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _blocked_reason(session: Session, domain: str) -> tuple[str | None, str | None]:
    """The reason a domain (or a parent, or a pattern) is blocked, and the consumer pattern."""
    labels = domain.split(".")
    parents = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    rows = session.scalars(
        select(Domain).where(Domain.kind == DomainKind.BLOCKED, or_(Domain.name.in_(parents), Domain.name.like("%.*")))
    ).all()
    from directory.consumer import matches

    for row in rows:
        if matches(row.name, domain):
            pattern = row.name if row.source == "seed" else consumer_pattern_for(domain)
            return row.reason, pattern
    return None, None


def recipient_facts(session: Session, address: str) -> RecipientFacts:
    """Everything the recipient rules need, in one round trip for the usual case (one per RCPT)."""
    try:
        addr = normalise_address(address)
    except InvalidIdentifier:
        return RecipientFacts(address=address, valid_syntax=False)
    domain = addr.rpartition("@")[2]
    row = session.execute(_FACTS_QUERY, {"addr": addr, "domain": domain}).first()
    kind = DomainKind(row.kind) if row is not None else None
    if row is None or kind == DomainKind.BLOCKED:
        reason, pattern = (row.reason, None) if row is not None else _blocked_reason(session, domain)
        return RecipientFacts(
            address=addr,
            valid_syntax=True,
            domain=domain,
            domain_kind="blocked" if reason else None,
            domain_reason=reason,
            consumer_pattern=pattern or consumer_pattern_for(domain),
        )
    assert kind is not None  # row is not None here
    trusted = kind == DomainKind.TRUSTED
    return RecipientFacts(
        address=addr,
        valid_syntax=True,
        domain=domain,
        domain_kind=kind.value,
        mailbox_known=row.type is not None,
        mailbox_active=bool(row.active),
        mailbox_local=bool(row.local),
        mailbox_type=MailboxType(row.type).value if row.type is not None else None,
        has_certificate=trusted and bool(row.has_cert),
        has_openpgp_key=trusted and bool(row.has_key),
        domain_has_certificate=trusted and bool(row.domain_cert),
        operator_dn=row.operator_dn,
        prefers_openpgp=trusted and bool(row.prefers_openpgp),
    )


def _build_facts_query() -> Select[Any]:
    """The domain row, the mailbox (outer-joined) and whether mail for it can be protected.

    Built once: constructing a statement costs more than running it on this hot path.
    """
    addr: BindParameter[str] = bindparam("addr")
    domain: BindParameter[str] = bindparam("domain")

    def cert_of(owner: BindParameter[str]) -> Exists:
        return exists().where(
            Certificate.address == owner,
            Certificate.purpose.in_(("encrypt", "smime")),
            Certificate.revoked_at.is_(None),
        )

    mailbox = select(Mailbox.type, Mailbox.active, Mailbox.local).where(Mailbox.address == addr).subquery()
    return (
        select(
            Domain.kind,
            Domain.reason,
            Domain.operator_dn,
            Domain.prefers_openpgp,
            mailbox.c.type,
            mailbox.c.active,
            mailbox.c.local,
            cert_of(addr).label("has_cert"),
            cert_of(domain).label("domain_cert"),
            exists().where(PgpKey.address == addr, PgpKey.revoked.is_(False)).label("has_key"),
        )
        .select_from(Domain.__table__.outerjoin(mailbox, true()))
        .where(Domain.name == domain)
    )


_FACTS_QUERY = _build_facts_query()


@dataclass(frozen=True)
class SenderFacts:
    """May the authenticated ``identity`` use ``address`` as its sender?"""

    identity: str
    address: str
    valid_syntax: bool
    owned: bool = False  # the identity's own mailbox
    delegated: bool = False  # a mailbox delegated to the identity
    address_active: bool = False


def sender_facts(session: Session, identity: str, address: str) -> SenderFacts:
    try:
        addr = normalise_address(address)
    except InvalidIdentifier:
        return SenderFacts(identity=identity, address=address, valid_syntax=False)
    ident = identity.lower()
    if addr == ident:
        box = session.scalar(select(Mailbox).where(Mailbox.address == addr))
        return SenderFacts(ident, addr, True, owned=True, address_active=bool(box and box.active))
    owner = aliased(Mailbox)
    who = aliased(Mailbox)
    row = session.execute(
        select(owner.active)
        .join(Delegation, Delegation.mailbox_id == owner.id)
        .join(who, Delegation.delegate_id == who.id)
        .where(owner.address == addr, who.address == ident)
    ).first()
    return SenderFacts(ident, addr, True, delegated=row is not None, address_active=bool(row and row[0]))
