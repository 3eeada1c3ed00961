"""queue: per-recipient dedupe, parked messages, purged spool bytes, claim generation

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 21:00:00

Why: a peer sends one transaction per protection group (and re-sends recipients that got a
4xx at RCPT) with the same Message-ID, so a dedupe key per message dropped recipients; it is
now unique per (key, recipient) in ``queue_dedupe``.  ``parked`` keeps quarantined messages
out of the claims; ``purged_at`` says when the spool bytes were removed; ``claim_gen`` fences
the outcomes of a worker whose lease was taken over.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}  # SQLite's unique constraint has no name


def _unique_name() -> str:
    return "queue_messages_dedupe_key_key" if op.get_bind().dialect.name == "postgresql" \
        else "uq_queue_messages_dedupe_key"


def upgrade() -> None:
    op.create_table('queue_dedupe',
    sa.Column('dedupe_key', sa.String(length=400), nullable=False),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('queue_id', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['queue_id'], ['queue_messages.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('dedupe_key', 'recipient')
    )
    with op.batch_alter_table('queue_dedupe', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_queue_dedupe_queue_id'), ['queue_id'], unique=False)
    # Keys already accepted stay accepted, for every recipient of the message that carried them.
    op.execute(
        "INSERT INTO queue_dedupe (dedupe_key, recipient, queue_id, created_at) "
        "SELECT m.dedupe_key, lower(r.address), m.id, m.created_at FROM queue_messages m "
        "JOIN queue_recipients r ON r.message_id = m.id WHERE m.dedupe_key IS NOT NULL "
        "GROUP BY m.dedupe_key, lower(r.address), m.id, m.created_at"
    )
    with op.batch_alter_table('queue_messages', schema=None, naming_convention=_NAMING) as batch_op:
        batch_op.drop_constraint(_unique_name(), type_='unique')
        batch_op.add_column(sa.Column('parked', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('claim_gen', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_queue_messages_dedupe_key'), ['dedupe_key'], unique=False)
    # Quarantined messages with nothing else pending were claimed at every poll: park them.
    op.execute(
        "UPDATE queue_messages SET parked = true WHERE done = false AND NOT EXISTS (SELECT 1 FROM "
        "queue_recipients r WHERE r.message_id = queue_messages.id AND r.state IN ('queued', 'deferred'))"
    )


def downgrade() -> None:
    with op.batch_alter_table('queue_messages', schema=None, naming_convention=_NAMING) as batch_op:
        batch_op.drop_index(batch_op.f('ix_queue_messages_dedupe_key'))
        batch_op.drop_column('claim_gen')
        batch_op.drop_column('purged_at')
        batch_op.drop_column('parked')
        batch_op.create_unique_constraint(_unique_name(), ['dedupe_key'])
    with op.batch_alter_table('queue_dedupe', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_queue_dedupe_queue_id'))
    op.drop_table('queue_dedupe')
