"""mailboxes: sent_copy, the per-mailbox choice of a server-side Sent copy

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 01:00:00

Why: mail clients save their own copy of what they send (IMAP APPEND to Sent), so a copy filed by
the gateway too is a duplicate; software sending over SMTP or the API saves none. The default
follows the mailbox type (``mailboxes.server_sent_copy``); NULL keeps it, true/false overrides it.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('mailboxes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sent_copy', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('mailboxes', schema=None) as batch_op:
        batch_op.drop_column('sent_copy')
