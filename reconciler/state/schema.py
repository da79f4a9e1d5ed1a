"""The state database's tables, as SQLAlchemy Core metadata.

Migrations in `migrations/` are the schema authority; this module mirrors them so
queries are written against named columns and `alembic check` can prove no drift.

    sync_runs     one row a run (SPEC §7, part of the contract)
    entry_keys    every key ever configured; retired ones stay, marked inactive
    acked         what ChartMogul acknowledged: (entity, id, key) → JSON value
    uncertain_keys (entity, id, key) for which ChartMogul may hold a value nobody
                  acknowledged: re-sent every run until an update carrying the key
                  is acknowledged (SPEC §6 "Uncertain keys")
    ack_versions  per-id counter, moved by every acknowledgement (message ids use it)
    updates       one update per contact or account and run: pending → sent/skipped/
                  rejected or superseded; body kept without sent_at so retries resend it
                  verbatim
    changes       the (id, key, old, new) rows of each update

`entity` is `contact` (a user, Send Contact) or `customer` (an account, Send Customer);
in customer rows the `user_id` column holds the account's group_id.
    deliveries    every HTTP attempt: status, latency, error excerpt
    run_lock      the single row that says which process is running a sync
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
    text,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


USER_ID = String(255)
KEY = String(255)
ENTITIES = ("contact", "customer")


def _entity() -> Column[str]:
    """Which kind of thing a row is about; rows written before accounts are contacts."""
    return Column("entity", String(16), nullable=False, server_default=text("'contact'"))


sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trigger", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("snapshot_at", UTCDateTime),
    # PostgreSQL sources: the id of the snapshot every query read (pg_current_snapshot).
    Column("source_snapshot", Text),
    Column("users_seen", Integer, nullable=False, default=0),
    Column("users_changed", Integer, nullable=False, default=0),
    Column("entered", Integer, nullable=False, default=0),
    Column("exited", Integer, nullable=False, default=0),
    Column("traits_changed", Integer, nullable=False, default=0),
    Column("sent", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("skipped", Integer, nullable=False, default=0),
    Column("rows_ignored", Integer, nullable=False, default=0),
    Column("pending", Integer, nullable=False, default=0),
    Column("resync_key", KEY),
    Column("resent", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("accounts_seen", Integer, nullable=False, server_default=text("0")),
    Column("accounts_changed", Integer, nullable=False, server_default=text("0")),
)

entry_keys = Table(
    "entry_keys",
    metadata,
    Column("key", KEY, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", Text, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime),
    _entity(),
)

acked = Table(
    "acked",
    metadata,
    Column("user_id", USER_ID, nullable=False),
    Column("key", KEY, nullable=False),
    Column("value", Text, nullable=False),
    Column("update_id", Integer, nullable=False),
    Column("acked_at", UTCDateTime, nullable=False),
    _entity(),
    PrimaryKeyConstraint("entity", "user_id", "key"),
)

# No foreign key to `updates`: the mark must outlive whatever becomes of the update
# (superseded, pruned); `update_id` only says which update last made it uncertain.
uncertain_keys = Table(
    "uncertain_keys",
    metadata,
    Column("user_id", USER_ID, nullable=False),
    Column("key", KEY, nullable=False),
    Column("update_id", Integer, nullable=False),
    Column("since", UTCDateTime, nullable=False),
    _entity(),
    PrimaryKeyConstraint("entity", "user_id", "key"),
)

ack_versions = Table(
    "ack_versions",
    metadata,
    Column("user_id", USER_ID, nullable=False),
    Column("version", Integer, nullable=False),
    _entity(),
    PrimaryKeyConstraint("entity", "user_id"),
)

updates = Table(
    "updates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False, unique=True),
    Column("user_id", USER_ID, nullable=False),
    Column("version", Integer, nullable=False),
    Column("resync_run_id", Integer),
    Column("run_id", Integer, ForeignKey("sync_runs.id"), nullable=False),
    Column("observed_at", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("body", Text, nullable=False),
    Column("note", Text),
    Column("attempts", Integer, nullable=False, default=0),
    # Handed to the sender and not yet recorded: it may have reached ChartMogul. The
    # next run turns what a killed run left here into `uncertain_keys` marks.
    Column("in_flight_since", UTCDateTime),
    # An attempt's outcome was unknown (no answer, or a 5xx that may follow work done);
    # a record for people: the diff reads `uncertain_keys`.
    Column("maybe_delivered", Boolean, nullable=False, server_default=false()),
    Column("settled_run_id", Integer),
    Column("settled_at", UTCDateTime),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    _entity(),
    Index("ix_updates_status_id", "status", "id"),
    Index("ix_updates_user_id", "user_id"),
    Index("ix_updates_in_flight_since", "in_flight_since"),
)

changes = Table(
    "changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("update_id", Integer, ForeignKey("updates.id", ondelete="CASCADE"), nullable=False),
    Column("run_id", Integer, nullable=False),
    Column("user_id", USER_ID, nullable=False),
    Column("key", KEY, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("old_value", Text),
    Column("new_value", Text, nullable=False),
    _entity(),
    Index("ix_changes_update_id", "update_id"),
    Index("ix_changes_user_id", "user_id"),
    Index("ix_changes_run_id", "run_id"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("update_id", Integer, ForeignKey("updates.id", ondelete="CASCADE"), nullable=False),
    Column("run_id", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("sent_at", UTCDateTime, nullable=False),
    Column("latency_ms", Float),
    Column("status_code", Integer),
    Column("outcome", String(16), nullable=False),
    Column("error", Text),
    Index("ix_deliveries_update_id", "update_id"),
    Index("ix_deliveries_run_id", "run_id"),
)

run_lock = Table(
    "run_lock",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("token", String(64), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("pid_started", String(64), nullable=False),
    Column("run_id", Integer),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("lease_until", UTCDateTime, nullable=False),
)
