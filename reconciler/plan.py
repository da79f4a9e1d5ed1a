"""Turning the diff into Identify updates: one per changed user (SPEC §1.3, §7).

Streams `diff` ordered by user, joined with the user's acknowledged version and
contact fields, and writes one row per user into the temp table `plan` with its
deterministic message id and its Send Contact body. Only changed users pass through
Python; everything else stays in SQL.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection

from .contact import build_contact
from .source import TRUE

BATCH = 5_000


def message_id(user_id: str, version: int, resync_run_id: int | None,
               changed: Sequence[tuple[str, str]]) -> str:
    """The id of one logical update: same user, keys, values, version, resync ⇒ same id.

    `changed` holds (key, canonical JSON value) pairs in key order. Keys are
    `[a-z0-9_]` and JSON text escapes control characters, so the separators below
    cannot occur inside a part; the user id is length-prefixed.
    """
    canonical = "\x1f".join((f"{len(user_id)}:{user_id}", str(version), str(resync_run_id),
                              *(f"{key}={value}" for key, value in changed)))
    digest = hashlib.sha256(canonical.encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


@dataclass
class PlanCounts:
    users: int = 0
    entered: int = 0
    exited: int = 0
    traits_changed: int = 0
    skipped: int = 0
    # Bodies planned without a profile field that failed validation (SPEC §5).
    emails_left_out: int = 0
    linked_in_left_out: int = 0


def count_diff(state: Connection) -> PlanCounts:
    """What `fill_plan` would count, from `diff` in SQL, skips aside (none can occur
    with custom attributes: every body carries its changed keys) and fields left out
    (not counted: only building the bodies finds them)."""
    users, entered, exited, traits = state.exec_driver_sql(f"""
        SELECT COUNT(DISTINCT user_id),
               SUM(CASE WHEN kind = 'audience' AND new_value = '{TRUE}' THEN 1 ELSE 0 END),
               SUM(CASE WHEN kind = 'audience' AND new_value <> '{TRUE}' THEN 1 ELSE 0 END),
               SUM(CASE WHEN kind = 'trait' THEN 1 ELSE 0 END)
        FROM diff""").one()
    return PlanCounts(users=users, entered=entered or 0, exited=exited or 0,
                      traits_changed=traits or 0)


def fill_plan(state: Connection, observed_at: datetime, resync_run_id: int | None,
              custom_attributes: bool, max_users: int | None = None) -> PlanCounts:
    """Write `plan` from `diff` (its first `max_users` users by id, if given); return
    what it holds."""
    counts = PlanCounts()
    mark = "?" if state.dialect.name == "sqlite" else "%s"
    insert = f"INSERT INTO plan VALUES ({', '.join([mark] * 8)})"
    # DBAPI cursors: this loop sees every changed user, and SQLAlchemy's per-row
    # machinery would cost more than the work itself.
    writer = state.connection.cursor()
    batch: list[tuple[Any, ...]] = []
    with closing(_changed_users(state)) as changed_users:
        for seq, (user_id, rows) in enumerate(changed_users, 1):
            if max_users is not None and seq > max_users:
                break
            version = rows[0][4] or 0
            forced = any(row[3] for row in rows)
            resync = resync_run_id if forced else None
            changed = [(row[0], row[2]) for row in rows]
            mid = message_id(user_id, version, resync, changed)
            profile = json.loads(rows[0][5]) if rows[0][5] else {}
            contact = build_contact(mid, observed_at, user_id, profile,
                                    [(key, json.loads(value)) for key, value in changed],
                                    custom_attributes)
            note = "; ".join(n for n in (contact.skip, contact.note) if n) or None
            batch.append((seq, user_id, mid, version, resync, contact.text,
                          "skipped" if contact.skip else "pending", note))
            counts.users += 1
            counts.skipped += contact.skip is not None
            if contact.left_out:
                counts.emails_left_out += "email" in contact.left_out
                counts.linked_in_left_out += "linked_in" in contact.left_out
            for _key, kind, value, _forced, _version, _profile in rows:
                if kind == "trait":
                    counts.traits_changed += 1
                elif value == TRUE:
                    counts.entered += 1
                else:
                    counts.exited += 1
            if len(batch) >= BATCH:
                writer.executemany(insert, batch)
                batch = []
    if batch:
        writer.executemany(insert, batch)
    writer.close()
    state.exec_driver_sql("CREATE INDEX plan_user ON plan (user_id)")
    state.exec_driver_sql("CREATE INDEX plan_message ON plan (message_id)")
    return counts


def _changed_users(state: Connection) -> Generator[tuple[str, list[tuple[Any, ...]]]]:
    """(user_id, [(key, kind, new_value, forced, version, profile), ...]) by user."""
    raw = state.connection.driver_connection
    assert raw is not None
    # A server-side cursor on PostgreSQL, so the diff is streamed, never held whole;
    # `plan` is written on this same connection meanwhile, which both backends allow.
    reader = raw.cursor("plan_diff") if state.dialect.name == "postgresql" else raw.cursor()
    reader.execute("""
        SELECT d.user_id, d.key, d.kind, d.new_value, d.forced, v.version, p.data
        FROM diff AS d
        LEFT JOIN ack_versions AS v ON v.user_id = d.user_id
        LEFT JOIN profile AS p ON p.user_id = d.user_id
        ORDER BY d.user_id, d.key
    """)
    try:
        rows = iter(lambda: reader.fetchmany(BATCH), [])
        for user_id, group in groupby((row for chunk in rows for row in chunk),
                                      key=itemgetter(0)):
            yield user_id, [tuple(row[1:]) for row in group]
    finally:
        reader.close()
