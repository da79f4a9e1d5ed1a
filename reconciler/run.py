"""One sync run, end to end: lock, snapshot, diff, plan, send, record, prune (SPEC §1, §6).

    sync(config, engine)          a real run; returns its RunResult
    dry_run(config, engine)       snapshot and diff only; leaves nothing durable

Between the diff and the plan's commit the safety guard (guard.py, SPEC §10) judges
the diff; a halted run keeps nothing it planned and sends nothing, not even updates
left pending by earlier runs, and ends with status `halted`.

The planning phase ends in one transaction that makes every update durable before
anything is sent, so a crash at any point loses nothing: the next run finds the
pending updates and re-sends them with their original message ids.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from .causes import explain, join
from .config import Config
from .db import database_error, source_engine
from .diff import fill_diff, fill_run_keys
from .errors import ReconcilerError, RunFailed, RunHalted
from .guard import Verdict, audience_keys, proceed_command
from .guard import check as check_exits
from .ledger import (
    close_interrupted_runs,
    commit_plan,
    count_pending,
    mark_in_flight,
    mark_left_in_flight,
    pending_page,
    record_deliveries,
    start_run,
    update_run,
)
from .lock import RunLock
from .plan import PlanCounts, count_diff, fill_plan
from .retention import prune_after_run
from .schema import entry_keys, updates
from .sender import Delivery, Job, Sender
from .snapshot import (
    Snapshot,
    create_temp_tables,
    drop_temp_tables,
    load_profile,
    take_snapshot,
)
from .source import TRUE
from .source_snapshot import begin_snapshot

PAGE = 200  # updates marked dispatched at a time, a little ahead of the senders
FLUSH_EVERY = 100
FLUSH_SECONDS = 0.25

LOCK_LOST = "stopped sending: the run lock was lost (its lease could not be renewed)"
# Accounts before contacts (SPEC §9): ChartMogul learns of a company before the contacts
# that name it. Every pending account update is settled before the first contact goes.
SEND_ORDER = ("customer", "contact")

Progress = Callable[[int, int], None]


@dataclass
class RunResult:
    run_id: int
    status: str
    users_seen: int = 0
    users_changed: int = 0
    entered: int = 0
    exited: int = 0
    traits_changed: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    pending: int = 0
    rows_ignored: int = 0
    resent: int = 0
    error: str | None = None
    guard: Verdict | None = None  # the safety guard's verdict, once the diff was judged
    emails_left_out: int = 0
    linked_in_left_out: int = 0
    accounts_seen: int = 0
    accounts_changed: int = 0
    # sent, failed, skipped and pending updates of each entity (`contact`, `customer`)
    by_kind: dict[str, dict[str, int]] = field(default_factory=lambda: {
        kind: dict.fromkeys(("sent", "failed", "skipped", "pending"), 0)
        for kind in SEND_ORDER})

    @property
    def exit_status(self) -> int:
        return {"succeeded": 0, "halted": 4}.get(self.status, 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every count, and the guard's verdict as a dict."""
        return {**vars(self), "guard": self.guard.as_dict() if self.guard else None}


@dataclass
class DryRunReport:
    users_seen: int
    counts: PlanCounts
    kept: int
    rows_ignored: int
    failed_entries: dict[str, str]
    sample: list[dict[str, Any]] = field(default_factory=list)
    guard: Verdict = field(default_factory=Verdict)
    resent: int = 0
    accounts_seen: int = 0

    @property
    def exit_status(self) -> int:
        """4 when a real run would halt (SPEC §4), else 1 if an entry failed, else 0."""
        return 4 if self.guard.halted else 1 if self.failed_entries else 0


@dataclass
class RunOptions:
    """How a run is started; the defaults are a manual `reconciler sync`."""

    trigger: str = "manual"
    resync_keys: Collection[str] = ()
    resync_label: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_by: str | None = None  # the signal that set `stop` (SIGTERM, SIGINT), if one did
    transport: httpx.BaseTransport | None = None
    progress: Progress | None = None
    backoff_initial: float = 0.5
    # Audience keys the safety guard lets through this once (`--accept-exits`).
    accept_exits: Collection[str] = ()


def sync(config: Config, engine: Engine, options: RunOptions | None = None) -> RunResult:
    """Run once under the lock. Raises LockHeld (another run) or RunFailed."""
    options = options or RunOptions()
    redact = config.redact
    lock = RunLock(engine)
    try:
        lock.acquire()
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None
    try:
        now = datetime.now(UTC)
        try:
            with engine.begin() as conn:
                close_interrupted_runs(conn, now)
                mark_left_in_flight(conn, now)
                run_id = start_run(conn, options.trigger, now, options.resync_label)
                _record_keys(conn, config, now)
            lock.set_run(run_id)
        except SQLAlchemyError as exc:
            raise database_error("state", engine, exc) from None
        result = RunResult(run_id, "running")
        try:
            try:
                snapshot = _prepare(config, engine, run_id, options, result)
            except RunHalted as halt:  # nothing of the run was kept; nothing is sent
                result.status, result.error = "halted", redact(str(halt))
                _finish(engine, result)
                return result
            _send(config, engine, run_id, options, lock, result)
            result.status = "partial" if (result.failed or result.pending
                                          or snapshot.failed) else "succeeded"
            if snapshot.failed:
                result.error = redact("; ".join(str(e) for e in snapshot.failed.values()))
            if result.failed or result.pending:  # say why, grouped by cause (SPEC §4)
                stopped = options.stopped_by or ("request" if options.stop.is_set() else None)
                with engine.connect() as conn:
                    why = explain(conn, run_id, result.pending, stopped, lock.lost.is_set())
                result.error = join(result.error, redact(why) if why else None)
            if lock.lost.is_set():  # another run took the lock over: we stopped sending
                result.error = "; ".join(filter(None, (result.error, LOCK_LOST)))
        except (ReconcilerError, SQLAlchemyError) as exc:
            if isinstance(exc, SQLAlchemyError):
                exc = database_error("state", engine, exc)
            result.status, result.error = "failed", redact(str(exc))
            _finish(engine, result)
            raise RunFailed(f"run {run_id} failed: {result.error}") from None
        except Exception as exc:
            # A bug, not a known failure: record the run as failed, then let it surface.
            result.status = "failed"
            result.error = redact(f"unexpected error: {type(exc).__name__}: {exc}")
            _finish(engine, result)
            raise
        else:
            _finish(engine, result)
            return result
        finally:
            prune_after_run(engine, config.history.keep_days)
    finally:
        # If the database is gone, the lease expires and the next run takes over.
        with contextlib.suppress(SQLAlchemyError):
            lock.release()


def dry_run(config: Config, engine: Engine, sample_size: int = 5,
            accept_exits: Collection[str] = ()) -> DryRunReport:
    """Snapshot and diff, then roll everything back: no lock, no run row, nothing sent.

    The report carries the safety guard's verdict, as a real run would judge it.
    """
    try:
        with engine.connect() as state:
            # With custom attributes no contact body can be skipped (each carries its
            # changed keys), unless a contact field change alone makes one, and an
            # account's skip is told in SQL; so the counts come from the diff in SQL and
            # only the sample is built. Otherwise every body is built to count skips.
            fast = config.destination.custom_attributes and not config.profile_send_changes
            snapshot = _snapshot_and_diff(config, state, (), sample_size if fast else None)
            observed_at = snapshot.source.taken_at
            verdict = check_exits(state, config.safety, audience_keys(config), accept_exits)
            planned = fill_plan(state, observed_at, None, config.destination.custom_attributes,
                                max_users=sample_size if fast else None)
            counts, resent = _split_resent(state, count_diff(state) if fast else planned)
            kept = state.exec_driver_sql("SELECT COUNT(*) FROM kept").scalar_one()
            # The sample: the first accounts, then the first contacts.
            rows = [row for entity in SEND_ORDER for row in state.exec_driver_sql(
                f"SELECT body, status, note FROM plan WHERE entity = '{entity}' "
                f"ORDER BY seq LIMIT {int(sample_size)}").all()]
            state.rollback()
            drop_temp_tables(state)
            state.commit()
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None
    sample = [{"status": status, "note": note, "body": json.loads(body)}
              for body, status, note in rows]
    return DryRunReport(snapshot.users_seen, counts, kept, snapshot.rows_ignored,
                        {k: str(e) for k, e in snapshot.failed.items()}, sample,
                        guard=verdict, resent=resent,
                        accounts_seen=snapshot.accounts_seen)


def _split_resent(state: Connection, counts: PlanCounts) -> tuple[PlanCounts, int]:
    """`counts` without the values re-sent as acknowledged (a resync, an uncertain key),
    and how many those are: `entered`, `exited` and `traits_changed` count changes."""
    entered, exited, traits = state.exec_driver_sql(f"""
        SELECT SUM(CASE WHEN kind = 'audience' AND new_value = '{TRUE}' THEN 1 ELSE 0 END),
               SUM(CASE WHEN kind = 'audience' AND new_value <> '{TRUE}' THEN 1 ELSE 0 END),
               SUM(CASE WHEN kind = 'trait' THEN 1 ELSE 0 END)
        FROM diff WHERE old_value = new_value""").one()
    entered, exited, traits = entered or 0, exited or 0, traits or 0
    return replace(counts, entered=counts.entered - entered, exited=counts.exited - exited,
                   traits_changed=counts.traits_changed - traits), entered + exited + traits


def _record_keys(conn: Connection, config: Config, now: datetime) -> None:
    """Keep every key ever configured; retire the ones no longer in the config."""
    known = {row.key: row for row in conn.execute(select(entry_keys))}
    for entry in config.entries:
        row = known.get(entry.key)
        if row is None:
            conn.execute(insert(entry_keys).values(key=entry.key, kind=entry.kind,
                                                   name=entry.name, active=True,
                                                   first_seen_at=now, entity=entry.entity))
        elif (not row.active or row.name != entry.name or row.kind != entry.kind
              or row.entity != entry.entity):
            conn.execute(update(entry_keys).where(entry_keys.c.key == entry.key).values(
                kind=entry.kind, name=entry.name, active=True, retired_at=None,
                entity=entry.entity))
    configured = {e.key for e in config.entries}
    for key, row in known.items():
        if row.active and key not in configured:
            conn.execute(update(entry_keys).where(entry_keys.c.key == key)
                         .values(active=False, retired_at=now))


def _snapshot_and_diff(config: Config, state: Connection, resync_keys: Collection[str],
                       profile_users: int | None = None) -> Snapshot:
    """Snapshot the entries, diff them, then read the profile of the changed users."""
    create_temp_tables(state)
    source = source_engine(config.source_url)
    try:
        try:
            conn = source.connect()
        except SQLAlchemyError as exc:
            raise database_error("source", source, exc) from None
        with conn:
            source_snapshot = begin_snapshot(conn)  # every query below reads this moment
            snapshot = take_snapshot(config, conn, state)
            snapshot.source = source_snapshot
            fill_run_keys(state, snapshot.loaded, snapshot.failed, resync_keys,
                          snapshot.fields)
            fill_diff(state)
            load_profile(config, conn, state, profile_users)
            return snapshot
    finally:
        source.dispose()


def _prepare(config: Config, engine: Engine, run_id: int, options: RunOptions,
             result: RunResult) -> Snapshot:
    """Snapshot, diff and plan; commit the plan as pending updates in one transaction."""
    with engine.connect() as state:
        snapshot = _snapshot_and_diff(config, state, options.resync_keys)
        observed_at = snapshot.source.taken_at
        result.guard = check_exits(state, config.safety, audience_keys(config),
                                   options.accept_exits)
        if result.guard.halted:
            _halt(state, run_id, observed_at, snapshot, options, result)
        counts, result.resent = _split_resent(state, fill_plan(
            state, observed_at, run_id if options.resync_keys else None,
            config.destination.custom_attributes))
        # End the long read transaction before writing: on SQLite, a transaction that
        # read the main database before another connection (the lock's lease renewal)
        # committed can never write ("database is locked", whatever the busy timeout).
        # Only temp tables were written so far, and they outlive the commit.
        state.commit()
        commit_plan(state, run_id, observed_at)
        result.users_seen, result.users_changed = snapshot.users_seen, counts.users
        result.entered, result.exited = counts.entered, counts.exited
        result.traits_changed, result.skipped = counts.traits_changed, counts.skipped
        result.rows_ignored = snapshot.rows_ignored
        result.emails_left_out = counts.emails_left_out
        result.linked_in_left_out = counts.linked_in_left_out
        result.accounts_seen, result.accounts_changed = snapshot.accounts_seen, counts.accounts
        for kind, skipped in _skipped_by_kind(state, run_id).items():
            result.by_kind[kind]["skipped"] = skipped
        update_run(state, run_id, snapshot_at=observed_at, users_seen=result.users_seen,
                   users_changed=counts.users, entered=counts.entered, exited=counts.exited,
                   traits_changed=counts.traits_changed, skipped=counts.skipped,
                   rows_ignored=snapshot.rows_ignored, resent=result.resent,
                   source_snapshot=snapshot.source.id, accounts_seen=snapshot.accounts_seen,
                   accounts_changed=counts.accounts)
        state.commit()
        drop_temp_tables(state)
        state.commit()
    return snapshot


def _halt(state: Connection, run_id: int, observed_at: datetime, snapshot: Snapshot,
          options: RunOptions, result: RunResult) -> None:
    """Drop everything the run planned, record what it saw, and raise RunHalted."""
    assert result.guard is not None
    # Only temp tables were written; the rollback also ends the read transaction, so
    # the row below can be written (see the SQLite note in `_prepare`).
    state.rollback()
    drop_temp_tables(state)
    state.commit()
    result.users_seen, result.rows_ignored = snapshot.users_seen, snapshot.rows_ignored
    # The write first: on SQLite it takes the write lock before anything is read.
    update_run(state, run_id, snapshot_at=observed_at, users_seen=result.users_seen,
               rows_ignored=result.rows_ignored)
    result.pending = count_pending(state)  # earlier updates stay pending, unsent
    state.commit()
    message = result.guard.message(proceed_command(options.trigger, options.resync_label))
    failures = "; ".join(str(e) for e in snapshot.failed.values())
    raise RunHalted("; ".join(filter(None, (message, failures))), result.guard)


def _skipped_by_kind(state: Connection, run_id: int) -> dict[str, int]:
    rows = state.execute(select(updates.c.entity, func.count()).where(
        updates.c.run_id == run_id, updates.c.status == "skipped")
        .group_by(updates.c.entity)).all()
    return {str(kind): int(count) for kind, count in rows}


def _send(config: Config, engine: Engine, run_id: int, options: RunOptions, lock: RunLock,
          result: RunResult) -> None:
    """Send every pending update, accounts first, each kind oldest first, recording
    results in small batches."""
    with engine.connect() as conn, Sender(
            config.destination, stops=(options.stop, lock.lost), transport=options.transport,
            backoff_initial=options.backoff_initial) as sender:
        total = count_pending(conn)
        conn.commit()
        done = 0
        for entity in SEND_ORDER:
            # One kind at a time: the pace, the concurrency limit and the retry budget
            # are shared, and the accounts' last requests end before contacts start.
            batch: list[Delivery] = []
            flushed = time.monotonic()
            for delivery in sender.deliver(_jobs(conn, entity)):
                batch.append(delivery)
                if len(batch) >= FLUSH_EVERY or time.monotonic() - flushed > FLUSH_SECONDS:
                    done += _flush(conn, run_id, batch, result, entity)
                    flushed = time.monotonic()
                    if options.progress:
                        options.progress(done, total)
            done += _flush(conn, run_id, batch, result, entity)
            if sender.stopping():
                break
        if options.progress:
            options.progress(done, total)
        result.pending = count_pending(conn)
        for entity in SEND_ORDER:
            result.by_kind[entity]["pending"] = count_pending(conn, entity)
        conn.commit()


def _jobs(conn: Connection, entity: str) -> Iterator[Job]:
    """Pending updates of one kind, oldest first, each page marked in flight before it
    is sent."""
    after = 0
    while page := pending_page(conn, after, PAGE, entity):
        mark_in_flight(conn, [update_id for update_id, _, _ in page], datetime.now(UTC))
        conn.commit()
        for update_id, message_id, body in page:
            yield Job(update_id, message_id, body)
        after = page[-1][0]


def _flush(conn: Connection, run_id: int, batch: list[Delivery], result: RunResult,
           entity: str = "contact") -> int:
    """Record a batch of deliveries in one transaction; acknowledgements move with them."""
    if not batch:
        return 0
    record_deliveries(conn, run_id, [(d.job.update_id, d.result, d.attempts) for d in batch],
                      datetime.now(UTC))
    for delivery in batch:
        if delivery.result == "acknowledged":
            result.sent += 1
            result.by_kind[entity]["sent"] += 1
        elif delivery.attempts:
            result.failed += 1
            result.by_kind[entity]["failed"] += 1
    update_run(conn, run_id, sent=result.sent, failed=result.failed)
    conn.commit()
    count = len(batch)
    batch.clear()
    return count


def _finish(engine: Engine, result: RunResult) -> None:
    try:
        with engine.begin() as conn:
            update_run(conn, result.run_id, status=result.status,
                       finished_at=datetime.now(UTC), sent=result.sent, failed=result.failed,
                       pending=result.pending, error=result.error)
    except SQLAlchemyError:
        pass  # the state database went away; the next run closes this row as interrupted
