"""sync_runs.source_snapshot

Every source query of a run reads one snapshot of the source. On PostgreSQL the run
records that snapshot's id (`pg_current_snapshot()`, `xmin:xmax:xip_list`), so two runs
can be compared: a transaction committed before one run's snapshot and after another's
shows which run saw it. NULL for other sources.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-27 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_snapshot", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("source_snapshot")
