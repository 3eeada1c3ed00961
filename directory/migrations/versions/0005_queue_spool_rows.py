"""queue_spool: message bytes in the database when nodes share PostgreSQL

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 01:30:00

Why: nodes that share one PostgreSQL and no disk must each read the bytes of any queued message;
the bytes are written in the acceptance transaction and deleted in the one that makes the
message final (``gateway.queue.spool.DatabaseSpool``).  The table exists on SQLite too, unused
there (one node keeps fsynced spool files).  On PostgreSQL the column is stored EXTERNAL: out of
line and never compressed (most messages are S/MIME ciphertext).
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('queue_spool',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['name'], ['queue_messages.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('name')
    )
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE queue_spool ALTER COLUMN data SET STORAGE EXTERNAL')


def downgrade() -> None:
    op.drop_table('queue_spool')
