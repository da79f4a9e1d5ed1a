"""Why a run left updates unacknowledged (SPEC §4): causes grouped with counts in the
summary line, in `sync_runs.error` and in `show`, through the real command line."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import pytest
from click.testing import Result
from sqlalchemy import select

from reconciler.state.causes import cause_of
from reconciler.state.schema import sync_runs
from reconciler.views import error_cell

from .conftest import Setup
from .helpers import clean_env, cli
from .processes import PATIENCE, RECONCILER, free_port
from .receiver import Reply

USERS = [f"u{n:02d}" for n in range(12)]
ONE_ATTEMPT = "max_attempts = 1"


def sync(setup: Setup, *args: str, webhook_url: str | None = None) -> Result:
    path = setup.write(destination=ONE_ATTEMPT, webhook_url=webhook_url)
    return cli("sync", "--config", str(path), *args)


def last_run(setup: Setup, engine_of) -> dict:
    with engine_of(setup).connect() as conn:
        row = conn.execute(select(sync_runs).order_by(sync_runs.c.id.desc())).first()
    assert row is not None
    return dict(row._mapping)


@pytest.fixture
def members(setup: Setup) -> Setup:
    setup.warehouse.members("High Value Users", *USERS)
    return setup


def test_receiver_down_says_connection_refused_with_the_count(members, engine_of):
    down = f"http://127.0.0.1:{free_port()}/hook/s3cr3t-token"
    result = sync(members, webhook_url=down)
    assert result.exit_code == 1
    expected = f"{len(USERS)} pending: connection refused ({len(USERS)})"
    assert result.stdout.startswith("run 1 partial") and f"error: {expected}" in result.stdout
    run = last_run(members, engine_of)
    assert run["error"] == expected and run["pending"] == len(USERS)


def test_rejections_are_grouped_by_status_and_message(members, engine_of):
    def respond(_n: int, body: dict) -> Reply:
        if body["user_id"] in ("u00", "u01"):
            return Reply(401, "")
        if body["user_id"] == "u02":
            return Reply(200)
        return Reply(422, json.dumps({"error": "email taken", "request": "r-1"}))

    members.receiver.respond = respond
    result = sync(members)
    assert result.exit_code == 1
    expected = '11 rejected: 422 "email taken" (9), 401 (2)'
    assert f"error: {expected}" in result.stdout
    assert last_run(members, engine_of)["error"] == expected


def test_pending_and_rejected_are_both_named(members, engine_of):
    members.receiver.respond = lambda _n, body: (
        Reply(503, "<html><body>busy</body></html>")
        if body["user_id"] < "u04"
        else Reply(400, "bad contact")
        if body["user_id"] < "u06"
        else Reply(200)
    )
    assert sync(members).exit_code == 1
    assert last_run(members, engine_of)["error"] == (
        '4 pending: 503 (4); 2 rejected: 400 "bad contact" (2)'
    )


def test_a_fully_acknowledged_run_has_no_error(members, engine_of):
    assert sync(members).exit_code == 0
    assert last_run(members, engine_of)["error"] is None


def test_causes_never_show_the_webhook_url(members, engine_of):
    """A response that echoes the webhook URL still leaves it out of every cause."""
    echo = members.receiver.url
    members.receiver.respond = lambda _n, _b: Reply(404, json.dumps({"message": f"no {echo}"}))
    result = sync(members)
    error = last_run(members, engine_of)["error"]
    assert error.startswith(f"{len(USERS)} rejected: 404 ")
    for text in (error, result.output):
        assert "s3cr3t-token" not in text and "/hook/" not in text


def test_show_groups_attempts_by_cause_before_listing_them(members, engine_of):
    members.receiver.respond = lambda _n, body: (
        Reply(429, "slow down") if body["user_id"] < "u03" else Reply(200)
    )
    assert sync(members).exit_code == 1
    config = str(members.tmp_path / "reconciler.toml")
    shown = cli("show", "1", "--config", config)
    assert shown.exit_code == 0, shown.output
    text = shown.stdout
    grouped = text.index("attempts not acknowledged, by cause")
    listed = text.index("outcome")  # the header of the table listing the attempts
    assert grouped < listed
    assert '429 "slow down"' in text[grouped:listed]
    data = json.loads(cli("show", "1", "--json", "--config", config).stdout)
    assert data["causes"] == [{"cause": '429 "slow down"', "attempts": 3, "updates": 3}]
    assert data["error"] == '3 pending: 429 "slow down" (3)'


def test_a_run_stopped_by_a_signal_says_so(members, engine_of):
    arrived, release = threading.Event(), threading.Event()

    def respond(_n: int, _body: dict) -> Reply:
        arrived.set()
        release.wait(PATIENCE)  # hold every answer until the process has the signal
        return Reply(200)

    members.receiver.respond = respond
    path = members.write()
    proc = subprocess.Popen(
        [RECONCILER, "sync", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert arrived.wait(PATIENCE), "no delivery arrived"
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        lines = iter(proc.stderr.readline, b"")
        assert any(b"stopping" in line for line in lines), "the process never said stopping"
    finally:
        release.set()
    stdout, stderr = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 1, stderr
    run = last_run(members, engine_of)
    assert run["status"] == "partial"
    assert run["error"] == (
        f"stopped by SIGTERM: {run['pending']} pending: not sent before the stop ({run['pending']})"
    )
    assert f"error: {run['error']}".encode() in stdout


@pytest.mark.parametrize(
    "status, outcome, error, cause",
    [
        (
            None,
            "error",
            "not retried: max_attempts (1) reached; stays pending; ConnectError: "
            "[Errno 111] Connection refused",
            "connection refused",
        ),
        (None, "error", "retry in 0.52 s; ConnectTimeout: timed out", "connect timeout"),
        (
            None,
            "error",
            "retry in 0.52 s; ReadTimeout: The read operation timed out",
            "read timeout",
        ),
        (
            None,
            "error",
            "RemoteProtocolError: Server disconnected without sending a response.",
            "server disconnected without answering",
        ),
        (
            None,
            "error",
            "ConnectError: [Errno -2] Name or service not known",
            "host name not found",
        ),
        (
            None,
            "error",
            "ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
            "TLS certificate not trusted",
        ),
        (None, "error", "WeirdError: something", "WeirdError"),
        (
            503,
            "retry",
            "not retried: a 4.00 s wait exceeds the run's retry budget (1.00 s left); "
            "stays pending; Retry-After: 4",
            "503",
        ),
        (500, "retry", 'retry in 1.00 s; response: {"message": "internal"}', '500 "internal"'),
        (422, "rejected", '{"errors": [{"message": "email taken"}]}', '422 "email taken"'),
        (422, "rejected", '{"error": "email ' + "x" * 600, '422 "email ' + "x" * 51 + '..."'),
        (401, "rejected", "", "401"),
        (404, "rejected", "<!DOCTYPE html><html>Not Found</html>", "404"),
        (400, "rejected", "  bad\n  contact  ", '400 "bad contact"'),
        (
            302,
            "rejected",
            "redirect to https://elsewhere.example/***",
            '302 "redirect to https://elsewhere.example/***"',
        ),
    ],
)
def test_cause_of_an_attempt(status, outcome, error, cause):
    assert cause_of(status, outcome, error) == cause


def test_history_keeps_the_cause_when_it_shortens_an_error(setup: Setup):
    """`history` leaves the database URL out of long errors, never the cause at their end."""
    extra = (
        '\n[[audiences]]\nname = "Order Completed Last 30 Days Premium Customers"\n'
        'query = "SELECT user_id FROM userz"\n'
    )
    path = setup.write(extra=extra)
    assert cli("sync", "--config", str(path)).exit_code == 1
    shown = cli("history", "--config", str(path))
    assert shown.exit_code == 0
    words = " ".join(shown.stdout.split())  # the table wraps long texts
    assert "no such table: userz" in words
    assert "…" not in shown.stdout and "source database" not in words


@pytest.mark.parametrize(
    "error, cell",
    [
        ("3775 pending: connection refused (3775)", "3775 pending: connection refused (3775)"),
        (
            'audience "Order Completed Last 30 Days": query failed: relation "userz" does not '
            "exist (source database postgresql://app@db.example.com:5432/warehouse)",
            'audience "Order…relation "userz" does not exist',
        ),
        (
            "unable to open database file; check that the directory exists and is writable "
            "(state database sqlite:////srv/reconciler/state.db)",
            "unable to open database file",
        ),
    ],
)
def test_error_cell(error, cell):
    assert error_cell(error) == cell and len(cell) <= 48
