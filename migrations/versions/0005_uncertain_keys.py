"""uncertain_keys: (user, key) pairs an unacknowledged update may have delivered

SPEC §6 "Uncertain keys": once an update may have reached ChartMogul without being
acknowledged, each of its keys is uncertain for that user until an update carrying
the key is acknowledged, whatever becomes of the update itself. Until now that was
known only from the update's own row (`in_flight_since`, `maybe_delivered`), which
stops counting once the update is superseded.

The upgrade carries that state over: every (user, key) of an update that was in
flight or may have been delivered, whatever its status now, unless an update of
that user acknowledged later (status `sent`, the same or a newer update id) carries
the key. `in_flight_since` is then cleared (and `maybe_delivered` set), since the
marks stand for it: runs turn what a killed run left in flight into marks the same
way. It gets an index, as every run start now looks for updates left in flight.
The downgrade drops the marks.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "uncertain_keys",
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("update_id", sa.Integer(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "key", name=op.f("pk_uncertain_keys")),
    )
    # `since`: when the update was handed over (in flight), else its last attempt.
    op.execute("""
        INSERT INTO uncertain_keys (user_id, key, update_id, since)
        SELECT c.user_id, c.key, MAX(u.id),
               MIN(COALESCE(u.in_flight_since,
                            (SELECT MAX(d.sent_at) FROM deliveries AS d
                             WHERE d.update_id = u.id),
                            u.observed_at))
        FROM updates AS u
        JOIN changes AS c ON c.update_id = u.id
        WHERE (u.in_flight_since IS NOT NULL OR u.maybe_delivered)
          AND NOT EXISTS (
              SELECT 1 FROM updates AS later
              JOIN changes AS lc ON lc.update_id = later.id
              WHERE later.status = 'sent' AND later.id >= u.id
                AND later.user_id = c.user_id AND lc.key = c.key)
        GROUP BY c.user_id, c.key
    """)
    op.execute(
        "UPDATE updates SET in_flight_since = NULL, maybe_delivered = true "
        "WHERE in_flight_since IS NOT NULL"
    )
    # Every run start looks for updates left in flight: an index makes that one probe.
    op.create_index("ix_updates_in_flight_since", "updates", ["in_flight_since"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_updates_in_flight_since", table_name="updates")
    op.drop_table("uncertain_keys")
