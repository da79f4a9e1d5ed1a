"""The send phase of a run: every pending update, accounts first, paced and retried.

    send_pending(config, engine, run_id, seams, lock, plan)   Sent

Pending updates are read a page at a time, then the run's plan is drawn a page at a
time (each page committed as pending updates first, planning.LivePlan); each page is
marked in flight (committed) before it is handed to the sender, so a killed process
leaves a trace the next run turns into uncertain keys (SPEC §6). Results are recorded
in small batches, one transaction each, and every acknowledgement moves the
acknowledged state in the same transaction that records its delivery
(ledger.record_deliveries).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine

from reconciler.config import Config
from reconciler.outcome import SEND_ORDER, Seams
from reconciler.state.ledger import (
    count_pending,
    mark_in_flight,
    pending_page,
    record_deliveries,
    update_run,
)
from reconciler.state.lock import RunLock

if TYPE_CHECKING:
    from reconciler.delivery.sender import Delivery, Job
    from reconciler.pipeline.planning import LivePlan

PAGE = 200  # updates marked in flight at a time, a little ahead of the senders
FLUSH_EVERY = 100
FLUSH_SECONDS = 0.25


@dataclass(frozen=True)
class Sent:
    """What the send phase did: updates acknowledged and failed, of each kind too, and
    how many are still pending when it ended."""

    sent: int = 0
    failed: int = 0
    pending: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class _Tally:
    sent: int = 0
    failed: int = 0
    by_kind: dict[str, dict[str, int]] = field(
        default_factory=lambda: {kind: {"sent": 0, "failed": 0} for kind in SEND_ORDER}
    )


def send_pending(
    config: Config,
    engine: Engine,
    run_id: int,
    seams: Seams,
    lock: RunLock,
    plan: LivePlan | None = None,
) -> Sent:
    """Send every pending update, accounts first, each kind oldest first, then the
    pages of this run's `plan` of that kind as they are made durable."""
    with engine.connect() as conn:
        total = count_pending(conn) + (plan.expected if plan else 0)
        conn.commit()
        if not total:  # the common no-change run: no client, no thread, no TLS set-up
            if seams.progress:
                seams.progress(0, 0)
            return Sent(by_kind=_pending_by_kind(conn, _Tally()))
        from reconciler.delivery.sender import (
            Sender,  # httpx and the retry machinery, only when needed
        )

        tally = _Tally()
        with Sender(
            config.destination,
            stops=(seams.stop, lock.lost),
            transport=seams.transport,
            backoff_initial=seams.backoff_initial,
        ) as sender:
            done = 0
            for entity in SEND_ORDER:
                # One kind at a time: the pace, the concurrency limit and the retry
                # budget are shared, and the accounts' last requests end before
                # contacts start.
                batch: list[Delivery] = []
                flushed = time.monotonic()
                for delivery in sender.deliver(_jobs(conn, entity, plan)):
                    batch.append(delivery)
                    if len(batch) >= FLUSH_EVERY or time.monotonic() - flushed > FLUSH_SECONDS:
                        done += _flush(conn, run_id, batch, tally, entity)
                        flushed = time.monotonic()
                        if seams.progress:
                            seams.progress(done, total)
                done += _flush(conn, run_id, batch, tally, entity)
                if sender.stopping():
                    break
        if seams.progress:
            seams.progress(done, total)
        pending = count_pending(conn)
        by_kind = _pending_by_kind(conn, tally)
        conn.commit()
    return Sent(tally.sent, tally.failed, pending, by_kind)


def _pending_by_kind(conn: Connection, tally: _Tally) -> dict[str, dict[str, int]]:
    return {
        kind: {**tally.by_kind[kind], "pending": count_pending(conn, kind)} for kind in SEND_ORDER
    }


def _jobs(conn: Connection, entity: str, plan: LivePlan | None) -> Iterator[Job]:
    """Pending updates of one kind, oldest first, then the plan's pages of that kind;
    each page marked in flight before it is sent."""
    from reconciler.delivery.sender import Job

    after = 0
    while page := pending_page(conn, after, PAGE, entity):
        yield from _handed_over(conn, page, Job)
        after = page[-1][0]
    if plan is not None:
        for planned in plan.pages(entity):
            for start in range(0, len(planned), PAGE):
                yield from _handed_over(conn, planned[start : start + PAGE], Job)


def _handed_over(
    conn: Connection, page: list[tuple[int, str, str]], job: type[Job]
) -> Iterator[Job]:
    mark_in_flight(conn, [update_id for update_id, _, _ in page], datetime.now(UTC))
    conn.commit()
    for update_id, message_id, body in page:
        yield job(update_id, message_id, body)


def _flush(conn: Connection, run_id: int, batch: list[Delivery], tally: _Tally, entity: str) -> int:
    """Record a batch of deliveries in one transaction; acknowledgements move with them."""
    if not batch:
        return 0
    record_deliveries(
        conn, run_id, [(d.job.update_id, d.result, d.attempts) for d in batch], datetime.now(UTC)
    )
    for delivery in batch:
        if delivery.result == "acknowledged":
            tally.sent += 1
            tally.by_kind[entity]["sent"] += 1
        elif delivery.attempts:
            tally.failed += 1
            tally.by_kind[entity]["failed"] += 1
    update_run(conn, run_id, sent=tally.sent, failed=tally.failed)
    conn.commit()
    count = len(batch)
    batch.clear()
    return count
