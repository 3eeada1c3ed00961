"""sealed_secrets: private keys, OpenPGP secret keys and the pseudonym salt, sealed under the nodes' KEK

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 03:10:00

Why: nodes that share one PostgreSQL and no disk must each sign, decrypt and pseudonymise with the
same secrets.  They are stored here encrypted (AES-256-GCM) under a key-encryption key that every
node is given and the database never holds (``directory.secrets``).  Existing key files keep
working until ``mssgw certs seal-keys`` (or ``mssgw init``) moves them in.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('sealed_secrets',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kek_id', sa.String(length=16), nullable=False),
    sa.Column('nonce', sa.LargeBinary(), nullable=False),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('sealed_secrets')
