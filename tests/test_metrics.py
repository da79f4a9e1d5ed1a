"""Prometheus metrics: a dedicated registry, seeded from the database, scraped over HTTP."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from reconciler.ops.metrics import Metrics, serve
from reconciler.run import sync

from .conftest import Setup
from .processes import Daemon, free_port, wait_for
from .receiver import Reply

METRICS = {
    "reconciler_runs",
    "reconciler_updates",
    "reconciler_lock_skips",
    "reconciler_pending_updates",
    "reconciler_last_success_timestamp_seconds",
    "reconciler_run_duration_seconds",
    "reconciler_snapshot_users",
    "reconciler_halted_audiences",
    "reconciler_snapshot_accounts",
}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """sample name and labels → value, from GET http://127.0.0.1:port/metrics."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def families(port: int) -> set[str]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    return {f.name for f in text_string_to_metric_families(response.text)}


@pytest.fixture
def people(setup: Setup) -> Setup:
    setup.warehouse.members("High Value Users", "u1", "u2", "u3")
    return setup


def test_daemon_serves_metrics_on_loopback(people, engine_of):
    engine_of(people)
    port = free_port()
    daemon = Daemon(
        people.write(extra=f"[schedule]\ninterval_minutes = 600\n[daemon]\nmetrics_port = {port}\n")
    )
    try:
        succeeded = ("reconciler_runs_total", (("status", "succeeded"),))

        def first_run_counted():
            try:
                return scrape(port).get(succeeded) == 1
            except httpx.TransportError:
                return False

        wait_for("the first run in the metrics", first_run_counted, daemon)
        assert families(port) == METRICS
        samples = scrape(port)
        assert (
            samples[("reconciler_updates_total", (("kind", "contact"), ("outcome", "sent")))] == 3
        )
        assert (
            samples[("reconciler_updates_total", (("kind", "customer"), ("outcome", "sent")))] == 0
        )
        assert samples[("reconciler_pending_updates", (("kind", "contact"),))] == 0
        assert samples[("reconciler_snapshot_users", ())] == 3
        assert samples[("reconciler_last_success_timestamp_seconds", ())] > 0
        assert samples[("reconciler_run_duration_seconds_count", ())] == 1
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()


def test_gauges_start_from_the_state_database(people, engine_of):
    engine = engine_of(people)
    people.receiver.respond = lambda _n, body: Reply(503 if body["user_id"] == "u3" else 200)
    sync(people.config(destination="max_attempts = 1"), engine)
    metrics = Metrics()
    metrics.load(engine)
    sample = metrics.registry.get_sample_value
    assert sample("reconciler_pending_updates", {"kind": "contact"}) == 1
    assert sample("reconciler_pending_updates", {"kind": "customer"}) == 0
    assert sample("reconciler_snapshot_users") == 3
    assert sample("reconciler_last_success_timestamp_seconds") == 0  # no run succeeded yet


def test_metrics_live_in_their_own_registry():
    first, second = Metrics(), Metrics()  # no "Duplicated timeseries" error
    assert first.registry is not second.registry
    assert REGISTRY.get_sample_value("reconciler_lock_skips_total") is None


def test_metrics_endpoint_answers_on_127_0_0_1():
    metrics = Metrics()
    metrics.lock_skips.inc()
    port = free_port()
    stop = serve(metrics, "127.0.0.1", port)
    try:
        assert scrape(port)[("reconciler_lock_skips_total", ())] == 1
    finally:
        stop()


def test_daemon_refuses_a_metrics_port_in_use(people, engine_of):
    engine_of(people)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(
            people.write(
                extra=f"[schedule]\ninterval_minutes = 600\n[daemon]\nmetrics_port = {port}\n"
            )
        )
        try:
            status = daemon.proc.wait(60)
        finally:
            daemon.kill()
    assert status == 2
    assert "[daemon] metrics_port" in daemon.log() and str(port) in daemon.log()
