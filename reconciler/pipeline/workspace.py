"""The run's workspace: its temporary tables, declared once, on the run's connection.

A run (or a dry run) snapshots, diffs and plans in TEMP tables of its own state
connection: a dry run and a real run never see each other's rows, a killed process
leaves nothing behind, and SQLite keeps them out of the main database file. Each stage
documents what it reads and writes; the columns are declared here and nowhere else.

    snap(user_id, key, value, entity)           one row per membership, trait value or
                                                field of a user or account   snapshot.py
    profile_raw(user_id, data)                  contact fields as read       snapshot.py
    profile(user_id, data)                      one row per user             snapshot.py
    account_raw(group_id, user_id, data)        accounts as read             fields.py
    accounts(group_id, user_id, data)           one row per account          fields.py
    run_keys(key, kind, forced, failed, entity) the keys this run diffs      diff.py
    uncertain(entity, user_id, key)             keys to re-send (SPEC §6)    diff.py
    diff(user_id, key, kind, new_value, old_value, forced, entity)
                                                every (id, key) to send      diff.py
    kept(user_id, update_id, entity)            live updates left as they are diff.py
    plan(seq, user_id, message_id, version, resync_run_id, body, status, note, entity)
                                                one planned update per id    plan.py

Indexes are built by the stage that fills a table, after filling it (bulk loads are
faster into an unindexed table).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)

from reconciler.state.backend import Backend

metadata = MetaData()


def _entity() -> Column[str]:
    # Rows written without an entity are about contacts.
    return Column("entity", Text, nullable=False, server_default=text("'contact'"))


def _temp(name: str, *columns: Column[Any] | PrimaryKeyConstraint) -> Table:
    return Table(name, metadata, *columns, prefixes=["TEMPORARY"])


snap = _temp(
    "snap",
    Column("user_id", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("value", Text, nullable=False),
    _entity(),
)
profile_raw = _temp(
    "profile_raw", Column("user_id", Text, nullable=False), Column("data", Text, nullable=False)
)
profile = _temp("profile", Column("user_id", Text, nullable=False), Column("data", Text))
account_raw = _temp(
    "account_raw",
    Column("group_id", Text, nullable=False),
    Column("user_id", Text),
    Column("data", Text, nullable=False),
)
accounts = _temp(
    "accounts",
    Column("group_id", Text, nullable=False),
    Column("user_id", Text),
    Column("data", Text, nullable=False),
)
run_keys = _temp(
    "run_keys",
    Column("key", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("forced", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    _entity(),
    PrimaryKeyConstraint("entity", "key"),
)
uncertain = _temp(
    "uncertain",
    Column("entity", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("key", Text, nullable=False),
    PrimaryKeyConstraint("entity", "user_id", "key"),
)
diff = _temp(
    "diff",
    Column("user_id", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("new_value", Text, nullable=False),
    Column("old_value", Text),
    Column("forced", Integer, nullable=False),
    _entity(),
)
kept = _temp(
    "kept",
    Column("user_id", Text, nullable=False),
    Column("update_id", Integer, nullable=False),
    _entity(),
)
plan = _temp(
    "plan",
    Column("seq", Integer, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("resync_run_id", Integer),
    Column("body", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("note", Text),
    _entity(),
)


def create(state: Connection) -> None:
    """(Re)create every table of the workspace, empty, on this connection."""
    Backend(state).bulk_settings()
    _drop_each(state)
    metadata.create_all(state, checkfirst=False)


def drop(state: Connection) -> None:
    """Drop every table of the workspace; the connection stays usable.

    On SQLite, outside a transaction, by closing the connection (its next use opens a
    new one): dropping a large temporary table frees its pages one by one, 0.2-0.3 s
    of a no-change run at 100k users, while closing discards the temporary file.
    """
    if Backend(state).name == "sqlite" and not state.in_transaction():
        state.invalidate()
        return
    _drop_each(state)


def _drop_each(state: Connection) -> None:
    db = Backend(state)
    for table in reversed(metadata.sorted_tables):
        state.exec_driver_sql(f"DROP TABLE IF EXISTS {db.temp(table.name)}")
