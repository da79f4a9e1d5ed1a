"""Snapshotting the source into temporary tables of the state database.

The snapshot lives in TEMP tables on the run's own connection: a dry run and a real
run never see each other's rows, a killed process leaves nothing behind, and SQLite
keeps them out of the main database file (no write lock taken). Loading is bulk:
SQLite gets plain executemany into an unindexed table and the index afterwards;
PostgreSQL gets COPY.

    snap(user_id, key, value, entity)   one row per audience membership / trait value
                                        (and field, see fields.py) of a contact or an
                                        account (entity `customer`, user_id = group_id)
    profile(user_id, data)              one contact-field JSON object per user
    accounts(group_id, user_id, data)   one account-field JSON object per account
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from reconciler.config import PROFILE_FIELDS, Config, Entry
from reconciler.errors import SourceEntryError
from reconciler.pipeline import workspace
from reconciler.pipeline.fields import field_keys, insert_field_rows, load_accounts
from reconciler.pipeline.source import TRUE, ReadStats, profile_fields, read_rows, trait_json
from reconciler.pipeline.source_snapshot import SourceSnapshot
from reconciler.state.backend import Backend


@dataclass
class Snapshot:
    """What was loaded: which entries made it, which failed and why."""

    loaded: list[Entry] = field(default_factory=list)
    failed: dict[str, SourceEntryError] = field(default_factory=dict)  # key → error
    rows_ignored: int = 0
    users_seen: int = 0
    # The source moment every query read (source_snapshot.begin_snapshot).
    source: SourceSnapshot = field(default_factory=lambda: SourceSnapshot(datetime.now(UTC)))
    accounts_seen: int = 0
    # (entity, key) of the fields diffed this run (fields.py)
    fields: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failed_keys(self) -> list[str]:
        return sorted(self.failed)


def create_temp_tables(state: Connection) -> None:
    """(Re)create the run's workspace (workspace.py) on this connection."""
    workspace.create(state)


def drop_temp_tables(state: Connection) -> None:
    workspace.drop(state)


def take_snapshot(config: Config, source: Connection, state: Connection) -> Snapshot:
    """Run every audience and trait query (of users and accounts) into `snap`, then the
    accounts query and its fields (and, with `[profile] send_changes`, the whole
    profile and its fields); otherwise the profile comes later (`load_profile`).

    An entry whose query returns unusable data is recorded in `Snapshot.failed` and
    its rows removed: the run goes on without that key, and nothing is sent or
    retracted for it. `rows_ignored` counts audience and trait rows without a user_id
    (or group_id), and accounts rows without a group_id. An unusable accounts query or
    profile raises `SourceEntryError`: bodies could not be built right.
    """
    snapshot = Snapshot()
    for entry in config.entries:
        stats = ReadStats()
        guard = _Guard()
        columns = (
            ("user_id", "key", "value", "entity")
            if entry.entity == "customer"
            else ("user_id", "key", "value")
        )
        _load(state, "snap", columns, guard(_entry_rows(source, entry, stats)))
        if guard.error is not None:
            state.exec_driver_sql(f"DELETE FROM snap WHERE key = {_param(state)}", (entry.key,))
            snapshot.failed[entry.key] = guard.error
        else:
            snapshot.loaded.append(entry)
        snapshot.rows_ignored += stats.ignored
    traits = [e.key for e in snapshot.loaded if e.kind == "trait"]
    conflicts = [] if _index_snap(state) else _trait_conflicts(state, traits)
    for key, user_id in conflicts:
        conflicted = config.entry_for_key(key)
        assert conflicted is not None
        who, column = (
            ("account", "group_id") if conflicted.entity == "customer" else ("user", "user_id")
        )
        snapshot.failed[key] = SourceEntryError(
            conflicted.label,
            f'{who} "{user_id}" has two different values; make the query '
            f"return one value per {who} (GROUP BY {column})",
        )
        snapshot.loaded.remove(conflicted)
        state.exec_driver_sql(f"DELETE FROM snap WHERE key = {_param(state)}", (key,))
    # Statistics before the count: without them PostgreSQL plans the DISTINCT for 200
    # ids and hashes a million in dozens of batches on disk (3.5 s at 1M users).
    db = Backend(state)
    db.analyze("snap")
    snapshot.users_seen = _distinct_ids(state, "contact")
    if config.accounts_query:
        snapshot.rows_ignored += load_accounts(config.accounts_query, source, state)
    if config.profile_send_changes and config.profile_query:
        load_profile(config, source, state, everyone=True)
        insert_field_rows(state, "contact", "profile", "user_id")
    snapshot.fields = field_keys(config)
    if snapshot.fields:  # their rows, in the statistics too
        db.analyze("snap")
    # No account entry and no [accounts]: no account rows to count (a scan spared).
    if config.accounts_query or any(e.entity == "customer" for e in config.entries):
        snapshot.accounts_seen = _distinct_ids(state, "customer")
    return snapshot


def _distinct_ids(state: Connection, entity: str) -> int:
    return int(
        state.exec_driver_sql(
            "SELECT COUNT(*) FROM (SELECT DISTINCT user_id FROM snap "
            f"WHERE entity = '{entity}') AS u"
        ).scalar_one()
    )


def _entry_rows(
    source: Connection, entry: Entry, stats: ReadStats
) -> Iterable[list[tuple[Any, ...]]]:
    if entry.entity == "customer":
        yield from _account_entry_rows(source, entry, stats)
    elif entry.kind == "audience":
        for chunk in read_rows(source, entry.label, entry.query, ("user_id",), stats=stats):
            yield [(user_id, entry.key, TRUE) for (user_id,) in chunk]
    else:
        for chunk in read_rows(source, entry.label, entry.query, ("user_id", "value"), stats=stats):
            # A NULL (or blank) trait value means "no value": the same as no row.
            rows = [
                (user_id, entry.key, trait_json(entry.label, user_id, value))
                for user_id, value in chunk
            ]
            yield [row for row in rows if row[2] is not None]


def _account_entry_rows(
    source: Connection, entry: Entry, stats: ReadStats
) -> Iterable[list[tuple[Any, ...]]]:
    """(group_id, key, value, "customer") rows of an account audience or trait."""
    if entry.kind == "audience":
        for chunk in read_rows(source, entry.label, entry.query, ("group_id",), stats=stats):
            yield [(group_id, entry.key, TRUE, "customer") for (group_id,) in chunk]
    else:
        for chunk in read_rows(
            source, entry.label, entry.query, ("group_id", "value"), stats=stats
        ):
            rows = [
                (
                    group_id,
                    entry.key,
                    trait_json(entry.label, group_id, value, "account"),
                    "customer",
                )
                for group_id, value in chunk
            ]
            yield [row for row in rows if row[2] is not None]


class _Guard:
    """Ends a chunk stream quietly on a source error and keeps the error.

    A bulk load (COPY especially) must finish cleanly for the transaction to stay
    usable; the failed entry's partial rows are deleted afterwards.
    """

    def __init__(self) -> None:
        self.error: SourceEntryError | None = None

    def __call__(self, chunks: Iterable[list[tuple[Any, ...]]]) -> Iterable[list[tuple[Any, ...]]]:
        try:
            yield from chunks
        except SourceEntryError as exc:
            self.error = exc


# Below this many changed users, profile rows of other users are dropped as they are
# read instead of being stored; the set of ids costs ~100 bytes a user.
FILTER_PROFILE_BELOW = 100_000


def load_profile(
    config: Config,
    source: Connection,
    state: Connection,
    first_users: int | None = None,
    everyone: bool = False,
) -> None:
    """Fill `profile` with the contact fields of the users in `diff`.

    The profile query runs only when some user has something to send, and only the
    rows of those users are kept (with `first_users`, of the first users by id only:
    a dry run's sample). Several rows for one user: the one whose JSON form sorts
    first is used, so the choice does not depend on the source's row order.

    With `everyone` (the snapshot, under `[profile] send_changes`, before the diff) it
    reads every user's row; the call after the diff then has nothing left to do.
    """
    if config.profile_send_changes and not everyone:
        return  # the snapshot loaded every user's profile already
    if everyone:
        if config.profile_query:
            _load(
                state,
                "profile_raw",
                ("user_id", "data"),
                _profile_rows(source, config.profile_query, None),
            )
        _group_profile(state)
        return
    users = "SELECT DISTINCT user_id FROM diff WHERE entity = 'contact'"
    if first_users is not None:
        users = f"{users} ORDER BY user_id LIMIT {int(first_users)}"
    changed = state.exec_driver_sql(f"SELECT COUNT(*) FROM ({users}) AS d").scalar_one()
    if config.profile_query and changed:
        wanted = None
        if changed < FILTER_PROFILE_BELOW:
            wanted = {row[0] for row in state.exec_driver_sql(users)}
        _load(
            state,
            "profile_raw",
            ("user_id", "data"),
            _profile_rows(source, config.profile_query, wanted),
        )
    _group_profile(state)


def _group_profile(state: Connection) -> None:
    """`profile` from `profile_raw`: one row per user.

    A profile query returns one row per user as a rule: when a unique index on
    `profile_raw` proves it, that table becomes `profile` as it is, with no copy.
    """
    db = Backend(state)
    try:
        with state.begin_nested():  # on PostgreSQL a failed statement ends the transaction
            state.exec_driver_sql("CREATE UNIQUE INDEX profile_user ON profile_raw (user_id)")
    except IntegrityError:
        state.exec_driver_sql(
            "INSERT INTO profile (user_id, data) SELECT user_id, MIN(data) "
            "FROM profile_raw GROUP BY user_id"
        )
        state.exec_driver_sql("CREATE UNIQUE INDEX profile_user ON profile (user_id)")
    else:
        state.exec_driver_sql(f"DROP TABLE {db.temp('profile')}")
        state.exec_driver_sql(f"ALTER TABLE {db.temp('profile_raw')} RENAME TO profile")
    db.analyze("profile")


def _profile_rows(
    source: Connection, query: str, wanted: set[str] | None
) -> Iterable[list[tuple[Any, ...]]]:
    """(user_id, JSON object of the non-empty contact fields), as text."""
    stats = ReadStats()
    for chunk in read_rows(source, "[profile]", query, ("user_id",), PROFILE_FIELDS, stats):
        fields = stats.columns[1:]
        rows = []
        for user_id, *values in chunk:
            if wanted is not None and user_id not in wanted:
                continue
            data = profile_fields(user_id, fields, values)
            rows.append((user_id, json.dumps(data, sort_keys=True, ensure_ascii=False)))
        yield rows


def _index_snap(state: Connection) -> bool:
    """Index `snap` by (user_id, key); return whether it holds one row per (user_id, key).

    The common snapshot has no duplicate rows: a unique index proves it while it is
    built, and the diff then reads `snap` as it is, with no trait conflict to look for.
    A query that returned a user twice (equal audience or trait rows, or a trait's two
    values) fails the unique index; `snap` then gets a plain index over its values, and
    the conflict scan and the diff's DISTINCT deal with the duplicates.
    """
    # The entity after the key: ids of a user and an account rarely meet, so comparisons
    # end before it (measured: 6 % of the snapshot's time at 1M users with it first).
    try:
        with state.begin_nested():  # on PostgreSQL a failed statement ends the transaction
            state.exec_driver_sql(
                "CREATE UNIQUE INDEX snap_user_key ON snap (user_id, key, entity)"
            )
        return True
    except IntegrityError:
        state.exec_driver_sql("CREATE INDEX snap_user_key ON snap (user_id, key, value, entity)")
        return False


def _trait_conflicts(state: Connection, trait_keys: list[str]) -> list[tuple[str, str]]:
    """One (key, user_id) per trait with two different values for one user."""
    found = []
    for key in trait_keys:
        row = state.exec_driver_sql(
            f"SELECT user_id FROM snap WHERE key = {_param(state)} GROUP BY user_id "
            "HAVING MIN(value) <> MAX(value) LIMIT 1",
            (key,),
        ).first()
        if row is not None:
            found.append((key, row[0]))
    return found


def _param(state: Connection) -> str:
    return Backend(state).mark


def _load(
    state: Connection, table: str, columns: tuple[str, ...], chunks: Iterable[list[tuple[Any, ...]]]
) -> None:
    Backend(state).load(table, columns, chunks)
