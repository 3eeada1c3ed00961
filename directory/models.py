"""The directory's tables: practitioners, organisations, mailboxes, domains, keys.

SQLAlchemy 2 typed models shared by SQLite (embedded default) and PostgreSQL.
Schema changes go through Alembic (``directory/migrations``); the queue and the
audit trail register their own tables on the same ``Base`` so one migration
history covers the whole database.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every mssgw table."""


class MailboxType(enum.StrEnum):
    PER = "PER"  # a practitioner's personal mailbox
    ORG = "ORG"  # an organisation's mailbox (e.g. a ward's secretariat)
    APP = "APP"  # an application's mailbox (e.g. e-prescription software)


class DomainKind(enum.StrEnum):
    LOCAL = "local"  # served by this operator
    TRUSTED = "trusted"  # a peer operator of the trust space
    BLOCKED = "blocked"  # refused, with a reason (consumer providers, admin blocks)


class Practitioner(Base):
    __tablename__ = "practitioners"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id_type: Mapped[str] = mapped_column(String(8))  # "RPPS" or "ADELI"
    identifier: Mapped[str] = mapped_column(String(16), unique=True)
    civility: Mapped[str | None] = mapped_column(String(16))
    last_name: Mapped[str] = mapped_column(String(128))
    first_name: Mapped[str] = mapped_column(String(128))
    profession_code: Mapped[str | None] = mapped_column(String(8))
    profession_label: Mapped[str | None] = mapped_column(String(128))
    specialty_code: Mapped[str | None] = mapped_column(String(16))
    specialty_label: Mapped[str | None] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    mailboxes: Mapped[list[Mailbox]] = relationship(back_populates="practitioner")

    @property
    def national_id(self) -> str:
        """The national identifier: ``8`` + RPPS (``0`` + ADELI)."""
        return ("8" if self.id_type == "RPPS" else "0") + self.identifier


class Organisation(Base):
    __tablename__ = "organisations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id_type: Mapped[str] = mapped_column(String(8))  # "FINESS", "SIRET", "SIREN", "RPPS-RANG"...
    identifier: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    __table_args__ = (UniqueConstraint("id_type", "identifier", name="uq_organisation_identifier"),)


class Domain(Base):
    __tablename__ = "domains"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    kind: Mapped[DomainKind] = mapped_column(Enum(DomainKind, native_enum=False, length=16))
    reason: Mapped[str | None] = mapped_column(Text)  # why it is blocked
    operator_dn: Mapped[str | None] = mapped_column(Text)  # peer's certificate identity (whitelist DN)
    relay: Mapped[str | None] = mapped_column(String(300))  # "host:port" of the peer's inbound
    use_mx: Mapped[bool] = mapped_column(Boolean, default=False)
    prefers_openpgp: Mapped[bool] = mapped_column(Boolean, default=False)
    # Whether this peer's mail must be encrypted end to end (S/MIME enveloped). False is the MSSanté
    # model: signed, over mutual TLS pinned to ``operator_dn`` (``service.signed_only_accepted``).
    require_encryption: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    source: Mapped[str] = mapped_column(String(32), default="admin")  # admin, whitelist, seed, init
    description: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Mailbox(Base):
    __tablename__ = "mailboxes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased
    domain: Mapped[str] = mapped_column(String(253), index=True)
    type: Mapped[MailboxType] = mapped_column(Enum(MailboxType, native_enum=False, length=3))
    local: Mapped[bool] = mapped_column(Boolean, default=False)  # ours, or a known remote address
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    display_name: Mapped[str | None] = mapped_column(String(256))
    practitioner_id: Mapped[int | None] = mapped_column(ForeignKey("practitioners.id"), index=True)
    organisation_id: Mapped[int | None] = mapped_column(ForeignKey("organisations.id"), index=True)
    service: Mapped[str | None] = mapped_column(String(256))  # "Service de rattachement"
    password_hash: Mapped[str | None] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(32), default="admin")
    # Whether the gateway files a copy of what this mailbox sends in its Sent folder: None follows
    # ``mailboxes.server_sent_copy`` (by mailbox type), True/False is the admin's choice for it.
    sent_copy: Mapped[bool | None] = mapped_column(Boolean, nullable=True, default=None)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    practitioner: Mapped[Practitioner | None] = relationship(back_populates="mailboxes")
    organisation: Mapped[Organisation | None] = relationship()


class Delegation(Base):
    """``delegate`` may send as (and read) the ``mailbox``, typically an ORG mailbox."""

    __tablename__ = "delegations"

    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), primary_key=True)
    delegate_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Certificate(Base):
    """An X.509 certificate: a mailbox's, a domain's, a trust anchor or a client identity."""

    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str | None] = mapped_column(String(320), index=True)  # mailbox or domain it belongs to
    purpose: Mapped[str] = mapped_column(String(16))  # sign, encrypt, smime, tls-client, server, anchor
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256, hex lower-case
    subject: Mapped[str] = mapped_column(Text)
    issuer: Mapped[str] = mapped_column(Text)
    serial: Mapped[str] = mapped_column(String(64))
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    not_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    pem: Mapped[str] = mapped_column(Text)
    # Where the private key is: ``sealed:key:<fingerprint>`` (a ``SealedSecret`` row, the store every
    # node reads) or, for keys written before migration 0009, a file (0600) under the data folder.
    key_path: Mapped[str | None] = mapped_column(Text)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revocation_reason: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("fingerprint", "purpose", "address", name="uq_certificate_use"),
        Index("ix_certificates_fingerprint", "fingerprint"),
    )


class PgpKey(Base):
    __tablename__ = "pgp_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    armored: Mapped[str] = mapped_column(Text)  # public key only
    # Our own key pair: the secret part is sealed in ``sealed_secrets`` as ``pgp:<fingerprint>`` and
    # imported into each node's GnuPG home (``gateway.crypto.keyring``).
    has_secret: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("address", "fingerprint", name="uq_pgp_key"),)


class SealedSecret(Base):
    """A secret sealed under the nodes' key-encryption key (AES-256-GCM, AAD = ``name``).

    Names: ``key:<certificate fingerprint>`` (PKCS#8 DER private key), ``pgp:<fingerprint>`` (an
    armored OpenPGP secret key), ``pseudonym-salt``.  ``directory.secrets`` seals and opens them."""

    __tablename__ = "sealed_secrets"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    kek_id: Mapped[str] = mapped_column(String(16))  # which key-encryption key sealed it (not the key)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
