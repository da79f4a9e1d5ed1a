"""The plan phase of a run: snapshot, diff, guard, plan, and commit the plan (SPEC §1).

    with plan_run(config, engine, run_id, request) as plan:   LivePlan
        plan.pages(entity)      each page committed as pending updates, then sent
        plan.finish()           Planned: what the plan phase saw
    dry_run(config, engine, ...)                             DryRunReport; nothing durable

Both open one state connection, snapshot the source into its temporary tables in one
read-only source transaction, diff in SQL and let the safety guard judge the diff
(guard.py). A real run then supersedes the live updates it does not keep and writes
its plan as pending updates one page at a time (one transaction each), as the sender
draws them: every update is durable before it can be sent, so a crash at any point
loses nothing, and the first request does not wait for the whole plan. A halted run
(`RunHalted`) keeps nothing it planned; a dry run rolls everything back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from reconciler.config import Config
from reconciler.errors import RunHalted
from reconciler.outcome import SEND_ORDER, DryRunReport, RunRequest
from reconciler.pipeline.diff import fill_diff, fill_run_keys
from reconciler.pipeline.guard import Verdict, audience_keys, proceed_command
from reconciler.pipeline.guard import check as check_exits
from reconciler.pipeline.plan import PlanCounts, PlanWriter, count_diff, fill_plan
from reconciler.pipeline.snapshot import (
    Snapshot,
    create_temp_tables,
    drop_temp_tables,
    load_profile,
    take_snapshot,
)
from reconciler.pipeline.source import TRUE
from reconciler.pipeline.source_snapshot import begin_snapshot
from reconciler.state.backend import Backend
from reconciler.state.db import database_error, source_engine
from reconciler.state.ledger import commit_page, count_pending, supersede_stale, update_run
from reconciler.state.schema import updates


@dataclass(frozen=True)
class Planned:
    """What the plan phase saw and committed."""

    observed_at: datetime
    users_seen: int
    accounts_seen: int
    rows_ignored: int
    counts: PlanCounts
    resent: int
    guard: Verdict
    failed_entries: tuple[str, ...]  # the messages of entries that failed this run
    skipped_by_kind: dict[str, int]


@contextlib.contextmanager
def plan_run(
    config: Config, engine: Engine, run_id: int, request: RunRequest
) -> Iterator[LivePlan]:
    """Snapshot, diff and guard; then the plan, to be made durable page by page as the
    sender draws it (`LivePlan.pages`) and closed with `LivePlan.finish`.

    Raises RunHalted (after recording what the run saw) when the guard trips; then
    nothing of the run was kept.
    """
    with engine.connect() as state:
        Backend(state).analyze_stale()  # before the diff plans its joins on them
        snapshot = snapshot_and_diff(config, state, request.resync_keys)
        observed_at = snapshot.source.taken_at
        verdict = check_exits(state, config.safety, audience_keys(config), request.accept_exits)
        if verdict.halted:
            _halt(state, run_id, snapshot, verdict, request)
        counts, resent = split_resent(state, count_diff(state))
        # End the long read transaction before writing: on SQLite, a transaction that
        # read the main database before another connection (the lock's lease renewal)
        # committed can never write ("database is locked", whatever the busy timeout).
        # Only temp tables were written so far, and they outlive the commit.
        state.commit()
        base = supersede_stale(state)
        update_run(
            state,
            run_id,
            snapshot_at=observed_at,
            users_seen=snapshot.users_seen,
            users_changed=counts.users,
            entered=counts.entered,
            exited=counts.exited,
            traits_changed=counts.traits_changed,
            rows_ignored=snapshot.rows_ignored,
            resent=resent,
            source_snapshot=snapshot.source.id,
            accounts_seen=snapshot.accounts_seen,
            accounts_changed=counts.accounts,
        )
        state.commit()
        writer = PlanWriter(
            state,
            observed_at,
            run_id if request.resync_keys else None,
            config.destination.custom_attributes,
            after_read=state.commit,
        )
        try:
            yield LivePlan(state, run_id, snapshot, verdict, counts, resent, writer, base)
        finally:
            # Closing the connection drops its temporary tables with it, which costs
            # nothing on PostgreSQL (the server does it as the session ends) and
            # deletes a file on SQLite, where DROP TABLE frees every page in turn
            # (half a second for 100,000 planned users).
            state.invalidate()


@dataclass
class LivePlan:
    """A run's plan after the guard let it through, made durable as it is sent.

    `pages(entity)` builds the plan of one kind a page at a time and commits each page
    as pending updates before yielding them, so every update is durable before it can
    be sent and the first request leaves after one small page, not after the whole
    plan. A killed run leaves some pages pending and the rest unplanned; the next
    run keeps or re-derives them all from its diff, with the same ids. The counts
    in `sync_runs` are recorded from the diff before the first page.
    """

    state: Connection
    run_id: int
    snapshot: Snapshot
    verdict: Verdict
    counts: PlanCounts  # from the diff, in SQL; skips come from the pages
    resent: int
    writer: PlanWriter
    base: int  # the run's updates are numbered base + seq
    error: Exception | None = None  # what ended the pages early (raised by finish)

    @property
    def expected(self) -> int:
        """Updates this plan will add at most (skips included)."""
        return self.counts.users + self.counts.accounts

    def pages(self, entity: str) -> Iterator[list[tuple[int, str, str]]]:
        """Each committed page's pending updates of `entity`: (id, message_id, body).

        A database error ends the pages (the sender then finishes what it was handed)
        and is raised by `finish`.
        """
        if self.error is not None or entity not in self.writer.entities():
            return
        try:
            for rows in self.writer.pages(entity):
                page = commit_page(
                    self.state, self.run_id, self.snapshot.source.taken_at, self.base, rows
                )
                self.state.commit()
                yield page
        except SQLAlchemyError as exc:
            self.error = exc
            with contextlib.suppress(SQLAlchemyError):
                self.state.rollback()
            return

    def finish(self) -> Planned:
        """Record the skips; what the plan phase saw. Raises what ended the pages."""
        if self.error is not None:
            raise self.error
        state = self.state
        built = self.writer.counts
        counts = replace(
            self.counts,
            skipped=built.skipped,
            emails_left_out=built.emails_left_out,
            linked_in_left_out=built.linked_in_left_out,
        )
        update_run(state, self.run_id, skipped=counts.skipped)
        skipped = _skipped_by_kind(state, self.run_id)
        state.commit()
        snapshot = self.snapshot
        return Planned(
            snapshot.source.taken_at,
            snapshot.users_seen,
            snapshot.accounts_seen,
            snapshot.rows_ignored,
            counts,
            self.resent,
            self.verdict,
            tuple(str(e) for e in snapshot.failed.values()),
            skipped,
        )


def dry_run(
    config: Config, engine: Engine, sample_size: int = 5, accept_exits: Collection[str] = ()
) -> DryRunReport:
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
            snapshot = snapshot_and_diff(config, state, (), sample_size if fast else None)
            observed_at = snapshot.source.taken_at
            verdict = check_exits(state, config.safety, audience_keys(config), accept_exits)
            planned = fill_plan(
                state,
                observed_at,
                None,
                config.destination.custom_attributes,
                max_users=sample_size if fast else None,
            )
            counts, resent = split_resent(state, count_diff(state) if fast else planned)
            kept = state.exec_driver_sql("SELECT COUNT(*) FROM kept").scalar_one()
            # The sample: the first accounts, then the first contacts.
            rows = [
                row
                for entity in SEND_ORDER
                for row in state.exec_driver_sql(
                    f"SELECT body, status, note FROM plan WHERE entity = '{entity}' "
                    f"ORDER BY seq LIMIT {int(sample_size)}"
                ).all()
            ]
            state.rollback()
            drop_temp_tables(state)
            state.commit()
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None
    sample = [
        {"status": status, "note": note, "body": json.loads(body)} for body, status, note in rows
    ]
    return DryRunReport(
        snapshot.users_seen,
        counts,
        kept,
        snapshot.rows_ignored,
        {k: str(e) for k, e in snapshot.failed.items()},
        sample,
        guard=verdict,
        resent=resent,
        accounts_seen=snapshot.accounts_seen,
    )


def snapshot_and_diff(
    config: Config,
    state: Connection,
    resync_keys: Collection[str],
    profile_users: int | None = None,
) -> Snapshot:
    """Snapshot the entries, diff them, then read the profile of the changed users.

    Every source query runs in one read-only transaction of one source connection
    (source_snapshot.py), so the whole snapshot describes one moment.
    """
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
            fill_run_keys(state, snapshot.loaded, snapshot.failed, resync_keys, snapshot.fields)
            fill_diff(state)
            load_profile(config, conn, state, profile_users)
            return snapshot
    finally:
        source.dispose()


def split_resent(state: Connection, counts: PlanCounts) -> tuple[PlanCounts, int]:
    """`counts` without the values re-sent as acknowledged (a resync, an uncertain key),
    and how many those are: `entered`, `exited` and `traits_changed` count changes."""
    entered, exited, traits = state.exec_driver_sql(f"""
        SELECT SUM(CASE WHEN kind = 'audience' AND new_value = '{TRUE}' THEN 1 ELSE 0 END),
               SUM(CASE WHEN kind = 'audience' AND new_value <> '{TRUE}' THEN 1 ELSE 0 END),
               SUM(CASE WHEN kind = 'trait' THEN 1 ELSE 0 END)
        FROM diff WHERE old_value = new_value""").one()
    entered, exited, traits = entered or 0, exited or 0, traits or 0
    return replace(
        counts,
        entered=counts.entered - entered,
        exited=counts.exited - exited,
        traits_changed=counts.traits_changed - traits,
    ), entered + exited + traits


def _halt(
    state: Connection, run_id: int, snapshot: Snapshot, verdict: Verdict, request: RunRequest
) -> None:
    """Drop everything the run planned, record what it saw, and raise RunHalted."""
    # Only temp tables were written; the rollback also ends the read transaction, so
    # the row below can be written (see the SQLite note in `plan_run`).
    state.rollback()
    drop_temp_tables(state)
    state.commit()
    # The write first: on SQLite it takes the write lock before anything is read.
    update_run(
        state,
        run_id,
        snapshot_at=snapshot.source.taken_at,
        users_seen=snapshot.users_seen,
        rows_ignored=snapshot.rows_ignored,
    )
    pending = count_pending(state)  # earlier updates stay pending, unsent
    update_run(state, run_id, pending=pending)
    state.commit()
    message = verdict.message(proceed_command(request.trigger, request.resync_label))
    failures = "; ".join(str(e) for e in snapshot.failed.values())
    raise RunHalted(
        "; ".join(filter(None, (message, failures))),
        verdict,
        users_seen=snapshot.users_seen,
        rows_ignored=snapshot.rows_ignored,
        pending=pending,
    )


def _skipped_by_kind(state: Connection, run_id: int) -> dict[str, int]:
    rows = state.execute(
        select(updates.c.entity, func.count())
        .where(updates.c.run_id == run_id, updates.c.status == "skipped")
        .group_by(updates.c.entity)
    ).all()
    return {str(kind): int(count) for kind, count in rows}
