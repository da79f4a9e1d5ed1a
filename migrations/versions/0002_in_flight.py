"""updates.in_flight_since and updates.maybe_delivered

An update handed to the sender may reach ChartMogul even when no acknowledgement is
recorded: the process is killed with it in flight, or the connection drops after the
request went out. `in_flight_since` is set when it is handed over and cleared when
its attempts are recorded; `maybe_delivered` records an attempt whose outcome is
unknown. A superseded update with either has its keys' current values re-sent.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 00:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("updates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("in_flight_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("maybe_delivered", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("updates", schema=None) as batch_op:
        batch_op.drop_column("maybe_delivered")
        batch_op.drop_column("in_flight_since")
