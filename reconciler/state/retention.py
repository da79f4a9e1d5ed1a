"""Keeping run history bounded (`[history] keep_days`, `reconciler prune`).

A run older than the horizon goes with everything recorded in it: its `sync_runs`
row, the changes and delivery attempts it recorded, and the updates it planned. What
the next diff or a re-send still needs is never touched:

- a live update (`pending`, or `rejected` and so blocking a re-send), with its changes
  and the run row it points at;
- an update settled, superseded or attempted within the horizon (deleting it would
  take rows out of a recent run);
- `acked` and `ack_versions`, which are the acknowledged state itself;
- `uncertain_keys` (the diff needs nothing else to re-send an uncertain key), and
  the update each mark names, with its changes, so the mark can be explained;
- the newest run and the newest update: SQLite hands out max(id) + 1 as the next id,
  so keeping them keeps `sync_runs.id` (and update ids) increasing for good.

Snapshots need no pruning: they live in temporary tables that end with each run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, and_, delete, exists, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from reconciler.state.db import database_error
from reconciler.state.ledger import LIVE
from reconciler.state.lock import RunLock
from reconciler.state.schema import changes, deliveries, sync_runs, uncertain_keys, updates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pruned:
    """How many rows one prune deleted, per table."""

    runs: int = 0
    updates: int = 0
    changes: int = 0
    deliveries: int = 0


def cutoff_for(keep_days: int, now: datetime | None = None) -> datetime:
    """The moment before which runs are pruned."""
    return (now or datetime.now(UTC)) - timedelta(days=keep_days)


def horizon(state: Connection, cutoff: datetime) -> int:
    """The first run id to keep: runs started before `cutoff` have smaller ids.

    A run still marked `running`, and the newest run, are kept whatever their age.
    """
    first_kept = state.execute(
        select(func.min(sync_runs.c.id)).where(
            or_(sync_runs.c.started_at >= cutoff, sync_runs.c.status == "running")
        )
    ).scalar()
    newest = state.execute(select(func.max(sync_runs.c.id))).scalar()
    return min(int(first_kept or newest or 0), int(newest or 0))


def prune(state: Connection, cutoff: datetime) -> Pruned:
    """Delete the history of runs started before `cutoff`, in the caller's transaction."""
    first = horizon(state, cutoff)
    if not _anything_before(state, first):
        return Pruned()
    recent_attempt = exists().where(
        deliveries.c.update_id == updates.c.id, deliveries.c.run_id >= first
    )
    newest_update = select(func.max(updates.c.id)).scalar_subquery()
    # NOT IN, not a correlated EXISTS: SQLite builds the list once.
    marked = updates.c.id.in_(select(uncertain_keys.c.update_id))
    doomed = (
        select(updates.c.id)
        .where(
            updates.c.id < newest_update,
            updates.c.status.not_in(LIVE),
            updates.c.run_id < first,
            func.coalesce(updates.c.settled_run_id, 0) < first,
            ~recent_attempt,
            ~marked,
        )
        .scalar_subquery()
    )
    # Explicit deletes rather than ON DELETE CASCADE: the counts are reported, and
    # SQLite only cascades on connections that enabled foreign keys.
    gone_changes = state.execute(delete(changes).where(changes.c.update_id.in_(doomed)))
    gone_attempts = state.execute(delete(deliveries).where(deliveries.c.update_id.in_(doomed)))
    gone_updates = state.execute(delete(updates).where(updates.c.id.in_(doomed)))
    # Old attempts of updates that stay (a long-pending one retried every run).
    old_attempts = state.execute(delete(deliveries).where(deliveries.c.run_id < first))
    still_needed = exists().where(updates.c.run_id == sync_runs.c.id)
    gone_runs = state.execute(delete(sync_runs).where(and_(sync_runs.c.id < first, ~still_needed)))
    return Pruned(
        runs=gone_runs.rowcount,
        updates=gone_updates.rowcount,
        changes=gone_changes.rowcount,
        deliveries=gone_attempts.rowcount + old_attempts.rowcount,
    )


def _anything_before(state: Connection, first: int) -> bool:
    """Whether any run, or any attempt, is older than run `first`: two index look-ups.

    Without one there is nothing to prune (an update points at its run), and the
    deletes below, each of which scans `updates`, are skipped: the usual case of a
    run's end, when the oldest run is still within `keep_days`.
    """
    old_run = select(sync_runs.c.id).where(sync_runs.c.id < first).limit(1)
    old_attempt = select(deliveries.c.id).where(deliveries.c.run_id < first).limit(1)
    return (
        state.execute(old_run).first() is not None or state.execute(old_attempt).first() is not None
    )


def prune_after_run(engine: Engine, keep_days: int) -> Pruned | None:
    """Prune at the end of a run; a failure is logged, never raised (the run is recorded)."""
    try:
        with engine.begin() as conn:
            pruned = prune(conn, cutoff_for(keep_days))
    except SQLAlchemyError as exc:
        log.warning("history pruning skipped: %s", database_error("state", engine, exc))
        return None
    if pruned.runs or pruned.updates:
        log.info(
            "pruned %d runs and %d updates older than %d days",
            pruned.runs,
            pruned.updates,
            keep_days,
        )
    return pruned


def prune_now(engine: Engine, keep_days: int) -> tuple[datetime, Pruned]:
    """`reconciler prune`: prune under the run lock (LockHeld while a run holds it)."""
    cutoff = cutoff_for(keep_days)
    try:
        with RunLock(engine), engine.begin() as conn:
            return cutoff, prune(conn, cutoff)
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None
