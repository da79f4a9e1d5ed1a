"""The diff (SPEC §1.2): the snapshot against what ChartMogul acknowledged, in SQL.

Fills two temp tables on the run's connection:

    diff(user_id, key, kind, new_value, old_value, forced, entity)
        every (user, key) to send: a member not acknowledged as one (`true`), an
        acknowledged member gone from the audience (`false`), a trait (or field, kind
        `field`, see fields.py) whose value differs from the acknowledged one; in a
        resync, every current value of the resynced keys too (`forced = 1`). Accounts
        are rows with entity `customer` (user_id = group_id) and are diffed alike.
    kept(user_id, update_id, entity)
        live updates (pending, or rejected and so blocking) that still describe the
        current state: they stay as they are, with their message id, and their users
        leave the diff. Every other live update is superseded by the plan.

Keys of entries that failed this run are neither diffed nor used to judge live
updates: nothing is sent or retracted on a key whose state is unknown.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import Connection

from .config import Entry
from .schema import ENTITIES
from .source import FALSE, TRUE


def fill_run_keys(state: Connection, loaded: list[Entry], failed: Collection[str],
                  resync_keys: Collection[str],
                  fields: Collection[tuple[str, str]] = ()) -> None:
    """The keys this run diffs (and which of them a resync forces), as a temp table.

    `fields` are the (entity, key) of the record fields diffed (fields.py). A failed
    key is failed for both entities: entry keys are unique across them.
    """
    prefix = "temp." if state.dialect.name == "sqlite" else ""
    state.exec_driver_sql(f"DROP TABLE IF EXISTS {prefix}run_keys")
    state.exec_driver_sql("CREATE TEMP TABLE run_keys (key TEXT NOT NULL, kind TEXT NOT NULL,"
                          " forced INTEGER NOT NULL, failed INTEGER NOT NULL,"
                          " entity TEXT NOT NULL DEFAULT 'contact', PRIMARY KEY (entity, key))")
    rows: list[tuple[str, str, int, int, str]] = [
        (e.key, e.kind, int(e.key in resync_keys), 0, e.entity) for e in loaded]
    rows += [(key, "field", int(key in resync_keys), 0, entity) for entity, key in fields]
    rows += [(key, "", 0, 1, entity) for key in failed for entity in ENTITIES]
    if rows:
        mark = "?" if state.dialect.name == "sqlite" else "%s"
        state.exec_driver_sql(f"INSERT INTO run_keys VALUES ({', '.join([mark] * 5)})", rows)
    if state.dialect.name == "postgresql":
        # Without statistics, joins on (entity, key) are estimated at a few rows, and the
        # planner probes `acked` once per snapshot row instead of hashing it.
        state.exec_driver_sql("ANALYZE run_keys")


def fill_diff(state: Connection) -> None:
    """Compute `diff` from `snap`, `run_keys` and `acked`."""
    if state.dialect.name == "postgresql":
        # The DISTINCT subquery hides `snap`'s statistics, so joins on (entity, key) are
        # estimated at a few dozen rows and the planner probes `acked` by index once per
        # snapshot row (measured 2.2 s against 1.2 s hashed, 300k users, no change).
        # This statement is bulk work whatever the sizes: hash it.
        state.exec_driver_sql("SET LOCAL enable_nestloop = off")
    state.exec_driver_sql(f"""
        INSERT INTO diff (entity, user_id, key, kind, new_value, old_value, forced)
        SELECT s.entity, s.user_id, s.key, k.kind, s.value, a.value, k.forced
        FROM (SELECT DISTINCT user_id, key, value, entity FROM snap) AS s  -- index order
        JOIN run_keys AS k ON k.entity = s.entity AND k.key = s.key AND k.failed = 0
        LEFT JOIN acked AS a
          ON a.entity = s.entity AND a.user_id = s.user_id AND a.key = s.key
        WHERE a.value IS NULL OR a.value <> s.value OR k.forced = 1
        UNION ALL
        SELECT a.entity, a.user_id, a.key, k.kind, '{FALSE}', a.value, k.forced
        FROM acked AS a
        JOIN run_keys AS k ON k.entity = a.entity AND k.key = a.key AND k.kind = 'audience'
                          AND k.failed = 0
        WHERE a.value = '{TRUE}'
          AND NOT EXISTS (SELECT 1 FROM snap AS s WHERE s.entity = a.entity
                          AND s.user_id = a.user_id AND s.key = a.key)
    """)
    if state.dialect.name == "postgresql":
        state.exec_driver_sql("RESET enable_nestloop")
    # Without the entity: lookups filter on it after (user_id, key), which ids of a user
    # and an account rarely share; a narrower index builds faster.
    state.exec_driver_sql("CREATE INDEX diff_user ON diff (user_id, key)")
    _fill_kept(state)
    _fill_corrections(state)
    state.exec_driver_sql("DELETE FROM diff WHERE (entity, user_id) IN "
                          "(SELECT entity, user_id FROM kept)")
    if state.dialect.name == "postgresql":
        state.exec_driver_sql("ANALYZE diff")


def _fill_corrections(state: Connection) -> None:
    # An update handed to the sender may have reached ChartMogul without our
    # recording it (the process was killed with it in flight, or an attempt's outcome
    # was unknown: no answer, or a 5xx that may follow work done).
    # When it is superseded, what ChartMogul holds for its keys is unknown: send
    # their current values, even where they equal the acknowledged ones. A trait
    # with no value now has nothing to send.
    state.exec_driver_sql(f"""
        INSERT INTO diff (entity, user_id, key, kind, new_value, old_value, forced)
        SELECT * FROM (
            SELECT c.entity, c.user_id, c.key, k.kind, CASE
                WHEN c.kind = 'audience' THEN CASE WHEN EXISTS (
                    SELECT 1 FROM snap AS s WHERE s.entity = c.entity
                    AND s.user_id = c.user_id AND s.key = c.key)
                    THEN '{TRUE}' ELSE '{FALSE}' END
                ELSE (SELECT MIN(s.value) FROM snap AS s WHERE s.entity = c.entity
                      AND s.user_id = c.user_id AND s.key = c.key) END AS new_value,
                a.value AS old_value, 0 AS forced
            FROM updates AS u
            JOIN changes AS c ON c.update_id = u.id
            JOIN run_keys AS k ON k.entity = c.entity AND k.key = c.key AND k.failed = 0
            LEFT JOIN acked AS a
              ON a.entity = c.entity AND a.user_id = c.user_id AND a.key = c.key
            WHERE u.status = 'pending'
              AND (u.in_flight_since IS NOT NULL OR u.maybe_delivered = {_true(state)})
              AND u.id NOT IN (SELECT update_id FROM kept)
              AND NOT EXISTS (SELECT 1 FROM diff AS d WHERE d.entity = c.entity
                              AND d.user_id = c.user_id AND d.key = c.key)
        ) AS corrections
        WHERE new_value IS NOT NULL
    """)


def _true(state: Connection) -> str:
    return "1" if state.dialect.name == "sqlite" else "true"


def _fill_kept(state: Connection) -> None:
    # A live update is kept when each of its rows still matches the current state
    # (or concerns a key that failed this run) and it carries every current change of
    # its user. A resync forcing a user's keys replaces whatever was live for them.
    # Fields (kind `field`) are judged as traits are.
    state.exec_driver_sql(f"""
        INSERT INTO kept (entity, user_id, update_id)
        SELECT u.entity, u.user_id, u.id FROM updates AS u
        WHERE u.status IN ('pending', 'rejected')
          AND NOT EXISTS (
            SELECT 1 FROM changes AS c
            LEFT JOIN run_keys AS k ON k.entity = c.entity AND k.key = c.key
            WHERE c.update_id = u.id AND (k.key IS NULL OR (k.failed = 0 AND NOT (
                 (c.kind = 'audience' AND c.new_value = '{TRUE}' AND EXISTS (
                    SELECT 1 FROM snap AS s WHERE s.entity = c.entity
                    AND s.user_id = c.user_id AND s.key = c.key))
              OR (c.kind = 'audience' AND c.new_value = '{FALSE}' AND NOT EXISTS (
                    SELECT 1 FROM snap AS s WHERE s.entity = c.entity
                    AND s.user_id = c.user_id AND s.key = c.key))
              OR (c.kind <> 'audience' AND EXISTS (
                    SELECT 1 FROM snap AS s WHERE s.entity = c.entity
                    AND s.user_id = c.user_id AND s.key = c.key
                    AND s.value = c.new_value))))))
          AND NOT EXISTS (
            SELECT 1 FROM diff AS d
            WHERE d.entity = u.entity AND d.user_id = u.user_id AND (d.forced = 1 OR NOT EXISTS (
                SELECT 1 FROM changes AS c
                WHERE c.update_id = u.id AND c.key = d.key AND c.new_value = d.new_value)))
    """)
