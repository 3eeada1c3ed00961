"""queue: the sender's DSN parameters (RFC 3461), ENVID/RET per message, NOTIFY/ORCPT per recipient

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 02:00:00

Why: the submission listeners offer the DSN extension; what the sender asked (which DSNs it
wants, its envelope id, the original recipient address) must survive in the queue until the
last retry builds the DSN. All nullable: existing rows keep today's behaviour (failure and
delay DSNs, no Original-Envelope-Id).
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('queue_messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dsn_envid', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('dsn_ret', sa.String(length=4), nullable=True))
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dsn_notify', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('dsn_orcpt', sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.drop_column('dsn_orcpt')
        batch_op.drop_column('dsn_notify')
    with op.batch_alter_table('queue_messages', schema=None) as batch_op:
        batch_op.drop_column('dsn_ret')
        batch_op.drop_column('dsn_envid')
