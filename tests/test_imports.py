"""A process loads what its command uses (cli.py): no scheduler, metrics, migration
tool or terminal tables for `sync` (on an up-to-date state database, output to a pipe),
no HTTP client for a dry run either, and no SQLAlchemy for `--help`. Each case runs the
command in a fresh interpreter and reads its sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.state.db import migrate, state_engine

from .conftest import Setup, Warehouse
from .helpers import clean_env
from .receiver import Receiver

# Runs the command as the console script does, then writes every module it loaded
# (not those marked absent: cli.py marks httpx's own command line so).
PROBE = """\
import json, sys
from reconciler.cli import main
try:
    main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as out:
        json.dump(sorted(name for name, module in sys.modules.items() if module), out)
"""
DAEMON_ONLY = {"apscheduler", "prometheus_client"}
TERMINAL_ONLY = {"rich", "pygments"}


def loaded(tmp_path: Path, *args: str) -> set[str]:
    """The top-level packages a `reconciler ARGS` process had imported when it ended."""
    listing = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(listing), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in json.loads(listing.read_text())}


@pytest.fixture
def migrated(tmp_path: Path, warehouse: Warehouse, receiver: Receiver) -> Setup:
    """A SQLite state database already at the newest schema, two users with changes."""
    setup = Setup(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", warehouse, receiver)
    warehouse.members("High Value Users", "u-1", "u-2")
    warehouse.trait("Lifetime Value", {"u-1": 10})
    setup.write()
    engine = state_engine(setup.state_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    return setup


def config(setup: Setup) -> tuple[str, str]:
    return ("--config", str(setup.tmp_path / "reconciler.toml"))


def test_help_loads_none_of_the_pipeline(tmp_path: Path):
    modules = loaded(tmp_path, "--help")
    assert "click" in modules
    assert modules.isdisjoint({"sqlalchemy", "httpx", "alembic", *DAEMON_ONLY, *TERMINAL_ONLY})


def test_a_dry_run_loads_no_http_client_scheduler_metrics_alembic_or_rich(migrated: Setup):
    modules = loaded(migrated.tmp_path, "sync", "--dry-run", *config(migrated))
    assert "sqlalchemy" in modules
    assert modules.isdisjoint({"httpx", "alembic", *DAEMON_ONLY, *TERMINAL_ONLY})


def test_a_sync_to_a_pipe_loads_no_scheduler_metrics_alembic_or_rich(migrated: Setup):
    modules = loaded(migrated.tmp_path, "sync", *config(migrated))
    assert len(migrated.receiver.requests) == 2  # it did send, through httpx
    assert "httpx" in modules
    assert modules.isdisjoint({"alembic", *DAEMON_ONLY, *TERMINAL_ONLY})


@pytest.mark.parametrize("command", [("history", "--json"), ("user", "u-1", "--json")])
def test_json_output_loads_no_terminal_tables(migrated: Setup, command: tuple[str, ...]):
    modules = loaded(migrated.tmp_path, *command, *config(migrated))
    assert modules.isdisjoint({"httpx", "alembic", *DAEMON_ONLY, *TERMINAL_ONLY})


def test_a_table_loads_rich(migrated: Setup):
    """The probe sees what a command imports in its body."""
    assert "rich" in loaded(migrated.tmp_path, "history", *config(migrated))
