"""A well-mannered Unix tool (issue 13): quiet when its reader goes away, `--config`
before or after the command's name."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from sqlalchemy import func, select

from reconciler.cli import BROKEN_PIPE_STATUS, main
from reconciler.state.schema import sync_runs

from .conftest import Setup
from .helpers import assert_one_clean_line, clean_env, cli
from .processes import RECONCILER

TIMEOUT = 60


def run_into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the command with stdout a pipe whose reader has already gone (`| head -1`
    after its line, without the race of when head exits)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [RECONCILER, *args],
            stdout=writer,
            stderr=subprocess.PIPE,
            env=clean_env(),
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        os.close(writer)


@pytest.fixture
def synced(setup: Setup) -> Setup:
    """One acknowledged run, and a source change waiting for the next."""
    setup.warehouse.members("High Value Users", *(f"u{n}" for n in range(30)))
    assert cli("sync", "--config", str(setup.write())).exit_code == 0
    setup.warehouse.members("High Value Users", *(f"u{n}" for n in range(10, 40)))
    return setup


@pytest.mark.parametrize(
    "args",
    [
        ("sync", "--dry-run"),
        ("sync", "--dry-run", "--json"),
        ("history",),
        ("history", "--json"),
        ("show", "1"),
        ("user", "u1"),
    ],
    ids=lambda a: " ".join(a),
)
def test_a_reader_that_went_away_ends_the_command_quietly_with_141(synced, args):
    done = run_into_a_closed_pipe(*args, "--config", str(synced.tmp_path / "reconciler.toml"))
    assert (done.returncode, done.stderr.decode()) == (BROKEN_PIPE_STATUS, "")


def test_head_reading_one_line_of_a_long_output_gets_it_and_no_message(setup):
    """A real `| head -1` in a shell, over far more output than a pipe holds (64 KiB),
    so the writer certainly outlives its reader."""
    setup.warehouse.members("High Value Users", *(f"u{n:04d}" for n in range(2000)))
    config = setup.write()
    assert cli("sync", "--config", str(config)).exit_code == 0
    assert len(cli("show", "1", "--json", "--config", str(config)).stdout) > 10 * 65536
    script = (
        f'set -o pipefail; "{RECONCILER}" show 1 --json --config "{config}" | head -1; '
        'echo "status ${PIPESTATUS[0]}"'
    )
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, env=clean_env(), timeout=TIMEOUT, check=False
    )
    assert done.stdout.decode().splitlines() == ["{", f"status {BROKEN_PIPE_STATUS}"]
    assert done.stderr.decode() == ""


def test_a_real_run_with_its_reader_gone_is_recorded_all_the_same(synced, engine_of):
    engine = engine_of(synced)
    done = run_into_a_closed_pipe("sync", "--config", str(synced.tmp_path / "reconciler.toml"))
    assert (done.returncode, done.stderr.decode()) == (BROKEN_PIPE_STATUS, "")
    with engine.connect() as conn:
        run = conn.execute(select(sync_runs).order_by(sync_runs.c.id.desc())).first()
    assert (run.id, run.status, run.sent) == (2, "succeeded", 20)


# --- --config before the command's name ---------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["migrate"],
        ["sync"],
        ["sync", "--dry-run"],
        ["history"],
        ["history", "--json"],
        ["show", "1"],
        ["user", "u1"],
        ["prune"],
        ["resync"],
    ],
    ids=" ".join,
)
def test_config_before_the_command_works_like_after_it(synced, command):
    config = str(synced.tmp_path / "reconciler.toml")
    before = cli("--config", config, *command)
    assert before.exit_code == 0, before.output


def test_config_before_the_command_is_the_one_used(synced, engine_of):
    engine = engine_of(synced)
    result = cli("--config", str(synced.tmp_path / "reconciler.toml"), "sync", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run_id"] == 2
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(sync_runs)).scalar_one() == 2


def test_config_after_the_command_wins_over_one_before_it(synced, tmp_path):
    missing = tmp_path / "elsewhere.toml"
    config = str(synced.tmp_path / "reconciler.toml")
    assert cli("--config", str(missing), "history", "--config", config).exit_code == 0
    line = assert_one_clean_line(cli("--config", config, "history", "--config", str(missing)), 2)
    assert str(missing) in line and "not found" in line


def test_config_before_the_command_wins_over_the_environment(synced, tmp_path):
    missing = tmp_path / "from-env.toml"
    result = cli(
        "--config",
        str(synced.tmp_path / "reconciler.toml"),
        "history",
        env={"RECONCILER_CONFIG": str(missing)},
    )
    assert result.exit_code == 0, result.output


def test_config_before_a_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere.toml"
    line = assert_one_clean_line(cli("--config", str(missing), "migrate"), 2)
    assert str(missing) in line and "not found" in line


def test_top_level_help_shows_config():
    result = cli("--help")
    assert result.exit_code == 0 and "--config PATH" in result.stdout
    assert set(main.commands) <= set(result.stdout.split())
