"""domains: require_encryption, whether a peer's mail must be encrypted end to end

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 03:00:00

Why: the MSSanté model between operators is a signed message over mutual TLS pinned to the
operator's certificate; a peer that sends that way had its mail quarantined as "not encrypted".
Each peer now says whether it must encrypt end to end. Existing rows keep requiring it (true):
an upgrade never relaxes what was accepted; an admin relaxes a peer explicitly
('mssgw peers add --no-require-encryption', 'mssgw domains trust --no-require-encryption').
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('domains', schema=None) as batch_op:
        batch_op.add_column(sa.Column('require_encryption', sa.Boolean(), nullable=False,
                                      server_default=sa.true()))


def downgrade() -> None:
    with op.batch_alter_table('domains', schema=None) as batch_op:
        batch_op.drop_column('require_encryption')
