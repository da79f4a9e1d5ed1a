"""`reconciler daemon`: the scheduler wiring, the job body, and the real process."""

from __future__ import annotations

import logging
import signal
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from click.testing import CliRunner
from sqlalchemy import func, select

from reconciler.cli import main
from reconciler.config import Schedule
from reconciler.ops.daemon import JOB_ID, MISFIRE_GRACE_SECONDS, build_scheduler, run_once
from reconciler.ops.metrics import Metrics
from reconciler.run import Seams
from reconciler.state.lock import RunLock
from reconciler.state.schema import sync_runs, updates

from .conftest import Setup
from .processes import Daemon, all_runs, finished_runs, wait_for
from .receiver import Reply

FIRST_RUN = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def daemon_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "reconciler.ops.daemon"]


@pytest.fixture
def people(setup: Setup) -> Setup:
    for user in ("u1", "u2", "u3"):
        setup.warehouse.user(user, email=f"{user}@example.com")
    setup.warehouse.members("High Value Users", "u1", "u2", "u3")
    return setup


# --- the scheduler, inspected without running it ------------------------------------


@pytest.mark.parametrize(
    "schedule, trigger_type",
    [
        (Schedule(interval_minutes=120), IntervalTrigger),
        (Schedule(cron="0 */2 * * *"), CronTrigger),
    ],
    ids=["interval", "cron"],
)
def test_scheduler_has_one_coalescing_single_instance_job(schedule, trigger_type):
    scheduler = build_scheduler(schedule, lambda: None, FIRST_RUN)
    job = scheduler.get_job(JOB_ID)
    assert isinstance(job.trigger, trigger_type)
    assert str(job.trigger.timezone) == "UTC" and str(scheduler.timezone) == "UTC"
    assert job.coalesce is True
    assert job.max_instances == 1
    assert job.misfire_grace_time == MISFIRE_GRACE_SECONDS
    assert len(scheduler.get_jobs()) == 1


def test_first_run_is_due_at_start():
    scheduler = build_scheduler(Schedule(interval_minutes=5), lambda: None, FIRST_RUN)
    assert scheduler.get_job(JOB_ID).next_run_time == FIRST_RUN


def test_interval_and_cron_come_from_the_schedule():
    interval = build_scheduler(Schedule(interval_minutes=90), lambda: None, FIRST_RUN)
    assert interval.get_job(JOB_ID).trigger.interval == timedelta(minutes=90)
    cron = build_scheduler(Schedule(cron="15 */2 * * 1-5"), lambda: None, FIRST_RUN)
    saturday = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert cron.get_job(JOB_ID).trigger.get_next_fire_time(None, saturday) == datetime(
        2026, 11, 30, 0, 15, tzinfo=UTC
    )  # Monday, crontab's 1


# --- the job body, called directly ----------------------------------------------------


def test_job_body_runs_one_scheduled_sync_and_logs_one_line_with_counts(people, engine_of, caplog):
    caplog.set_level(logging.INFO, logger="reconciler.ops.daemon")
    engine, metrics = engine_of(people), Metrics()
    result = run_once(people.config(), engine, Seams(), metrics)
    assert result is not None and result.status == "succeeded"
    (line,) = daemon_log(caplog)
    assert line.getMessage().startswith(f"run {result.run_id} succeeded in ")
    assert "3 users seen, 3 changed (entered 3" in line.getMessage()
    fields = line.fields  # type: ignore[attr-defined]  # set by the log call's extra
    assert fields["sent"] == 3 and fields["trigger"] == "schedule"
    assert [r.trigger for r in all_runs(engine)] == ["schedule"]
    sample = metrics.registry.get_sample_value
    assert sample("reconciler_runs_total", {"status": "succeeded"}) == 1
    assert sample("reconciler_updates_total", {"outcome": "sent", "kind": "contact"}) == 3


def test_tick_finding_the_lock_held_logs_one_line_and_skips(people, engine_of, caplog):
    caplog.set_level(logging.INFO, logger="reconciler.ops.daemon")
    engine, metrics = engine_of(people), Metrics()
    with RunLock(engine):
        assert run_once(people.config(), engine, Seams(), metrics) is None
    (line,) = daemon_log(caplog)
    assert line.getMessage().startswith("tick skipped: another run holds the lock")
    assert all_runs(engine) == [] and people.receiver.bodies() == []
    assert metrics.registry.get_sample_value("reconciler_lock_skips_total") == 1


def test_failed_run_is_recorded_and_the_next_tick_runs(people, engine_of, caplog):
    caplog.set_level(logging.INFO, logger="reconciler.ops.daemon")
    engine, metrics = engine_of(people), Metrics()
    broken = people.config_text().replace(
        people.warehouse.url, f"sqlite:///{people.tmp_path}/missing/source.db"
    )
    (people.tmp_path / "broken.toml").write_text(broken)
    from reconciler.config import load_config

    options = Seams()
    assert (
        run_once(load_config(people.tmp_path / "broken.toml", env={}), engine, options, metrics)
        is None
    )
    (line,) = daemon_log(caplog)
    assert line.levelno == logging.ERROR and "source database" in line.getMessage()
    assert [r.status for r in all_runs(engine)] == ["failed"]
    again = run_once(people.config(), engine, options, metrics)
    assert again is not None and again.status == "succeeded"
    assert metrics.registry.get_sample_value("reconciler_runs_total", {"status": "failed"}) == 1


class ExplodingTransport(httpx.BaseTransport):
    """A bug inside a run: something raises that nobody expected."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("boom")


def test_crash_inside_a_run_is_recorded_and_the_daemon_keeps_going(people, engine_of, caplog):
    caplog.set_level(logging.INFO, logger="reconciler.ops.daemon")
    engine = engine_of(people)
    crashed = run_once(people.config(), engine, Seams(transport=ExplodingTransport()))
    assert crashed is None
    (line,) = daemon_log(caplog)
    assert line.levelno == logging.ERROR and "RuntimeError: boom" in line.getMessage()
    (run,) = all_runs(engine)
    assert run.status == "failed" and "unexpected error: RuntimeError: boom" in run.error
    again = run_once(people.config(), engine, Seams())
    assert again is not None and (again.status, again.sent) == ("succeeded", 3)
    assert len(people.receiver.bodies()) == 3


def test_job_body_does_nothing_once_stopping(people, engine_of):
    engine = engine_of(people)
    options = Seams()
    options.stop.set()
    assert run_once(people.config(), engine, options) is None
    assert all_runs(engine) == []


# --- the command and the real process -------------------------------------------------


def test_daemon_without_a_schedule_is_a_config_error_naming_the_fix(setup):
    path = setup.write()
    result = CliRunner().invoke(main, ["daemon", "--config", str(path)])
    assert result.exit_code == 2
    assert "[schedule]" in result.stderr and "interval_minutes" in result.stderr
    if setup.state_url.startswith("sqlite"):
        assert not (setup.tmp_path / "state.db").exists()  # nothing was written


def test_daemon_syncs_at_start_and_on_schedule_until_sigterm(people, engine_of):
    engine = engine_of(people)
    daemon = Daemon(people.write(extra="[schedule]\ninterval_minutes = 0.01\n"))
    try:
        wait_for("two finished runs", lambda: len(finished_runs(engine)) >= 2, daemon)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    runs = all_runs(engine)
    assert {r.status for r in runs} == {"succeeded"}
    assert {r.trigger for r in runs} == {"schedule"}
    assert (runs[0].sent, runs[1].sent) == (3, 0)
    log = daemon.log()
    assert f"run {runs[0].id} succeeded" in log and "daemon stopped" in log


def test_stop_signal_during_deliveries_leaves_nothing_half_recorded(setup, engine_of):
    users = [f"u{n:02d}" for n in range(40)]
    for user in users:
        setup.warehouse.user(user)
    setup.warehouse.members("High Value Users", *users)
    setup.receiver.respond = lambda _n, _body: Reply(delay=0.3)
    engine = engine_of(setup)
    daemon = Daemon(setup.write(extra="[schedule]\ninterval_minutes = 600\n"))
    try:
        wait_for("deliveries in flight", lambda: len(setup.receiver.requests) >= 4, daemon)
        assert daemon.stop(signal.SIGINT) == 0
    finally:
        daemon.kill()
    (run,) = all_runs(engine)
    answered = {r.body["message_id"] for r in setup.receiver.requests}
    with engine.connect() as conn:
        by_status = dict(
            conn.execute(select(updates.c.status, func.count()).group_by(updates.c.status)).all()
        )
        sent_ids = set(
            conn.execute(select(updates.c.message_id).where(updates.c.status == "sent")).scalars()
        )
    assert sent_ids == answered  # every 2xx is recorded, nothing more
    assert by_status.get("sent", 0) + by_status.get("pending", 0) == len(users)
    assert run.sent == len(sent_ids) and run.pending == by_status.get("pending", 0)
    assert run.status == ("partial" if run.pending else "succeeded")


def test_stopped_daemon_leaves_no_run_running_and_the_next_run_sends_the_rest(setup, engine_of):
    users = [f"u{n:02d}" for n in range(20)]
    setup.warehouse.members("High Value Users", *users)
    setup.receiver.respond = lambda _n, _body: Reply(delay=0.2)
    engine = engine_of(setup)
    config = setup.write(extra="[schedule]\ninterval_minutes = 600\n")
    daemon = Daemon(config)
    try:
        wait_for("deliveries in flight", lambda: len(setup.receiver.requests) >= 2, daemon)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(func.count()).select_from(sync_runs).where(sync_runs.c.status == "running")
            ).scalar_one()
            == 0
        )
    first = {r.body["user_id"] for r in setup.receiver.requests}
    setup.receiver.respond = lambda _n, _body: Reply()
    setup.receiver.clear()
    result = CliRunner().invoke(main, ["sync", "--config", str(config)])
    assert result.exit_code == 0, result.output
    again = [r.body["user_id"] for r in setup.receiver.requests]
    assert sorted(again) == sorted(set(users) - first)
