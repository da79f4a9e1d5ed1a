"""Record fields, diffed like traits: account fields (SPEC §9) and, with `[profile]
send_changes = true`, contact fields.

Each field of a record is one `snap` row under the key `@<column>` (`@name`, `@city`,
`@email`): entry keys are `[a-z0-9_]+`, so a field key never meets one. A field's value
is canonical JSON text of a string. Diffing fields as traits gives SPEC §9's rules at
once: a new or different value is a change and is acknowledged per field; a field that
becomes empty has no row, which is not a change by itself.

An account's `group_id` is one of its fields (`@group_id`, the accounts query's columns
except `user_id` are diffed): its value never changes, so it makes every account of the
accounts query a change on the first run, also one with no other field.

    account_raw(group_id, user_id, data)   every row of the [accounts] query
    accounts(group_id, user_id, data)      one per account: the row with the smallest
                                           user_id as text (code point order); ties go to
                                           the smaller data
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection

from reconciler.config import ACCOUNT_FIELDS, PROFILE_FIELDS, Config
from reconciler.errors import SourceEntryError
from reconciler.pipeline.source import (
    ReadStats,
    Unrepresentable,
    is_blank,
    read_rows,
    to_json,
    user_id_text,
)
from reconciler.state.backend import Backend

FIELD_PREFIX = "@"
ACCOUNTS = "[accounts]"


def field_keys(config: Config) -> list[tuple[str, str]]:
    """(entity, key) of every field this config diffs."""
    keys: list[tuple[str, str]] = []
    if config.accounts_query:
        keys += [("customer", f"{FIELD_PREFIX}{name}") for name in ("group_id", *ACCOUNT_FIELDS)]
    if config.profile_send_changes and config.profile_query:
        keys += [("contact", f"{FIELD_PREFIX}{name}") for name in PROFILE_FIELDS]
    return keys


def is_field(key: str) -> bool:
    return key.startswith(FIELD_PREFIX)


def account_fields(group_id: str, names: Sequence[str], values: Sequence[Any]) -> dict[str, str]:
    """The non-blank fields of one accounts row, each as the text it is sent as.

    Numbers become their text, an integral float as an integer (`75001.0` → "75001");
    dates and times their ISO 8601 text. Binary values, NaN and infinities raise
    `SourceEntryError` naming the account and the column.
    """
    fields = {}
    for name, value in zip(names, values, strict=True):
        if is_blank(value):
            continue
        if isinstance(value, str):
            fields[name] = value
            continue
        if type(value) is int:  # postal codes, mostly: skip the JSON round trip
            fields[name] = str(value)
            continue
        try:
            text = to_json(value)
        except Unrepresentable as exc:
            raise SourceEntryError(ACCOUNTS, f'account "{group_id}": {name}: {exc}') from None
        decoded = json.loads(text)
        if isinstance(decoded, str):
            fields[name] = decoded
        elif isinstance(decoded, float) and decoded.is_integer():
            fields[name] = str(int(decoded))
        else:
            fields[name] = text
    return fields


def load_accounts(query: str, source: Connection, state: Connection) -> int:
    """Run the accounts query into `accounts` and its fields into `snap`.

    Returns how many rows were ignored (no group_id). Raises `SourceEntryError` when
    the query's rows cannot be used (a missing column, an unrepresentable value): the
    run fails, as for the profile, since account bodies could not be built right.
    """
    from reconciler.pipeline.snapshot import _load  # here: snapshot.py imports this module

    stats = ReadStats()
    _load(
        state, "account_raw", ("group_id", "user_id", "data"), _account_rows(source, query, stats)
    )
    # "Smallest user_id as text": code point order on both backends (PostgreSQL's
    # default collation would follow the locale); rows without a user_id come last.
    db = Backend(state)
    collate = db.collate_c
    state.exec_driver_sql(f"""
        INSERT INTO accounts (group_id, user_id, data)
        SELECT group_id, user_id, data FROM (
            SELECT group_id, user_id, data, ROW_NUMBER() OVER (
                PARTITION BY group_id
                ORDER BY CASE WHEN user_id IS NULL THEN 1 ELSE 0 END,
                         user_id{collate}, data{collate}) AS pick
            FROM account_raw) AS ranked
        WHERE pick = 1
    """)
    state.exec_driver_sql("CREATE UNIQUE INDEX accounts_group ON accounts (group_id)")
    db.analyze("accounts")
    insert_field_rows(state, "customer", "accounts", "group_id")
    return stats.ignored


def _account_rows(
    source: Connection, query: str, stats: ReadStats
) -> Iterable[list[tuple[Any, ...]]]:
    """(group_id, user_id or None, JSON object of the fields, group_id included)."""
    for chunk in read_rows(source, ACCOUNTS, query, ("group_id", "user_id"), ACCOUNT_FIELDS, stats):
        names = stats.columns[2:]
        rows = []
        for group_id, user_id, *values in chunk:
            try:
                user = user_id_text(user_id)
            except Unrepresentable as exc:
                raise SourceEntryError(ACCOUNTS, f'account "{group_id}": {exc}') from None
            data = {"group_id": group_id, **account_fields(group_id, names, values)}
            rows.append((group_id, user, json.dumps(data, sort_keys=True, ensure_ascii=False)))
        yield rows


def insert_field_rows(state: Connection, entity: str, table: str, id_column: str) -> None:
    """One `snap` row per field of each record of `table` (its `data` JSON object)."""
    source, value = Backend(state).json_each(table, "data")
    state.exec_driver_sql(f"""
        INSERT INTO snap (entity, user_id, key, value)
        SELECT '{entity}', t.{id_column}, '{FIELD_PREFIX}' || j.key, {value} FROM {source}
    """)
