"""Everything that moves durable state: runs, planned updates, acknowledgements.

Each function runs inside the caller's transaction and never commits. The rules the
rest of the program leans on: `acked` and `ack_versions` move only in `acknowledge`,
in the same transaction that records why (a 2xx delivery, or a skip); a (user, key)
is marked uncertain (`uncertain_keys`, SPEC §6) in the same transaction that records
an attempt that may have delivered it, or by the next run for an update a killed run
left in flight, and the mark is cleared only in `acknowledge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, func, insert, select, text, update

from reconciler.state.schema import deliveries, sync_runs, uncertain_keys, updates

if TYPE_CHECKING:  # the delivery layer defines it; importing it here would load httpx
    from reconciler.delivery.retry import AttemptRecord

LIVE = ("pending", "rejected")


def start_run(
    state: Connection, trigger: str, started_at: datetime, resync_key: str | None = None
) -> int:
    """Insert a `running` sync_runs row and return its id."""
    result = state.execute(
        insert(sync_runs).values(
            trigger=trigger,
            status="running",
            started_at=started_at,
            resync_key=resync_key,
            users_seen=0,
            users_changed=0,
            entered=0,
            exited=0,
            traits_changed=0,
            sent=0,
            failed=0,
            skipped=0,
            rows_ignored=0,
            pending=0,
        )
    )
    assert result.inserted_primary_key is not None
    return int(result.inserted_primary_key[0])


def close_interrupted_runs(state: Connection, now: datetime) -> None:
    """Runs still `running` when the lock is taken were killed: mark them failed."""
    state.execute(
        update(sync_runs)
        .where(sync_runs.c.status == "running")
        .values(
            status="failed",
            finished_at=now,
            error="interrupted: the process ended before the run finished",
        )
    )


def update_run(state: Connection, run_id: int, **values: Any) -> None:
    state.execute(update(sync_runs).where(sync_runs.c.id == run_id).values(**values))


def supersede_stale(state: Connection) -> int:
    """Retire every live update the run does not keep (the temp `kept`); the largest
    update id so far, from which this run's updates are numbered (`base + seq`).

    The first step of making a plan durable, before any of its pages (`commit_page`):
    an update superseded here whose users' page never gets written (a stopped or
    killed run) is derived again, with the same id, by the next run's diff.
    """
    # A write first: on SQLite it takes the write lock before anything is read.
    state.execute(
        text(
            "UPDATE updates SET status = 'superseded' "
            "WHERE status IN ('pending', 'rejected') "
            "AND id NOT IN (SELECT update_id FROM kept)"
        )
    )
    return int(state.execute(select(func.coalesce(func.max(updates.c.id), 0))).scalar_one())


def commit_page(
    state: Connection,
    run_id: int,
    observed_at: datetime,
    base: int,
    page: Sequence[tuple[Any, ...]],
) -> list[tuple[int, str, str]]:
    """Make one page of the temp `plan` durable (`page`: its rows, as written there,
    seq first); its pending updates as (id, message_id, body), in plan order, for the
    sender.

    An update whose message id already exists (superseded earlier, the same logical
    update derived again) is revived with its original id, timestamp and body.
    Skipped updates are settled at once: acknowledged as if sent (SPEC §5).
    """
    if not page:
        return []
    bounds = {"first": page[0][0], "last": page[-1][0]}
    # A write first (see supersede_stale).
    state.execute(
        text(
            "UPDATE updates SET status = 'pending' WHERE status = 'superseded' "
            "AND message_id IN (SELECT message_id FROM plan WHERE seq BETWEEN :first AND :last)"
        ),
        bounds,
    )
    # The page's message ids that existed before it: revived above, or settled.
    earlier = {
        str(row[0]): (int(row[1]), str(row[2]), str(row[3]))
        for row in state.execute(
            text("""
            SELECT p.message_id, u.id, u.body, u.status
            FROM plan AS p JOIN updates AS u ON u.message_id = p.message_id
            WHERE p.seq BETWEEN :first AND :last
        """),
            bounds,
        )
    }
    state.execute(
        text("""
        INSERT INTO updates (id, message_id, user_id, version, resync_run_id, run_id,
                             observed_at, status, body, note, attempts, entity)
        SELECT :base + p.seq, p.message_id, p.user_id, p.version, p.resync_run_id, :run,
               :observed, p.status, p.body, p.note, 0, p.entity
        FROM plan AS p
        WHERE p.seq BETWEEN :first AND :last
          AND NOT EXISTS (SELECT 1 FROM updates AS u WHERE u.message_id = p.message_id)
    """).bindparams(bindparam("observed", type_=updates.c.observed_at.type)),
        {**bounds, "base": base, "run": run_id, "observed": observed_at},
    )
    state.execute(
        text("""
        INSERT INTO changes (update_id, run_id, user_id, key, kind, old_value, new_value,
                             entity)
        SELECT :base + p.seq, :run, d.user_id, d.key, d.kind, d.old_value, d.new_value,
               d.entity
        FROM plan AS p JOIN diff AS d ON d.entity = p.entity AND d.user_id = p.user_id
        WHERE p.seq BETWEEN :first AND :last
          AND EXISTS (SELECT 1 FROM updates AS u WHERE u.id = :base + p.seq)
    """),
        {**bounds, "base": base, "run": run_id},
    )
    skipped = (
        "SELECT id FROM updates WHERE id BETWEEN :base + :first AND :base + :last "
        "AND run_id = :run AND status = 'skipped'"
    )
    acknowledge(state, skipped, {**bounds, "base": base}, "skipped", run_id, observed_at)
    # The bodies are the page's own, but for a revived update: its original ones.
    pending = []
    for seq, _user, message_id, _version, _resync, body, status, *_ in page:
        if message_id in earlier:
            update_id, body, status = earlier[message_id]
        else:
            update_id = base + seq
        if status == "pending":
            pending.append((update_id, message_id, body))
    return pending


def acknowledge(
    state: Connection, ids_sql: str, params: dict[str, Any], status: str, run_id: int, now: datetime
) -> None:
    """Settle the updates selected by `ids_sql` and move the acknowledged state.

    `status` is `sent` (a 2xx) or `skipped`; each user's version moves by one. The
    keys they carry stop being uncertain: ChartMogul now holds the acknowledged value
    (a skip is settled as if sent, SPEC §5: it happens only to bodies that carry no
    custom attributes, so no later body could settle those keys either).
    """
    stamp = bindparam("now", type_=updates.c.settled_at.type)
    args = {**params, "now": now, "run": run_id, "status": status}
    state.execute(
        text(
            f"UPDATE updates SET status = :status, settled_run_id = :run, "
            f"settled_at = :now WHERE id IN ({ids_sql})"
        ).bindparams(stamp),
        args,
    )
    # `WHERE true` keeps SQLite's parser from reading ON CONFLICT as a join clause.
    state.execute(
        text(f"""
        INSERT INTO acked (entity, user_id, key, value, update_id, acked_at)
        SELECT c.entity, c.user_id, c.key, c.new_value, c.update_id, :now
        FROM changes AS c WHERE c.update_id IN ({ids_sql}) AND true
        ON CONFLICT (entity, user_id, key) DO UPDATE SET value = excluded.value,
            update_id = excluded.update_id, acked_at = excluded.acked_at
    """).bindparams(stamp),
        args,
    )
    state.execute(
        text(f"""
        INSERT INTO ack_versions (entity, user_id, version)
        SELECT entity, user_id, 1 FROM updates WHERE id IN ({ids_sql}) AND true
        ON CONFLICT (entity, user_id) DO UPDATE SET version = ack_versions.version + 1
    """),
        args,
    )
    state.execute(
        text(f"""
        DELETE FROM uncertain_keys
        WHERE (entity, user_id, key) IN (SELECT c.entity, c.user_id, c.key FROM changes AS c
                                         WHERE c.update_id IN ({ids_sql}))
    """),
        args,
    )


def mark_uncertain(state: Connection, update_ids: Sequence[int], now: datetime) -> None:
    """Each key of these updates may now hold their value at ChartMogul, unacknowledged.

    A key already uncertain keeps its `since` and points at the newest update.
    """
    stamp = bindparam("now", type_=uncertain_keys.c.since.type)
    listed = ", ".join(str(int(i)) for i in update_ids)
    state.execute(
        text(f"""
        INSERT INTO uncertain_keys (entity, user_id, key, update_id, since)
        SELECT c.entity, c.user_id, c.key, c.update_id, :now
        FROM changes AS c WHERE c.update_id IN ({listed}) AND true
        ON CONFLICT (entity, user_id, key) DO UPDATE SET update_id = excluded.update_id
    """).bindparams(stamp),
        {"now": now},
    )


def mark_left_in_flight(state: Connection, now: datetime) -> int:
    """Updates a killed run left in flight may have been delivered: mark their keys
    uncertain (since `now`) and clear `in_flight_since`. Returns how many there were.

    Called under the lock as a run starts, before its diff. Exactly the cleared rows
    are marked (RETURNING), so a run that lost the lock and still hands pages over
    cannot slip an update between the two statements.
    """
    handed_over = list(
        state.execute(
            update(updates)
            .where(updates.c.in_flight_since.is_not(None))
            .values(in_flight_since=None, maybe_delivered=True)
            .returning(updates.c.id)
        ).scalars()
    )
    for start in range(0, len(handed_over), 1000):
        mark_uncertain(state, handed_over[start : start + 1000], now)
    return len(handed_over)


def record_deliveries(
    state: Connection,
    run_id: int,
    outcomes: Sequence[tuple[int, str, Sequence[AttemptRecord]]],
    now: datetime,
) -> None:
    """Record a batch of updates' attempts; acknowledged ones move acked state too.

    Each outcome is (update id, result, attempts this run); `result` is
    `acknowledged`, `rejected` or `pending` (retries exhausted or stopped). Only a
    still-pending update is settled: if this run lost its lock, another run may have
    superseded or settled it meanwhile, and acknowledging it twice would move the
    user's version twice. Keys of an attempt that may have been delivered are marked
    uncertain. A handful of statements per batch, not per update: at
    thousands of acknowledgements a second, per-update statements were the limit.
    """
    attempted = [(update_id, attempts) for update_id, _, attempts in outcomes if attempts]
    if attempted:
        state.execute(
            insert(deliveries),
            [
                {
                    "update_id": update_id,
                    "run_id": run_id,
                    "attempt": a.attempt,
                    "sent_at": a.sent_at,
                    "latency_ms": a.latency_ms,
                    "status_code": a.status_code,
                    "outcome": a.outcome,
                    "error": a.error,
                }
                for update_id, attempts in attempted
                for a in attempts
            ],
        )
        state.execute(
            text(
                "UPDATE updates SET attempts = attempts + :count, last_status_code = :status, "
                "last_error = :error, in_flight_since = NULL, "
                "maybe_delivered = (maybe_delivered OR :maybe) WHERE id = :id"
            ),
            [
                {
                    "id": update_id,
                    "count": len(attempts),
                    "status": attempts[-1].status_code,
                    "error": attempts[-1].error,
                    "maybe": any(a.maybe_delivered for a in attempts),
                }
                for update_id, attempts in attempted
            ],
        )
    idle = [{"id": update_id} for update_id, _, attempts in outcomes if not attempts]
    if idle:
        state.execute(text("UPDATE updates SET in_flight_since = NULL WHERE id = :id"), idle)
    ids = [update_id for update_id, _, _ in outcomes]
    pending = set(
        state.execute(
            select(updates.c.id).where(updates.c.id.in_(ids), updates.c.status == "pending")
        ).scalars()
    )
    acknowledged = [i for i, result, _ in outcomes if result == "acknowledged" and i in pending]
    rejected = [i for i, result, _ in outcomes if result == "rejected" and i in pending]
    # Marked before `acknowledge` clears: a timeout then a 2xx leaves nothing uncertain.
    # A 2xx for an update another run settled meanwhile delivered values `acked` does
    # not hold: uncertain too.
    uncertain = [
        i
        for i, result, attempts in outcomes
        if any(a.maybe_delivered for a in attempts)
        or (result == "acknowledged" and i not in pending)
    ]
    if uncertain:
        mark_uncertain(state, uncertain, now)
    if acknowledged:
        # Integers this database generated, written out: `acknowledge` takes SQL.
        listed = ", ".join(str(int(i)) for i in acknowledged)
        acknowledge(state, listed, {}, "sent", run_id, now)
    if rejected:
        state.execute(
            update(updates)
            .where(updates.c.id.in_(rejected))
            .values(status="rejected", settled_run_id=run_id, settled_at=now)
        )


def mark_in_flight(state: Connection, update_ids: list[int], now: datetime) -> None:
    """These updates go to the sender now; until recorded, they may reach ChartMogul."""
    state.execute(update(updates).where(updates.c.id.in_(update_ids)).values(in_flight_since=now))


def pending_page(
    state: Connection, after_id: int, limit: int, entity: str | None = None
) -> list[tuple[int, str, str]]:
    """(id, message_id, body) of pending updates after `after_id` (of one `entity`, if
    given), oldest first."""
    query = select(updates.c.id, updates.c.message_id, updates.c.body).where(
        updates.c.status == "pending", updates.c.id > after_id
    )
    if entity is not None:
        query = query.where(updates.c.entity == entity)
    rows = state.execute(query.order_by(updates.c.id).limit(limit)).all()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def count_pending(state: Connection, entity: str | None = None) -> int:
    query = select(func.count()).select_from(updates).where(updates.c.status == "pending")
    if entity is not None:
        query = query.where(updates.c.entity == entity)
    return int(state.execute(query).scalar_one())
