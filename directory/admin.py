"""The operations admins perform on the directory: practitioners, organisations, domains, mailboxes, delegations.

Every ``mssgw directory`` / ``mssgw domains`` command is a thin shell over one function here.
Functions take an open SQLAlchemy ``Session``; the caller owns the transaction. Problems are
reported as ``DirectoryError`` (``NotFoundError`` for an unknown name) with a sentence for a
person; both are re-exported here for the commands that catch them. What the gateway reads on
its hot paths lives in ``directory.facts``; password hashing in ``directory.passwords``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, aliased

from directory.consumer import CONSUMER_PROVIDERS
from directory.facts import encryption_required, get_domain
from directory.identifiers import check_practitioner_id, normalise_address, normalise_domain
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
from directory.passwords import hash_password
from gateway.core.errors import DirectoryError as DirectoryError  # re-exported: the directory's errors
from gateway.core.errors import NotFoundError as NotFoundError


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


def list_domains(session: Session, kind: str | None = None) -> list[dict[str, Any]]:
    query = select(Domain).order_by(Domain.kind, Domain.name)
    if kind:
        query = query.where(Domain.kind == DomainKind(kind))
    return [domain_dict(row) for row in session.scalars(query)]


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
