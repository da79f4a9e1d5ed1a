"""Prometheus metrics of the daemon, served when `[daemon] metrics_port` is set.

    reconciler_runs_total{status}               runs finished: succeeded, partial, failed,
                                                halted (the safety guard, SPEC §10)
    reconciler_updates_total{outcome,kind}      updates sent, failed (pending or rejected),
                                                skipped (SPEC §5); kind contact or customer
    reconciler_lock_skips_total                 ticks skipped because another run held the lock
    reconciler_pending_updates{kind}            updates waiting for the next run
    reconciler_last_success_timestamp_seconds   end of the newest succeeded run (Unix time)
    reconciler_run_duration_seconds             histogram of run wall time
    reconciler_snapshot_users                   distinct users in the newest snapshot
    reconciler_halted_audiences                 audiences that halted the newest run (0 when
                                                it was not halted): alert on > 0
    reconciler_snapshot_accounts                distinct accounts in the newest snapshot

Counters count this process's runs. The gauges start from the state database, so a
restarted daemon does not forget when the last success was.
Every metric lives in its own `CollectorRegistry`, never prometheus_client's global one.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from sqlalchemy import Engine, func, select

from reconciler.outcome import RunResult
from reconciler.state.schema import ENTITIES, sync_runs, updates

STATUSES = ("succeeded", "partial", "failed", "halted")
OUTCOMES = ("sent", "failed", "skipped")
KINDS = ENTITIES  # contact (Send Contact), customer (Send Customer)
# Runs take from seconds (nothing changed) to an hour (a first sync of millions).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))


class Metrics:
    """The daemon's metrics, fed by the job body after every tick."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "reconciler_runs", "Runs finished, by status.", ["status"], registry=self.registry
        )
        self.updates = Counter(
            "reconciler_updates",
            "Updates by outcome and kind.",
            ["outcome", "kind"],
            registry=self.registry,
        )
        self.lock_skips = Counter(
            "reconciler_lock_skips",
            "Ticks skipped because another run held the lock.",
            registry=self.registry,
        )
        self.pending = Gauge(
            "reconciler_pending_updates",
            "Updates not yet acknowledged, retried by the next run.",
            ["kind"],
            registry=self.registry,
        )
        self.last_success = Gauge(
            "reconciler_last_success_timestamp_seconds",
            "When the newest succeeded run finished (Unix time).",
            registry=self.registry,
        )
        self.duration = Histogram(
            "reconciler_run_duration_seconds",
            "Run wall time.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.snapshot_users = Gauge(
            "reconciler_snapshot_users",
            "Distinct users in the newest snapshot.",
            registry=self.registry,
        )
        self.halted_audiences = Gauge(
            "reconciler_halted_audiences",
            "Audiences whose exits halted the newest run (safety guard); 0 if not halted.",
            registry=self.registry,
        )
        self.snapshot_accounts = Gauge(
            "reconciler_snapshot_accounts",
            "Distinct accounts in the newest snapshot.",
            registry=self.registry,
        )
        for status in STATUSES:
            self.runs.labels(status)
        for kind in KINDS:
            self.pending.labels(kind)
            for outcome in OUTCOMES:
                self.updates.labels(outcome, kind)

    def load(self, engine: Engine) -> None:
        """Start the gauges from what the state database already knows."""
        with engine.connect() as conn:
            pending: dict[str, int] = {
                str(kind): int(count)
                for kind, count in conn.execute(
                    select(updates.c.entity, func.count())
                    .where(updates.c.status == "pending")
                    .group_by(updates.c.entity)
                )
            }
            last_success = conn.execute(
                select(func.max(sync_runs.c.finished_at)).where(sync_runs.c.status == "succeeded")
            ).scalar()
            newest = conn.execute(
                select(sync_runs.c.users_seen, sync_runs.c.accounts_seen)
                .where(sync_runs.c.status != "running", sync_runs.c.snapshot_at.is_not(None))
                .order_by(sync_runs.c.id.desc())
                .limit(1)
            ).first()
        for kind in KINDS:
            self.pending.labels(kind).set(pending.get(kind, 0))
        if last_success is not None:
            self.last_success.set(last_success.timestamp())
        if newest is not None:
            self.snapshot_users.set(newest.users_seen)
            self.snapshot_accounts.set(newest.accounts_seen)

    def run_finished(self, result: RunResult, seconds: float, finished_at: float) -> None:
        """A run that returned a result (succeeded, partial or halted)."""
        self.runs.labels(result.status).inc()
        tripped = result.guard.tripped if result.guard and result.status == "halted" else ()
        self.halted_audiences.set(len(tripped))
        for kind in KINDS:
            counts = result.by_kind[kind]
            for outcome in OUTCOMES:
                self.updates.labels(outcome, kind).inc(counts[outcome])
            self.pending.labels(kind).set(counts["pending"])
        self.snapshot_users.set(result.users_seen)
        self.snapshot_accounts.set(result.accounts_seen)
        self.duration.observe(seconds)
        if result.status == "succeeded":
            self.last_success.set(finished_at)

    def run_failed(self, seconds: float) -> None:
        """A run that raised: recorded as failed in the database, counted here."""
        self.runs.labels("failed").inc()
        self.halted_audiences.set(0)  # no audience tripped: the run never got that far
        self.duration.observe(seconds)


def serve(metrics: Metrics, host: str, port: int) -> Callable[[], None]:
    """Serve /metrics on host:port in a background thread; returns a function to stop it.

    Raises OSError when the address cannot be bound.
    """
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop
