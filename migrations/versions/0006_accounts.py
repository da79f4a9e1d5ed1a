"""accounts: the entity kind of every update, change and acknowledged value

Accounts (ChartMogul customers, sent with the Send Customer action) live beside
contacts in the same tables. `entity` (`contact` | `customer`) says which one a row
is about; for customer rows `user_id` holds the account's group_id. Every existing row
is a contact. The acknowledged state and the per-id version counter are keyed by
entity too, so a user and an account with the same id text never share state.
`uncertain_keys` gets the entity too. `entry_keys.entity` records which kind an
audience or trait key belongs to, and `sync_runs` counts accounts (SPEC §7).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONTACT = sa.text("'contact'")


def _entity() -> sa.Column[str]:
    return sa.Column("entity", sa.String(length=16), nullable=False, server_default=CONTACT)


def upgrade() -> None:
    with op.batch_alter_table("acked", schema=None) as batch_op:
        batch_op.add_column(_entity())
        batch_op.drop_constraint("pk_acked", type_="primary")
        batch_op.create_primary_key("pk_acked", ["entity", "user_id", "key"])
    with op.batch_alter_table("ack_versions", schema=None) as batch_op:
        batch_op.add_column(_entity())
        batch_op.drop_constraint("pk_ack_versions", type_="primary")
        batch_op.create_primary_key("pk_ack_versions", ["entity", "user_id"])
    with op.batch_alter_table("uncertain_keys", schema=None) as batch_op:
        batch_op.add_column(_entity())
        batch_op.drop_constraint("pk_uncertain_keys", type_="primary")
        batch_op.create_primary_key("pk_uncertain_keys", ["entity", "user_id", "key"])
    for table in ("updates", "changes", "entry_keys"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(_entity())
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("accounts_seen", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch_op.add_column(
            sa.Column("accounts_changed", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    # Account rows cannot be told apart from contacts once the column is gone.
    for table in ("acked", "ack_versions", "uncertain_keys", "updates", "changes", "entry_keys"):
        op.execute(f"DELETE FROM {table} WHERE entity <> 'contact'")
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("accounts_changed")
        batch_op.drop_column("accounts_seen")
    for table in ("updates", "changes", "entry_keys"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("entity")
    with op.batch_alter_table("ack_versions", schema=None) as batch_op:
        batch_op.drop_constraint("pk_ack_versions", type_="primary")
        batch_op.create_primary_key("pk_ack_versions", ["user_id"])
        batch_op.drop_column("entity")
    with op.batch_alter_table("uncertain_keys", schema=None) as batch_op:
        batch_op.drop_constraint("pk_uncertain_keys", type_="primary")
        batch_op.create_primary_key("pk_uncertain_keys", ["user_id", "key"])
        batch_op.drop_column("entity")
    with op.batch_alter_table("acked", schema=None) as batch_op:
        batch_op.drop_constraint("pk_acked", type_="primary")
        batch_op.create_primary_key("pk_acked", ["user_id", "key"])
        batch_op.drop_column("entity")
