"""One sync run, end to end (SPEC §1, §6): the story, told by `sync`.

    take the lock; record the run and its keys (a killed run's in-flight updates
        become uncertain keys first)
    plan:   snapshot, diff, guard                               planning.plan_run
    send:   every pending update, accounts first, the plan      sending.send_pending
            made durable page by page as it is drawn            LivePlan.pages
    finish: status and error (grouped by cause), prune, release the lock

`dry_run` is the plan phase alone, rolled back (planning.dry_run). A crash at any
point loses nothing: each update is durable before it is sent, and the next run
re-sends what is pending, and re-derives what was not yet planned, with the same
message ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from reconciler.config import Config
from reconciler.delivery.sending import Sent, send_pending
from reconciler.errors import ReconcilerError, RunFailed, RunHalted
from reconciler.outcome import DryRunReport, RunRequest, RunResult, Seams
from reconciler.pipeline.guard import Verdict
from reconciler.pipeline.planning import Planned, dry_run, plan_run
from reconciler.state.causes import explain, join
from reconciler.state.db import database_error
from reconciler.state.ledger import (
    close_interrupted_runs,
    mark_left_in_flight,
    start_run,
    update_run,
)
from reconciler.state.lock import RunLock
from reconciler.state.retention import prune_after_run
from reconciler.state.schema import entry_keys

__all__ = ["DryRunReport", "RunRequest", "RunResult", "Seams", "dry_run", "sync"]

LOCK_LOST = "stopped sending: the run lock was lost (its lease could not be renewed)"


def sync(
    config: Config, engine: Engine, request: RunRequest | None = None, seams: Seams | None = None
) -> RunResult:
    """Run once under the lock. Raises LockHeld (another run) or RunFailed."""
    request, seams = request or RunRequest(), seams or Seams()
    with _locked(engine) as lock:
        run_id = _start(config, engine, request, lock)
        try:
            try:
                with plan_run(config, engine, run_id, request) as plan:
                    sent = send_pending(config, engine, run_id, seams, lock, plan)
                    planned = plan.finish()
            except RunHalted as halt:  # nothing of the run was kept; nothing is sent
                result = _halted(run_id, halt, config)
            else:
                result = _result(engine, config, run_id, planned, sent, seams, lock)
            _finish(engine, result)
            return result
        except (ReconcilerError, SQLAlchemyError) as exc:
            if isinstance(exc, SQLAlchemyError):
                exc = database_error("state", engine, exc)
            error = config.redact(str(exc))
            _finish(engine, RunResult(run_id, "failed", error=error), counts=False)
            raise RunFailed(f"run {run_id} failed: {error}") from None
        except Exception as exc:
            # A bug, not a known failure: record the run as failed, then let it surface.
            error = config.redact(f"unexpected error: {type(exc).__name__}: {exc}")
            _finish(engine, RunResult(run_id, "failed", error=error), counts=False)
            raise
        finally:
            prune_after_run(engine, config.history.keep_days)


@contextlib.contextmanager
def _locked(engine: Engine) -> Iterator[RunLock]:
    lock = RunLock(engine)
    try:
        lock.acquire()
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None
    try:
        yield lock
    finally:
        # If the database is gone, the lease expires and the next run takes over.
        with contextlib.suppress(SQLAlchemyError):
            lock.release()


def _start(config: Config, engine: Engine, request: RunRequest, lock: RunLock) -> int:
    """Close what killed runs left behind, record this run and its keys; its id."""
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            close_interrupted_runs(conn, now)
            mark_left_in_flight(conn, now)
            run_id = start_run(conn, request.trigger, now, request.resync_label)
            _record_keys(conn, config, now)
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None
    lock.set_run(run_id)
    return run_id


def _result(
    engine: Engine,
    config: Config,
    run_id: int,
    planned: Planned,
    sent: Sent,
    seams: Seams,
    lock: RunLock,
) -> RunResult:
    """The finished run: counts of both phases, status, and why anything is left over."""
    counts = planned.counts
    by_kind = {
        kind: {**sent.by_kind[kind], "skipped": planned.skipped_by_kind.get(kind, 0)}
        for kind in sent.by_kind
    }
    left_over = bool(sent.failed or sent.pending or planned.failed_entries)
    error = config.redact("; ".join(planned.failed_entries)) or None
    if sent.failed or sent.pending:  # say why, grouped by cause (SPEC §4)
        stopped = seams.stopped_by or ("request" if seams.stop.is_set() else None)
        with engine.connect() as conn:
            why = explain(conn, run_id, sent.pending, stopped, lock.lost.is_set())
        error = join(error, config.redact(why) if why else None)
    if lock.lost.is_set():  # another run took the lock over: we stopped sending
        error = join(error, LOCK_LOST)
    return RunResult(
        run_id,
        "partial" if left_over else "succeeded",
        users_seen=planned.users_seen,
        users_changed=counts.users,
        entered=counts.entered,
        exited=counts.exited,
        traits_changed=counts.traits_changed,
        sent=sent.sent,
        failed=sent.failed,
        skipped=counts.skipped,
        pending=sent.pending,
        rows_ignored=planned.rows_ignored,
        resent=planned.resent,
        error=error,
        guard=planned.guard,
        emails_left_out=counts.emails_left_out,
        linked_in_left_out=counts.linked_in_left_out,
        accounts_seen=planned.accounts_seen,
        accounts_changed=counts.accounts,
        by_kind=by_kind,
    )


def _halted(run_id: int, halt: RunHalted, config: Config) -> RunResult:
    assert isinstance(halt.verdict, Verdict)
    return RunResult(
        run_id,
        "halted",
        users_seen=halt.users_seen,
        rows_ignored=halt.rows_ignored,
        pending=halt.pending,
        error=config.redact(str(halt)),
        guard=halt.verdict,
    )


def _record_keys(conn: Connection, config: Config, now: datetime) -> None:
    """Keep every key ever configured; retire the ones no longer in the config."""
    known = {row.key: row for row in conn.execute(select(entry_keys))}
    for entry in config.entries:
        row = known.get(entry.key)
        if row is None:
            conn.execute(
                insert(entry_keys).values(
                    key=entry.key,
                    kind=entry.kind,
                    name=entry.name,
                    active=True,
                    first_seen_at=now,
                    entity=entry.entity,
                )
            )
        elif (
            not row.active
            or row.name != entry.name
            or row.kind != entry.kind
            or row.entity != entry.entity
        ):
            conn.execute(
                update(entry_keys)
                .where(entry_keys.c.key == entry.key)
                .values(
                    kind=entry.kind,
                    name=entry.name,
                    active=True,
                    retired_at=None,
                    entity=entry.entity,
                )
            )
    configured = {e.key for e in config.entries}
    for key, row in known.items():
        if row.active and key not in configured:
            conn.execute(
                update(entry_keys)
                .where(entry_keys.c.key == key)
                .values(active=False, retired_at=now)
            )


def _finish(engine: Engine, result: RunResult, counts: bool = True) -> None:
    """Record how the run ended (`counts`: also its sent/failed/pending totals)."""
    values = {"status": result.status, "finished_at": datetime.now(UTC), "error": result.error}
    if counts:
        values |= {"sent": result.sent, "failed": result.failed, "pending": result.pending}
    try:
        with engine.begin() as conn:
            update_run(conn, result.run_id, **values)
    except SQLAlchemyError:
        pass  # the state database went away; the next run closes this row as interrupted
