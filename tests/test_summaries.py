"""What a run says about itself (issue 13): the dry run's text, re-sent values counted
apart from changes, the daemon's schedule, the progress display before a total."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from sqlalchemy import select

from reconciler.config import Schedule
from reconciler.ops.daemon import describe
from reconciler.state.schema import sync_runs
from reconciler.views import progress_bar

from .conftest import Setup
from .helpers import cli, setup_cli
from .processes import Daemon, wait_for

HV, LTV = "high_value_users", "lifetime_value"


# --- the dry run's text ---------------------------------------------------------------


def test_dry_run_text_counts_the_ignored_rows_its_json_shows(setup):
    setup.warehouse.members("High Value Users", "u1", "", None, "  ")
    setup.write()
    data = json.loads(setup_cli(setup, "sync", "--dry-run", "--json").stdout)
    text = setup_cli(setup, "sync", "--dry-run")
    assert text.exit_code == 0, text.output
    assert data["rows_ignored"] == 3
    assert "ignored 3 rows without user_id" in text.stdout.splitlines()[0]


def test_dry_run_text_has_no_ignored_part_when_nothing_was_ignored(setup):
    setup.warehouse.members("High Value Users", "u1")
    setup.write()
    assert "ignored" not in setup_cli(setup, "sync", "--dry-run").stdout


def test_dry_run_sample_says_what_would_be_sent_and_what_skipped_and_why(setup):
    """Without custom attributes a body of user_id alone has 5 keys and is skipped."""
    setup.warehouse.user("u1", email="u1@example.com")
    setup.warehouse.user("u2", email="not an address")
    setup.warehouse.members("High Value Users", "u1", "u2", "u3")
    setup.write(destination="custom_attributes = false")
    data = json.loads(setup_cli(setup, "sync", "--dry-run", "--json").stdout)
    reasons = {s["body"]["user_id"]: s["note"] for s in data["sample"]}
    lines = setup_cli(setup, "sync", "--dry-run").stdout.splitlines()[1:]
    labels = {
        json.loads(line.split(": ", 1)[1])["user_id"]: line.split(": ", 1)[0].strip()
        for line in lines
    }
    assert labels == {
        "u1": "would send",
        "u2": f"would skip ({reasons['u2']})",
        "u3": f"would skip ({reasons['u3']})",
    }
    assert "email" in reasons["u2"] and reasons["u3"]
    assert not any("pending" in line for line in lines)


def test_dry_run_sample_notes_what_a_sent_body_leaves_out(setup):
    setup.warehouse.user("u1", email="not an address")
    setup.warehouse.members("High Value Users", "u1")
    setup.write()
    (line,) = setup_cli(setup, "sync", "--dry-run").stdout.splitlines()[1:]
    assert re.match(r"  would send \(email [^)]*\): \{", line), line


# --- re-sent values are not changes ---------------------------------------------------


@pytest.fixture
def acknowledged(setup: Setup) -> Setup:
    """u1..u3 members of High Value Users, u1 and u2 with a lifetime value; all sent."""
    setup.warehouse.members("High Value Users", "u1", "u2", "u3")
    setup.warehouse.trait("Lifetime Value", {"u1": 10, "u2": 20})
    setup.write()
    assert setup_cli(setup, "sync").exit_code == 0
    return setup


def last_run(setup: Setup, engine_of) -> dict[str, int]:
    with engine_of(setup).connect() as conn:
        row = conn.execute(select(sync_runs).order_by(sync_runs.c.id.desc())).first()
    return {
        k: getattr(row, k)
        for k in ("users_changed", "entered", "exited", "traits_changed", "resent", "sent")
    }


def test_resync_counts_unchanged_values_as_resent_not_as_changes(acknowledged, engine_of):
    acknowledged.warehouse.members("High Value Users", "u1", "u2", "u4")  # u3 out, u4 in
    acknowledged.warehouse.trait("Lifetime Value", {"u1": 10, "u2": 25})  # u2 changed
    result = setup_cli(acknowledged, "resync", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    # re-sent as acknowledged: u1, u2 membership, u1's value
    expected = {
        "users_changed": 4,
        "entered": 1,
        "exited": 1,
        "traits_changed": 1,
        "resent": 3,
        "sent": 4,
    }
    assert {k: printed[k] for k in expected} == expected
    assert last_run(acknowledged, engine_of) == expected
    runs = json.loads(setup_cli(acknowledged, "history", "--json").stdout)
    assert [r["resent"] for r in runs] == [3, 0]


def test_resync_summary_line_says_how_many_values_were_resent(acknowledged):
    line = setup_cli(acknowledged, "resync").stdout
    assert "(entered 0, exited 0, traits 0, resent 5 unchanged)" in line, line


def test_resync_of_one_key_counts_only_that_key(acknowledged, engine_of):
    assert setup_cli(acknowledged, "resync", "--audience", HV).exit_code == 0
    assert last_run(acknowledged, engine_of) == {
        "users_changed": 3,
        "entered": 0,
        "exited": 0,
        "traits_changed": 0,
        "resent": 3,
        "sent": 3,
    }


def test_sync_with_real_changes_has_nothing_resent(acknowledged, engine_of):
    acknowledged.warehouse.members("High Value Users", "u1", "u2", "u3", "u5")
    result = setup_cli(acknowledged, "sync")
    assert "resent" not in result.stdout
    assert last_run(acknowledged, engine_of)["resent"] == 0
    assert last_run(acknowledged, engine_of)["entered"] == 1


def test_show_and_history_show_the_resent_count(acknowledged):
    assert setup_cli(acknowledged, "resync").exit_code == 0
    assert "resent unchanged 5" in setup_cli(acknowledged, "show", "2").stdout
    lines = cli(
        "history",
        "--config",
        str(acknowledged.tmp_path / "reconciler.toml"),
        env={"COLUMNS": "200"},
    ).stdout.splitlines()
    header = next(line.split() for line in lines if line.startswith("run "))
    row = next(line.split() for line in lines if line.strip().startswith("2 "))
    assert row[header.index("resent") + 1] == "5"  # `started` is two words in a row


# --- the daemon's schedule, the progress display ---------------------------------------


@pytest.mark.parametrize(
    "minutes, words",
    [
        (1, "every minute"),
        (1.0, "every minute"),
        (5, "every 5 minutes"),
        (120, "every 120 minutes"),
        (1.5, "every 1.5 minutes"),
        (0.5, "every 0.5 minutes"),
        (2880, "every 2880 minutes"),
    ],
)
def test_schedule_is_described_in_plain_words(minutes, words):
    assert describe(Schedule(interval_minutes=minutes)) == words


def test_daemon_logs_every_minute_for_an_interval_of_one(setup):
    path = setup.write(extra="\n[schedule]\ninterval_minutes = 1\n")
    daemon = Daemon(path)
    try:
        wait_for("the start line", lambda: "daemon started" in daemon.log(), daemon)
        assert "daemon started: every minute; first run now" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_progress_shows_no_count_before_the_total_is_known():
    out = io.StringIO()
    with progress_bar(Console(file=out, force_terminal=True, width=100)) as report:
        before = out.getvalue()
        report(3, 10)
    assert "snapshot and diff" in before and "/?" not in before
    assert "3/10" in out.getvalue() and "/?" not in out.getvalue()
