"""`reconciler daemon`: one sync at start, then on `[schedule]` (UTC), until SIGTERM/SIGINT.

APScheduler 3.x is wiring only (`build_scheduler`): one job, `coalesce=True` (missed
ticks collapse into one run), `max_instances=1` (a tick that comes while the run is
still going is dropped), an explicit misfire grace. The job body is `run_once`, a
plain function that never raises: a tick that finds the lock held logs one line and
is skipped; a run that fails or crashes is recorded and logged, and the next tick
runs as usual. The daemon never accepts exits on its own: a run the safety guard
halts (SPEC §10) logs one error line and sets `reconciler_halted_audiences`, and so
does every tick after it until the source is fixed or a person runs
`reconciler sync --accept-exits KEY`.

A stop signal sets the run's stop event: no new request is sent, requests in flight
finish and are recorded, everything else stays pending for the next run. The
scheduler is then shut down once the job has returned, so no run is left `running`.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from apscheduler.events import EVENT_SCHEDULER_STARTED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import disable_created_metrics
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from reconciler.config import Config, Schedule
from reconciler.errors import ConfigError, LockHeld, ReconcilerError
from reconciler.ops.crontab import cron_trigger
from reconciler.ops.metrics import Metrics, serve
from reconciler.run import RunRequest, RunResult, Seams, sync
from reconciler.state.db import database_error
from reconciler.summaries import run_line

JOB_ID = "reconciler-sync"
SCHEDULED = RunRequest(trigger="schedule")
# A tick that could not start on time (the machine slept, the process was paused)
# still runs if it is at most this late; later than that, the next tick is closer.
MISFIRE_GRACE_SECONDS = 15 * 60

log = logging.getLogger(__name__)


def require_schedule(config: Config) -> Schedule:
    """The `[schedule]` the daemon runs on, or a ConfigError saying how to fix it."""
    schedule = config.schedule
    if schedule is None or (schedule.interval_minutes is None and schedule.cron is None):
        raise ConfigError(
            config.path,
            "[schedule]",
            "is missing; `reconciler daemon` needs it",
            'add [schedule] with interval_minutes = 120 or cron = "0 */2 * * *"',
        )
    try:
        trigger_for(schedule)
    except ValueError as exc:
        raise ConfigError(
            config.path,
            "[schedule] cron",
            f'"{schedule.cron}" is invalid ({exc})',
            'use five fields, e.g. "0 */2 * * *"',
        ) from None
    return schedule


def trigger_for(schedule: Schedule) -> Any:
    """An interval, or a five-field cron expression read as crontab(5) reads it; UTC."""
    if schedule.cron is not None:
        return cron_trigger(schedule.cron, UTC)
    assert schedule.interval_minutes is not None
    return IntervalTrigger(minutes=schedule.interval_minutes, timezone=UTC)


def describe(schedule: Schedule) -> str:
    if schedule.cron is not None:
        return f'cron "{schedule.cron}" (UTC)'
    minutes = float(schedule.interval_minutes or 0)
    if minutes == 1:
        return "every minute"
    return f"every {int(minutes) if minutes.is_integer() else minutes} minutes"


def build_scheduler(
    schedule: Schedule, job: Callable[[], Any], first_run_at: datetime
) -> BlockingScheduler:
    """The scheduler with its one job; the first run is due at `first_run_at`."""
    scheduler = BlockingScheduler(
        timezone=UTC, executors={"default": ThreadPoolExecutor(max_workers=1)}
    )
    scheduler.add_job(
        job,
        trigger_for(schedule),
        id=JOB_ID,
        name="reconciler sync",
        coalesce=True,
        max_instances=1,
        misfire_grace_time=MISFIRE_GRACE_SECONDS,
        next_run_time=first_run_at,
    )
    return scheduler


def run_once(
    config: Config, engine: Engine, seams: Seams | None = None, metrics: Metrics | None = None
) -> RunResult | None:
    """The job body: one scheduled sync, one log line; never raises. None when no run
    finished. The daemon never accepts exits on its own (SPEC §10)."""
    seams = seams or Seams()
    if seams.stop.is_set():
        return None
    started = time.monotonic()
    try:
        result = sync(config, engine, SCHEDULED, seams)
    except LockHeld as exc:
        log.info(
            "tick skipped: %s", exc, extra={"fields": {"event": "skipped", "reason": str(exc)}}
        )
        if metrics:
            metrics.lock_skips.inc()
        return None
    except Exception as exc:
        seconds = time.monotonic() - started
        if isinstance(exc, ReconcilerError):
            message = str(exc)
        else:  # a bug: keep the traceback, secret-free
            message = config.redact("".join(traceback.format_exception(exc)).strip())
        log.error(
            "%s",
            message,
            extra={
                "fields": {
                    "event": "run",
                    "status": "failed",
                    "trigger": SCHEDULED.trigger,
                    "duration_seconds": round(seconds, 3),
                    "error": message,
                }
            },
        )
        if metrics:
            metrics.run_failed(seconds)
        return None
    seconds = time.monotonic() - started
    if metrics:
        metrics.run_finished(result, seconds, time.time())
    _log_run(result, SCHEDULED.trigger, seconds)
    return result


def _log_run(result: RunResult, trigger: str, seconds: float) -> None:
    message = run_line(result, seconds)
    fields = {
        "event": "run",
        "trigger": trigger,
        "duration_seconds": round(seconds, 3),
        **result.as_dict(),
    }
    level = {"succeeded": logging.INFO, "halted": logging.ERROR}.get(result.status, logging.WARNING)
    log.log(level, "%s", message, extra={"fields": fields})


def run_daemon(config: Config, engine: Engine) -> None:
    """Run until SIGTERM or SIGINT; returns after a clean stop."""
    schedule = require_schedule(config)
    # `*_created` samples double every counter's series for no alerting value; the
    # switch is process-wide, so it is thrown here, in the daemon's own process.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = Metrics()
    stop_metrics = _start_metrics(config, engine, metrics)
    options = Seams()
    job = functools.partial(run_once, config, engine, options, metrics)
    scheduler = build_scheduler(schedule, job, datetime.now(UTC))
    started = threading.Event()
    scheduler.add_listener(lambda _event: started.set(), EVENT_SCHEDULER_STARTED)
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only set flags here: the watcher thread does the rest, outside signal context.
        received.append(signal.Signals(signum).name)
        options.stopped_by = options.stopped_by or received[0]
        options.stop.set()

    watcher = threading.Thread(
        target=_stop_when_asked,
        name="stop-watcher",
        daemon=True,
        args=(scheduler, options.stop, started, received),
    )
    watcher.start()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "daemon started: %s; first run now",
        describe(schedule),
        extra={"fields": {"event": "started"}},
    )
    try:
        scheduler.start()
        watcher.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop_metrics:
            stop_metrics()
    log.info("daemon stopped", extra={"fields": {"event": "stopped"}})


def _stop_when_asked(
    scheduler: BlockingScheduler,
    stop: threading.Event,
    started: threading.Event,
    received: list[str],
) -> None:
    stop.wait()
    log.info(
        "%s received: stopping once the run in progress has recorded its deliveries",
        received[0] if received else "stop",
        extra={"fields": {"event": "stopping"}},
    )
    started.wait()
    scheduler.shutdown(wait=True)  # waits for the job; then `start()` returns


def _start_metrics(config: Config, engine: Engine, metrics: Metrics) -> Callable[[], None] | None:
    port, host = config.daemon.metrics_port, config.daemon.metrics_host
    if port is None:
        return None
    try:
        metrics.load(engine)
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None
    try:
        stop = serve(metrics, host, port)
    except OSError as exc:
        raise ConfigError(
            config.path,
            "[daemon] metrics_port",
            f"cannot listen on {host}:{port} ({exc.strerror or exc})",
            "choose a free port, or stop what listens there",
        ) from None
    # Not written as a URL: the log redaction masks every URL's path.
    log.info(
        "serving metrics on %s port %d, path /metrics",
        host,
        port,
        extra={"fields": {"event": "metrics", "host": host, "port": port}},
    )
    return stop
