"""The operations admins and the gateway perform on the directory.

Every ``mssgw directory`` / ``mssgw domains`` command is a thin shell over one
function here, and the gateway's policy reads the directory only through
``recipient_facts`` and ``sender_facts``. Functions take an open SQLAlchemy
``Session``; the caller owns the transaction. Problems are reported as
``DirectoryError`` with a sentence for a person.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Exists, Select, bindparam, exists, func, or_, select, true
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import BindParameter

from directory.consumer import CONSUMER_PROVIDERS, consumer_pattern_for
from directory.identifiers import (
    InvalidIdentifier,
    check_practitioner_id,
    normalise_address,
    normalise_domain,
)
from directory.models import (
    Certificate,
    Delegation,
    Domain,
    DomainKind,
    Mailbox,
    MailboxType,
    Organisation,
    PgpKey,
    Practitioner,
)
from gateway.core.errors import DirectoryError as DirectoryError  # re-exported: the directory's errors
from gateway.core.errors import NotFoundError as NotFoundError

#: Argon2id with RFC 9106 / OWASP parameters sized for a mail server that checks a
#: password on every new connection (19 MiB, 2 passes, 1 lane: tens of ms, not hundreds).
#: Hashes made with other parameters verify as before and are rehashed with these on the
#: next successful login (``verify_password``).
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19_456
ARGON2_PARALLELISM = 1
_HASHER = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB,
                         parallelism=ARGON2_PARALLELISM)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the account does not exist, so unknown users cost the same time."""
    return _HASHER.hash("mssgw-no-such-account")


# --- practitioners and organisations -------------------------------------------------


def add_practitioner(
    session: Session,
    *,
    identifier: str,
    last_name: str,
    first_name: str,
    id_type: str = "RPPS",
    profession_code: str | None = None,
    profession_label: str | None = None,
    specialty_code: str | None = None,
    specialty_label: str | None = None,
    civility: str | None = None,
) -> Practitioner:
    """Create or update a practitioner keyed on the (validated) RPPS or ADELI number."""
    kind, ident = check_practitioner_id(id_type, identifier)
    if not last_name.strip():
        raise DirectoryError("a practitioner needs a last name")
    row = session.scalar(select(Practitioner).where(Practitioner.identifier == ident))
    if row is None:
        row = Practitioner(id_type=kind, identifier=ident, last_name="", first_name="")
        session.add(row)
    row.last_name = last_name.strip()
    row.first_name = first_name.strip()
    row.civility = civility or row.civility
    row.profession_code = profession_code or row.profession_code
    row.profession_label = profession_label or row.profession_label
    row.specialty_code = specialty_code or row.specialty_code
    row.specialty_label = specialty_label or row.specialty_label
    row.active = True
    session.flush()
    return row


def find_practitioner(session: Session, identifier: str) -> Practitioner:
    value = identifier.strip()
    if len(value) == 12 and value.startswith("8"):
        value = value[1:]
    row = session.scalar(select(Practitioner).where(Practitioner.identifier == value))
    if row is None:
        raise NotFoundError(f"no practitioner with identifier {identifier}")
    return row


def upsert_organisation(session: Session, *, id_type: str, identifier: str, name: str) -> Organisation:
    row = session.scalar(
        select(Organisation).where(Organisation.id_type == id_type, Organisation.identifier == identifier)
    )
    if row is None:
        row = Organisation(id_type=id_type, identifier=identifier, name=name)
        session.add(row)
    elif name:
        row.name = name
    session.flush()
    return row


# --- domains ---------------------------------------------------------------------------


def get_domain(session: Session, name: str) -> Domain | None:
    return session.get(Domain, name.lower().rstrip("."))


def add_local_domain(session: Session, name: str) -> Domain:
    domain = normalise_domain(name)
    row = get_domain(session, domain) or Domain(name=domain, kind=DomainKind.LOCAL)
    row.kind = DomainKind.LOCAL
    row.reason = None
    row.source = row.source or "init"
    session.add(row)
    session.flush()
    return row


def trust_domain(
    session: Session,
    name: str,
    *,
    relay: str | None = None,
    operator_dn: str | None = None,
    use_mx: bool = False,
    prefers_openpgp: bool | None = None,
    source: str = "admin",
    description: str | None = None,
    require_encryption: bool | None = None,
) -> Domain:
    """Add (or update) a peer operator's domain to the trust list.

    ``require_encryption`` None keeps the row's setting; a new row requires end-to-end encryption,
    except one imported from the MSSanté whitelist with its operator DN: the trust space's model is
    signed mail over mutual TLS pinned to that DN, and requiring more would quarantine it all."""
    domain = normalise_domain(name)
    if relay is not None:
        _check_relay(relay)
    row = get_domain(session, domain)
    if row is not None and row.kind == DomainKind.LOCAL:
        raise DirectoryError(f"{domain} is one of our own domains; it cannot be a peer")
    if row is None or row.kind != DomainKind.TRUSTED:
        mssante = source == "whitelist" and bool(operator_dn or (row is not None and row.operator_dn))
        if row is None:
            row = Domain(name=domain, kind=DomainKind.TRUSTED, source=source)
            session.add(row)
        row.require_encryption = not mssante
    if require_encryption is not None:
        row.require_encryption = require_encryption
    row.kind = DomainKind.TRUSTED
    row.reason = None
    if relay is not None:
        row.relay = relay
    if operator_dn is not None:
        row.operator_dn = operator_dn
    if description is not None:
        row.description = description
    if prefers_openpgp is not None:
        row.prefers_openpgp = prefers_openpgp
    row.use_mx = use_mx or row.use_mx
    row.source = source
    session.flush()
    return row


def _check_relay(relay: str) -> None:
    host, sep, port = relay.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DirectoryError(f"relay must be HOST:PORT, got {relay!r}")


def block_domain(session: Session, name: str, *, reason: str, source: str = "admin") -> Domain:
    domain = name.strip().lower().rstrip(".")
    if not domain.endswith(".*"):
        domain = normalise_domain(domain)
    if not reason.strip():
        raise DirectoryError("blocking a domain needs a reason (--reason)")
    row = get_domain(session, domain)
    if row is not None and row.kind == DomainKind.LOCAL:
        raise DirectoryError(f"{domain} is one of our own domains; it cannot be blocked")
    if row is None:
        row = Domain(name=domain, kind=DomainKind.BLOCKED, source=source)
        session.add(row)
    row.kind = DomainKind.BLOCKED
    row.reason = reason.strip()
    row.source = source
    session.flush()
    return row


def remove_domain(session: Session, name: str) -> None:
    row = get_domain(session, name)
    if row is None:
        raise NotFoundError(f"no domain {name} in the trust list")
    if row.kind == DomainKind.LOCAL:
        raise DirectoryError(f"{name} is one of our own domains")
    session.delete(row)


def seed_consumer_domains(session: Session) -> int:
    """Insert the consumer-provider blocklist (existing rows are left as the admin set them)."""
    existing = set(session.scalars(select(Domain.name)))
    added = 0
    for pattern in CONSUMER_PROVIDERS:
        if pattern not in existing:
            reason = f"consumer mail provider ({pattern}): health data may not be sent to consumer mailboxes"
            session.add(Domain(name=pattern, kind=DomainKind.BLOCKED, reason=reason, source="seed"))
            added += 1
    session.flush()
    return added


def domain_dict(row: Domain) -> dict[str, Any]:
    return {
        "domain": row.name,
        "kind": row.kind.value,
        "relay": row.relay,
        "operator_dn": row.operator_dn,
        "use_mx": row.use_mx,
        "prefers_openpgp": row.prefers_openpgp,
        "require_encryption": encryption_required(row) if row.kind == DomainKind.TRUSTED else None,
        "reason": row.reason,
        "source": row.source,
    }


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


def list_domains(session: Session, kind: str | None = None) -> list[dict[str, Any]]:
    query = select(Domain).order_by(Domain.kind, Domain.name)
    if kind:
        query = query.where(Domain.kind == DomainKind(kind))
    return [domain_dict(row) for row in session.scalars(query)]


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


# --- mailboxes -------------------------------------------------------------------------


def hash_password(password: str) -> str:
    if len(password) < 12:
        raise DirectoryError("a password must have at least 12 characters")
    return _HASHER.hash(password)


def add_mailbox(
    session: Session,
    address: str,
    *,
    type: MailboxType | str,
    rpps: str | None = None,
    organisation: Organisation | None = None,
    display_name: str | None = None,
    service: str | None = None,
    password: str | None = None,
    source: str = "admin",
) -> Mailbox:
    """Create or update a mailbox. Its domain must be ours or a trusted peer's."""
    addr = normalise_address(address)
    domain = addr.rpartition("@")[2]
    dom = get_domain(session, domain)
    if dom is None or dom.kind == DomainKind.BLOCKED:
        raise DirectoryError(
            f"{domain} is neither one of our domains nor a trusted operator's: "
            f"add it with 'mssgw domains trust {domain} --relay HOST:PORT' first"
        )
    try:
        mtype = MailboxType(str(type).upper())
    except ValueError:
        raise DirectoryError(f"mailbox type must be PER, ORG or APP, got {type!r}") from None
    practitioner = find_practitioner(session, rpps) if rpps else None
    if mtype is MailboxType.PER and practitioner is None and source == "admin":
        raise DirectoryError("a PER mailbox belongs to a practitioner: give --rpps")
    row = session.scalar(select(Mailbox).where(Mailbox.address == addr))
    if row is None:
        row = Mailbox(address=addr, domain=domain, type=mtype, source=source)
        session.add(row)
    row.type = mtype
    row.local = dom.kind == DomainKind.LOCAL
    row.active = True
    if practitioner is not None:
        row.practitioner = practitioner
    if organisation is not None:
        row.organisation = organisation
    if display_name:
        row.display_name = display_name
    elif practitioner is not None and not row.display_name:
        row.display_name = f"{practitioner.first_name} {practitioner.last_name}".strip()
    if service:
        row.service = service
    if password is not None:
        if not row.local:
            raise DirectoryError(f"{addr} is a remote address: only local mailboxes have a password")
        row.password_hash = hash_password(password)
    session.flush()
    return row


def get_mailbox(session: Session, address: str) -> Mailbox:
    addr = normalise_address(address)
    row = session.scalar(select(Mailbox).where(Mailbox.address == addr))
    if row is None:
        raise NotFoundError(f"no mailbox {addr} in the directory")
    return row


def set_password(session: Session, address: str, password: str) -> None:
    row = get_mailbox(session, address)
    if not row.local:
        raise DirectoryError(f"{row.address} is a remote address: only local mailboxes have a password")
    row.password_hash = hash_password(password)


def verify_password(session: Session, address: str, password: str) -> Mailbox | None:
    """The active local mailbox when the password is right, else ``None``.

    Unknown, remote, deactivated and password-less accounts cost one Argon2
    verification too, so timing does not tell which addresses exist.
    """
    try:
        addr = normalise_address(address)
    except InvalidIdentifier:
        addr = ""
    row = session.scalar(select(Mailbox).where(Mailbox.address == addr)) if addr else None
    stored = row.password_hash if row is not None and row.password_hash else _dummy_hash()
    ok: bool
    try:
        ok = _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok or row is None or not row.password_hash or not row.active or not row.local:
        return None
    if _HASHER.check_needs_rehash(stored):
        row.password_hash = _HASHER.hash(password)
    return row


def delegate(session: Session, mailbox: str, delegate_to: str, *, revoke: bool = False) -> None:
    """Let ``delegate_to`` send as (and read) ``mailbox``; ``revoke`` takes that back."""
    owner = get_mailbox(session, mailbox)
    other = get_mailbox(session, delegate_to)
    if owner.id == other.id:
        raise DirectoryError("a mailbox cannot be delegated to itself")
    if not owner.local or not other.local:
        raise DirectoryError("delegation is between mailboxes of this operator")
    existing = session.get(Delegation, (owner.id, other.id))
    if revoke:
        if existing is None:
            raise DirectoryError(f"{other.address} has no delegation on {owner.address}")
        session.delete(existing)
    elif existing is None:
        session.add(Delegation(mailbox_id=owner.id, delegate_id=other.id))
    session.flush()


def set_active(session: Session, address: str, active: bool) -> Mailbox:
    row = get_mailbox(session, address)
    row.active = active
    session.flush()
    return row


def set_sent_copy(session: Session, address: str, value: bool | None) -> Mailbox:
    """Choose whether the gateway files a Sent copy for ``address`` (None: its type's default)."""
    row = get_mailbox(session, address)
    if not row.local:
        raise DirectoryError(f"{row.address} is not one of our mailboxes: it has no Sent folder here")
    row.sent_copy = value
    session.flush()
    return row


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


def delegates_of(session: Session, mailbox: Mailbox) -> list[str]:
    who = aliased(Mailbox)
    return list(
        session.scalars(
            select(who.address)
            .join(Delegation, Delegation.delegate_id == who.id)
            .where(Delegation.mailbox_id == mailbox.id)
            .order_by(who.address)
        )
    )


def delegated_to(session: Session, mailbox: Mailbox) -> list[str]:
    """The mailboxes ``mailbox`` may act for (besides itself)."""
    owner = aliased(Mailbox)
    return list(
        session.scalars(
            select(owner.address)
            .join(Delegation, Delegation.mailbox_id == owner.id)
            .where(Delegation.delegate_id == mailbox.id, owner.active.is_(True))
            .order_by(owner.address)
        )
    )


def mailbox_dict(session: Session, row: Mailbox, *, detail: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "address": row.address,
        "type": row.type.value,
        "local": row.local,
        "active": row.active,
        "display_name": row.display_name,
        "rpps": row.practitioner.identifier if row.practitioner else None,
        "organisation": row.organisation.name if row.organisation else None,
    }
    if detail:
        data["sent_copy"] = "default" if row.sent_copy is None else ("on" if row.sent_copy else "off")
        p = row.practitioner
        data.update(
            {
                "practitioner": None
                if p is None
                else {
                    "id_type": p.id_type,
                    "identifier": p.identifier,
                    "national_id": p.national_id,
                    "last_name": p.last_name,
                    "first_name": p.first_name,
                    "profession": p.profession_label or p.profession_code,
                    "specialty": p.specialty_label or p.specialty_code,
                    "active": p.active,
                },
                "service": row.service,
                "has_password": bool(row.password_hash),
                "delegates": delegates_of(session, row),
                "may_send_as": delegated_to(session, row),
                "certificates": [
                    {"purpose": c.purpose, "fingerprint": c.fingerprint, "not_after": c.not_after.isoformat(),
                     "revoked": c.revoked_at is not None}
                    for c in session.scalars(select(Certificate).where(Certificate.address == row.address))
                ],
                "openpgp_keys": list(
                    session.scalars(select(PgpKey.fingerprint).where(PgpKey.address == row.address))
                ),
                "source": row.source,
            }
        )
    return data


def list_mailboxes(
    session: Session,
    *,
    domain: str | None = None,
    type: str | None = None,
    local_only: bool = False,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    query = select(Mailbox).order_by(Mailbox.address)
    if domain:
        query = query.where(Mailbox.domain == domain.lower())
    if type:
        query = query.where(Mailbox.type == MailboxType(type.upper()))
    if local_only:
        query = query.where(Mailbox.local.is_(True))
    if limit:
        query = query.limit(limit)
    return [mailbox_dict(session, row) for row in session.scalars(query)]


def search(session: Session, text: str, *, limit: int = 50) -> list[dict[str, Any]]:
    """Mailboxes whose address, practitioner name, RPPS or organisation matches ``text``."""
    needle = f"%{text.strip().lower()}%"
    query = (
        select(Mailbox)
        .outerjoin(Practitioner, Mailbox.practitioner_id == Practitioner.id)
        .outerjoin(Organisation, Mailbox.organisation_id == Organisation.id)
        .where(
            or_(
                Mailbox.address.like(needle),
                func.lower(Practitioner.last_name).like(needle),
                func.lower(Practitioner.first_name).like(needle),
                Practitioner.identifier.like(needle),
                func.lower(Organisation.name).like(needle),
                func.lower(Mailbox.display_name).like(needle),
            )
        )
        .order_by(Mailbox.address)
        .limit(limit)
    )
    return [mailbox_dict(session, row) for row in session.scalars(query)]


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


# --- what policy asks ------------------------------------------------------------------


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
