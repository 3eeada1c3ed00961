"""audit_records: one hash chain per gateway node (node, seq)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 02:00:00

Why: every append took one cluster-wide lock to extend the single chain, so the commits of all
nodes went one at a time.  Each node now extends its own chain (``audit.node``), locked per
node; existing records form the chain of node "" (a lone node keeps it, hashes unchanged).
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_COLUMNS = ("seq", "ts", "event", "outcome", "actor", "client", "sender", "recipient", "queue_id", "rule", "reply",
            "detail", "prev_hash", "hash")
_INDEXES = {"ix_audit_recipient": ["recipient"], "ix_audit_sender": ["sender"], "ix_audit_ts": ["ts"]}


def _rebuild_sqlite(per_node: bool) -> None:
    """SQLite cannot change a primary key: a new table, the rows copied in order, the old one dropped."""
    keys = ["node", "seq"] if per_node else ["seq"]
    columns: list[sa.schema.SchemaItem] = [
        *([sa.Column("node", sa.String(length=64), server_default="", nullable=False)] if per_node else []),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=320), nullable=True),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.Column("sender", sa.String(length=320), nullable=True),
        sa.Column("recipient", sa.String(length=320), nullable=True),
        sa.Column("queue_id", sa.String(length=32), nullable=True),
        sa.Column("rule", sa.String(length=64), nullable=True),
        sa.Column("reply", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
    ]
    op.create_table("audit_records_rebuilt", *columns, sa.PrimaryKeyConstraint(*keys))
    names = ", ".join(_COLUMNS)
    where = " WHERE node = ''" if not per_node else ""  # a way back keeps the lone node's chain only
    op.execute(f"INSERT INTO audit_records_rebuilt ({names}) SELECT {names} FROM audit_records{where} ORDER BY seq")
    for index in _INDEXES:
        op.drop_index(index, table_name="audit_records")
    op.drop_table("audit_records")
    op.rename_table("audit_records_rebuilt", "audit_records")
    for index, cols in _INDEXES.items():
        op.create_index(index, "audit_records", cols, unique=False)


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.add_column('audit_records', sa.Column('node', sa.String(length=64), server_default='', nullable=False))
        op.drop_constraint('audit_records_pkey', 'audit_records', type_='primary')
        op.create_primary_key('audit_records_pkey', 'audit_records', ['node', 'seq'])
        return
    _rebuild_sqlite(per_node=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DELETE FROM audit_records WHERE node <> ''")
        op.drop_constraint('audit_records_pkey', 'audit_records', type_='primary')
        op.create_primary_key('audit_records_pkey', 'audit_records', ['seq'])
        op.drop_column('audit_records', 'node')
        return
    _rebuild_sqlite(per_node=False)
