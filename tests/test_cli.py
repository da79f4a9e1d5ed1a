"""What the commands print: stable JSON with --json, readable text otherwise."""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess

import click
import pytest
from click.testing import CliRunner
from rich.console import Console
from sqlalchemy import func, select

from reconciler.cli import main
from reconciler.state.schema import sync_runs, updates
from reconciler.views import progress_bar

from .conftest import Setup
from .helpers import clean_env
from .helpers import setup_cli as cli
from .processes import RECONCILER, wait_for
from .receiver import Reply

RUN_FIELDS = {
    "id",
    "trigger",
    "status",
    "started_at",
    "finished_at",
    "users_seen",
    "users_changed",
    "entered",
    "exited",
    "traits_changed",
    "sent",
    "failed",
    "skipped",
    "error",
    "accounts_seen",
    "accounts_changed",
}
CHANGE_FIELDS = {
    "entity",
    "user_id",
    "key",
    "kind",
    "old_value",
    "new_value",
    "message_id",
    "status",
    "note",
}
DELIVERY_FIELDS = {
    "entity",
    "user_id",
    "message_id",
    "attempt",
    "sent_at",
    "status_code",
    "outcome",
    "latency_ms",
    "error",
}
HV = "high_value_users"


@pytest.fixture
def history(setup: Setup) -> Setup:
    """Two runs: the first rejects u3's update (400), the second moves u1 out."""
    w = setup.warehouse
    for user in ("u1", "u2", "u3"):
        w.user(user, email=f"{user}@example.com")
    w.members("High Value Users", "u1", "u2", "u3")
    w.trait("Lifetime Value", {"u1": 120})
    setup.write()
    setup.receiver.respond = lambda _n, body: (
        Reply(400, "contact rejected") if body["user_id"] == "u3" else Reply(200)
    )
    assert cli(setup, "sync").exit_code == 1
    w.members("High Value Users", "u2", "u3")
    assert cli(setup, "sync").exit_code == 0
    return setup


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help_text(name):
    command = main.commands[name]
    assert command.help and command.help.strip()
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0 and "--config" in result.stdout
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{name} {param.opts} has no help"


def test_history_json_is_an_array_of_runs_newest_first(history):
    result = cli(history, "history", "--json")
    assert result.exit_code == 0
    runs = json.loads(result.stdout)
    assert [r["id"] for r in runs] == [2, 1]
    assert all(set(r) >= RUN_FIELDS for r in runs)
    assert (runs[1]["status"], runs[1]["failed"], runs[1]["sent"]) == ("partial", 1, 2)
    assert runs[0]["started_at"].endswith("Z") and runs[0]["finished_at"].endswith("Z")
    assert [
        r["id"] for r in json.loads(cli(history, "history", "--json", "--limit", "1").stdout)
    ] == [2]


def test_history_text_is_a_table_of_runs(history):
    result = cli(history, "history")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    header = next(n for n, line in enumerate(lines) if line.startswith("run "))
    assert lines[header].split()[:3] == ["run", "trigger", "status"]
    assert set(lines[header + 1].strip()) == {"─"}
    rows = [line.split() for line in lines[header + 2 :] if line.strip()]
    assert [row[:3] for row in rows] == [["2", "manual", "succeeded"], ["1", "manual", "partial"]]


def test_history_of_an_empty_database_says_so(setup):
    setup.write()
    result = cli(setup, "history")
    assert result.exit_code == 0 and "no runs yet" in result.stdout
    assert json.loads(cli(setup, "history", "--json").stdout) == []


def test_show_json_has_the_run_its_changes_and_its_deliveries(history):
    result = cli(history, "show", "1", "--json")
    assert result.exit_code == 0
    run = json.loads(result.stdout)
    assert set(run) >= RUN_FIELDS and run["id"] == 1
    assert all(set(c) == CHANGE_FIELDS for c in run["changes"])
    assert all(set(d) == DELIVERY_FIELDS for d in run["deliveries"])
    rejected = [d for d in run["deliveries"] if d["outcome"] == "rejected"]
    assert [(d["user_id"], d["status_code"], d["error"]) for d in rejected] == [
        ("u3", 400, "contact rejected")
    ]
    change = next(c for c in run["changes"] if c["user_id"] == "u1" and c["key"] == HV)
    assert (change["old_value"], change["new_value"], change["status"]) == (None, True, "sent")


def test_show_text_lists_changes_and_attempts_not_acknowledged(history):
    result = cli(history, "show", "1")
    assert result.exit_code == 0
    out = result.stdout
    assert "run 1 · manual · partial" in out
    assert "changes" in out and "u1" in out and HV in out
    assert "attempts not acknowledged" in out and "contact rejected" in out and "400" in out


def test_show_of_an_unknown_run_exits_2(history):
    result = cli(history, "show", "99")
    assert result.exit_code == 2 and "no run with id 99" in result.stderr


def test_user_json_has_acknowledged_state_and_timeline(history):
    result = cli(history, "user", "u1", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["user_id"] == "u1"
    assert {k: v["value"] for k, v in data["acknowledged"].items()} == {
        HV: False,
        "lifetime_value": 120,
    }
    assert all(v["acked_at"].endswith("Z") for v in data["acknowledged"].values())
    assert [u["run_id"] for u in data["timeline"]] == [1, 2]
    first = data["timeline"][0]
    assert set(first) == {
        "run_id",
        "message_id",
        "status",
        "observed_at",
        "settled_at",
        "note",
        "changes",
        "deliveries",
    }
    assert {c["key"]: c["new_value"] for c in first["changes"]} == {HV: True, "lifetime_value": 120}
    assert [d["status_code"] for d in first["deliveries"]] == [200]


def test_user_text_shows_state_and_timeline(history):
    result = cli(history, "user", "u3")
    assert result.exit_code == 0
    assert 'user "u3": nothing acknowledged yet' in result.stdout
    assert "timeline" in result.stdout and "rejected" in result.stdout and "1: 400" in result.stdout
    member = cli(history, "user", "u1").stdout
    assert "acknowledged state" in member and HV in member and "false" in member


def test_user_without_history_says_so(history):
    result = cli(history, "user", "nobody")
    assert result.exit_code == 0 and 'nothing recorded for user "nobody"' in result.stdout
    assert json.loads(cli(history, "user", "nobody", "--json").stdout) == {
        "user_id": "nobody",
        "acknowledged": {},
        "timeline": [],
    }


def test_dry_run_json_counts_and_samples_without_sending(setup, engine_of):
    setup.warehouse.user("u1", email="u1@example.com")
    setup.warehouse.members("High Value Users", "u1", "u2")
    setup.warehouse.trait("Lifetime Value", {"u1": 5})
    setup.write()
    result = cli(setup, "sync", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (
        data["users_changed"],
        data["entered"],
        data["exited"],
        data["traits_changed"],
        data["skipped"],
    ) == (2, 2, 0, 1, 0)
    assert {s["body"]["user_id"] for s in data["sample"]} == {"u1", "u2"}
    assert "s3cr3t" not in result.stdout
    assert setup.receiver.bodies() == []
    with engine_of(setup).connect() as conn:
        assert conn.execute(select(func.count()).select_from(sync_runs)).scalar_one() == 0


def test_sync_prints_one_line_and_no_progress_when_not_a_terminal(setup):
    setup.warehouse.members("High Value Users", "u1")
    setup.write()
    result = cli(setup, "sync")
    assert result.exit_code == 0
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("run 1 succeeded")


def test_progress_bar_shows_the_sending_phase():
    out = io.StringIO()
    with progress_bar(Console(file=out, force_terminal=True, width=100)) as report:
        report(3, 10)
    assert "snapshot and diff" in out.getvalue() and "3/10" in out.getvalue()


def test_sync_on_a_terminal_draws_progress_then_the_result(setup):
    setup.warehouse.members("High Value Users", "u1", "u2")
    path = setup.write()
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [RECONCILER, "sync", "--config", str(path)],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    screen = b"".join(chunks).decode(errors="replace")
    assert "snapshot and diff" in screen or "sending" in screen
    assert "run 1 succeeded" in screen


def test_interrupted_sync_records_what_was_sent_and_leaves_the_rest_pending(setup, engine_of):
    users = [f"u{n:02d}" for n in range(30)]
    setup.warehouse.members("High Value Users", *users)
    setup.receiver.respond = lambda _n, _body: Reply(delay=0.2)
    path = setup.write()
    engine = engine_of(setup)
    proc = subprocess.Popen(
        [RECONCILER, "sync", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    wait_for("deliveries in flight", lambda: len(setup.receiver.requests) >= 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    answered = {r.body["message_id"] for r in setup.receiver.requests}
    with engine.connect() as conn:
        run = conn.execute(select(sync_runs)).one()
        sent_ids = set(
            conn.execute(select(updates.c.message_id).where(updates.c.status == "sent")).scalars()
        )
    assert run.status == "partial" and proc.returncode == 1, stderr
    assert sent_ids == answered and run.pending == len(users) - len(sent_ids)
    assert b"stopping" in stderr and stdout.startswith(b"run 1 partial")
