"""The diff (SPEC §1.2): the snapshot against what ChartMogul acknowledged, in SQL.

Fills three temp tables on the run's connection:

    uncertain(entity, user_id, key)
        keys ChartMogul may hold an unacknowledged value for (SPEC §6 "Uncertain
        keys"): the `uncertain_keys` marks, and the keys of updates in flight.
    diff(user_id, key, kind, new_value, old_value, forced, entity)
        every (user, key) to send: a member not acknowledged as one (`true`), an
        acknowledged member gone from the audience (`false`), a trait (or field, kind
        `field`, see fields.py) whose value differs from the acknowledged one; an
        uncertain key's current value whenever it has one (`true` for a member, `false`
        for anyone else; a trait or field only while its source row has a value), even
        when it equals the acknowledged one; in a resync, every current value of the
        resynced keys too (`forced = 1`). Accounts are rows with entity `customer`
        (user_id = group_id) and are diffed alike.
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

from reconciler.config import Entry
from reconciler.pipeline.source import FALSE, TRUE
from reconciler.state.backend import Backend
from reconciler.state.schema import ENTITIES


def fill_run_keys(
    state: Connection,
    loaded: list[Entry],
    failed: Collection[str],
    resync_keys: Collection[str],
    fields: Collection[tuple[str, str]] = (),
) -> None:
    """The keys this run diffs (and which of them a resync forces), as a temp table.

    `fields` are the (entity, key) of the record fields diffed (fields.py). A failed
    key is failed for both entities: entry keys are unique across them.
    """
    db = Backend(state)
    state.exec_driver_sql("DELETE FROM run_keys")
    rows: list[tuple[str, str, int, int, str]] = [
        (e.key, e.kind, int(e.key in resync_keys), 0, e.entity) for e in loaded
    ]
    rows += [(key, "field", int(key in resync_keys), 0, entity) for entity, key in fields]
    rows += [(key, "", 0, 1, entity) for key in failed for entity in ENTITIES]
    if rows:
        state.exec_driver_sql(f"INSERT INTO run_keys VALUES ({db.marks(5)})", rows)
    # Without statistics, joins on (entity, key) are estimated at a few rows, and the
    # planner probes `acked` once per snapshot row instead of hashing it.
    db.analyze("run_keys")


def fill_diff(state: Connection) -> None:
    """Compute `diff` from `snap`, `run_keys`, `acked` and the uncertain keys."""
    db = Backend(state)
    _fill_uncertain(state)
    # `snap` holds duplicate rows only when its index is not unique (snapshot.py).
    current = (
        "snap" if db.unique("snap") else "(SELECT DISTINCT user_id, key, value, entity FROM snap)"
    )
    # A DISTINCT subquery hides `snap`'s statistics, so joins on (entity, key) are
    # estimated at a few dozen rows and the planner probes `acked` by index once per
    # snapshot row (measured 2.2 s against 1.2 s hashed, 300k users, no change).
    # This statement is bulk work whatever the sizes: hash it.
    with db.hash_joins():
        _insert_diff(state, current)
    # Without the entity: lookups filter on it after (user_id, key), which ids of a user
    # and an account rarely share; a narrower index builds faster.
    state.exec_driver_sql("CREATE INDEX diff_user ON diff (entity, user_id, key)")
    _fill_kept(state)
    state.exec_driver_sql(
        "DELETE FROM diff WHERE (entity, user_id) IN (SELECT entity, user_id FROM kept)"
    )
    db.analyze("diff")


def _insert_diff(state: Connection, current: str) -> None:
    state.exec_driver_sql(f"""
        INSERT INTO diff (entity, user_id, key, kind, new_value, old_value, forced)
        -- a current value that is not the acknowledged one (or that a resync forces)
        SELECT s.entity, s.user_id, s.key, k.kind, s.value, a.value, k.forced
        FROM {current} AS s
        JOIN run_keys AS k ON k.entity = s.entity AND k.key = s.key AND k.failed = 0
        LEFT JOIN acked AS a
          ON a.entity = s.entity AND a.user_id = s.user_id AND a.key = s.key
        WHERE a.value IS NULL OR a.value <> s.value OR k.forced = 1
        UNION ALL
        -- an acknowledged member gone from the audience
        SELECT a.entity, a.user_id, a.key, k.kind, '{FALSE}', a.value, k.forced
        FROM acked AS a
        JOIN run_keys AS k ON k.entity = a.entity AND k.key = a.key AND k.kind = 'audience'
                          AND k.failed = 0
        WHERE a.value = '{TRUE}'
          AND NOT EXISTS (SELECT 1 FROM snap AS s WHERE s.entity = a.entity
                          AND s.user_id = a.user_id AND s.key = a.key)
        UNION ALL
        -- an uncertain key whose current value is the acknowledged one
        SELECT u.entity, u.user_id, u.key, k.kind, a.value, a.value, k.forced
        FROM uncertain AS u
        JOIN run_keys AS k
          ON k.entity = u.entity AND k.key = u.key AND k.failed = 0 AND k.forced = 0
        JOIN acked AS a ON a.entity = u.entity AND a.user_id = u.user_id AND a.key = u.key
        WHERE EXISTS (SELECT 1 FROM snap AS s WHERE s.entity = u.entity
                      AND s.user_id = u.user_id AND s.key = u.key AND s.value = a.value)
        UNION ALL
        -- an uncertain audience key of a non-member not acknowledged as a member
        SELECT u.entity, u.user_id, u.key, k.kind, '{FALSE}', a.value, k.forced
        FROM uncertain AS u
        JOIN run_keys AS k ON k.entity = u.entity AND k.key = u.key
          AND k.kind = 'audience' AND k.failed = 0
        LEFT JOIN acked AS a ON a.entity = u.entity AND a.user_id = u.user_id AND a.key = u.key
        WHERE (a.value IS NULL OR a.value <> '{TRUE}')
          AND NOT EXISTS (SELECT 1 FROM snap AS s WHERE s.entity = u.entity
                          AND s.user_id = u.user_id AND s.key = u.key)
    """)


def _fill_uncertain(state: Connection) -> None:
    # The marked keys, and those of updates still in flight: a run marks what a
    # killed run left in flight before it diffs (ledger.mark_left_in_flight), but a
    # dry run does not, and a run that lost its lock may still be sending.
    db = Backend(state)
    state.exec_driver_sql("DELETE FROM uncertain")
    state.exec_driver_sql("""
        INSERT INTO uncertain (entity, user_id, key)
        SELECT entity, user_id, key FROM uncertain_keys
        UNION
        SELECT c.entity, c.user_id, c.key
        FROM updates AS u JOIN changes AS c ON c.update_id = u.id
        WHERE u.in_flight_since IS NOT NULL
    """)
    db.analyze("uncertain")


def _fill_kept(state: Connection) -> None:
    # A live update is kept when each of its rows still matches the current state
    # (or concerns a key that failed this run) and it carries every row of its user
    # in `diff`, uncertain keys' current values included. A resync forcing a user's
    # keys replaces whatever was live for them. Fields (kind `field`) are judged as
    # traits are.
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
