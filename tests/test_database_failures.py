"""When a database fails (SPEC §4): one line naming which database and why, with its
password masked; the run recorded `failed` when the state database is reachable;
acknowledged and pending state untouched; nothing sent; exit status 1."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, func, select

from reconciler.state.schema import acked, sync_runs, updates

from .conftest import PG_ADMIN, Setup
from .helpers import cli
from .receiver import Reply

PASSWORD = "hunter2-pw"
PG_SERVER = PG_ADMIN.rsplit("/", 1)[0].replace(
    "postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@"
)


def durable_state(engine: Engine) -> tuple[Any, ...]:
    """What a failed run must not change: acknowledged and live updates."""
    with engine.connect() as conn:
        return (
            conn.execute(select(acked).order_by(acked.c.user_id, acked.c.key)).all(),
            conn.execute(
                select(updates.c.id, updates.c.status, updates.c.message_id).order_by(updates.c.id)
            ).all(),
        )


def run_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(sync_runs)).scalar_one())


def one_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert PASSWORD not in result.output
    return lines[0]


@pytest.fixture
def history(setup: Setup, engine_of) -> tuple[Setup, Engine]:
    """u1 acknowledged, u2's update pending (the webhook answered 503)."""
    setup.warehouse.members("High Value Users", "u1", "u2")
    setup.receiver.respond = lambda _n, body: Reply(503 if body["user_id"] == "u2" else 200)
    assert cli("sync", "--config", str(setup.write(destination="max_attempts = 1"))).exit_code == 1
    setup.receiver.respond = lambda _n, _b: Reply(200)
    setup.receiver.clear()
    setup.warehouse.members("High Value Users", "u1", "u2", "u3")
    return setup, engine_of(setup)


@contextlib.contextmanager
def sqlite_lock(path: Path, mode: str) -> Iterator[None]:
    """Another program holding a lock on a SQLite file."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"BEGIN {mode}")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


@dataclass
class SourceCase:
    id: str
    source: Callable[[Setup], str] | None  # the source URL, None to keep the warehouse
    message: str
    query: str | None = None  # an extra audience with this query
    hold: Callable[[Setup], contextlib.AbstractContextManager[None]] | None = None
    absent: str | None = None  # a file that must not be created


SOURCE_CASES = [
    SourceCase(
        "unreachable-server",
        lambda s: PG_SERVER.rsplit(":", 1)[0] + ":1/warehouse",
        "connection failed: ",
    ),
    SourceCase(
        "missing-database",
        lambda s: PG_SERVER + "/no_such_warehouse",
        'database "no_such_warehouse" does not exist',
    ),
    SourceCase(
        "missing-sqlite-file",
        lambda s: f"sqlite:///{s.tmp_path / 'typo.db'}",
        "unable to open database file; check the path: the file must exist",
        absent="typo.db",
    ),
    SourceCase(
        "failing-query",
        None,
        'audience "Broken": query failed: no such table: no_such_table '
        "(source database sqlite:///{warehouse})",
        query="SELECT user_id FROM no_such_table",
    ),
    SourceCase(
        "query-of-a-state-table",
        None,
        'audience "Broken": query failed: no such table: acked',
        query="SELECT user_id FROM acked",
    ),
    SourceCase(
        "syntax-error",
        None,
        'audience "Broken": query failed: near "SELEC"',
        query="SELEC user_id FROM members",
    ),
    SourceCase(
        "locked-sqlite-file",
        lambda s: s.warehouse.url + "?timeout=0.2",
        "database is locked; another program holds a lock on the file",
        hold=lambda s: sqlite_lock(s.warehouse.path, "EXCLUSIVE"),
    ),
]


def _source_config(setup: Setup, case: SourceCase) -> Path:
    extra = f'\n[[audiences]]\nname = "Broken"\nquery = "{case.query}"\n' if case.query else ""
    text = setup.config_text(extra=extra)
    if case.source:
        text = text.replace(f'url = "{setup.warehouse.url}"', f'url = "{case.source(setup)}"')
    path = setup.tmp_path / "reconciler.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", SOURCE_CASES, ids=[c.id for c in SOURCE_CASES])
def test_source_failure_fails_the_run_and_changes_nothing(history, case: SourceCase):
    setup, engine = history
    before, runs = durable_state(engine), run_count(engine)
    path = _source_config(setup, case)
    with case.hold(setup) if case.hold else contextlib.nullcontext():
        result = cli("sync", "--config", str(path))
    line = one_line(result)
    message = case.message.replace("{warehouse}", str(setup.warehouse.path))
    assert line.startswith(f"reconciler: run {runs + 1} failed: ") and message in line
    assert setup.receiver.bodies() == []
    assert durable_state(engine) == before
    with engine.connect() as conn:
        run = conn.execute(select(sync_runs).order_by(sync_runs.c.id.desc())).first()
    assert run is not None and run.id == runs + 1
    assert run.status == "failed" and message in run.error and PASSWORD not in run.error
    if case.absent:
        assert not (setup.tmp_path / case.absent).exists()


@pytest.mark.parametrize("case", SOURCE_CASES, ids=[c.id for c in SOURCE_CASES])
def test_source_failure_in_a_dry_run_leaves_no_run_behind(history, case: SourceCase):
    setup, engine = history
    before, runs = durable_state(engine), run_count(engine)
    path = _source_config(setup, case)
    with case.hold(setup) if case.hold else contextlib.nullcontext():
        result = cli("sync", "--dry-run", "--config", str(path))
    assert case.message.replace("{warehouse}", str(setup.warehouse.path)) in one_line(result)
    assert (durable_state(engine), run_count(engine)) == (before, runs)
    assert setup.receiver.bodies() == []


@pytest.mark.parametrize("command", [["sync"], ["resync"], ["migrate"], ["history"]])
@pytest.mark.parametrize(
    "url, message",
    [
        (PG_SERVER.rsplit(":", 1)[0] + ":1/state", "connection failed: "),
        (PG_SERVER + "/no_such_state", 'database "no_such_state" does not exist'),
        (
            "sqlite:///{tmp}/no/such/dir/state.db",
            "unable to open database file; check that the directory exists and is writable",
        ),
    ],
    ids=["unreachable-server", "missing-database", "missing-sqlite-directory"],
)
def test_unreachable_state_database(tmp_path, warehouse, receiver, command, url, message):
    setup = Setup(tmp_path, url.replace("{tmp}", str(tmp_path)), warehouse, receiver)
    warehouse.members("High Value Users", "u1")
    line = one_line(cli(*command, "--config", str(setup.write())))
    assert message in line and line.endswith(_state_database(setup.state_url))
    assert receiver.bodies() == []


def _state_database(url: str) -> str:
    """How a message names the state database: last, password masked."""
    return f"(state database {url.replace(':' + PASSWORD + '@', ':***@')})"


@pytest.fixture
def sqlite_history(tmp_path, warehouse, receiver, engine_of) -> tuple[Setup, Engine, Path]:
    setup = Setup(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", warehouse, receiver)
    warehouse.members("High Value Users", "u1")
    assert cli("sync", "--config", str(setup.write())).exit_code == 0
    receiver.clear()
    warehouse.members("High Value Users", "u1", "u2")
    engine = engine_of(setup)
    text = setup.config_text().replace(setup.state_url, setup.state_url + "?timeout=0.2")
    path = tmp_path / "reconciler.toml"
    path.write_text(text)
    return setup, engine, path


@pytest.mark.parametrize("command", [["sync"], ["resync"]])
def test_locked_state_file(sqlite_history, command):
    setup, engine, path = sqlite_history
    before, runs = durable_state(engine), run_count(engine)
    with sqlite_lock(setup.tmp_path / "state.db", "IMMEDIATE"):
        line = one_line(cli(*command, "--config", str(path)))
    assert line.startswith("reconciler: database is locked; another program holds a lock")
    assert line.endswith(f"(state database {setup.state_url}?timeout=0.2)")
    assert setup.receiver.bodies() == []
    assert (durable_state(engine), run_count(engine)) == (before, runs)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """Read-only even for root (tests run as root in CI): the immutable attribute."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot make a file read-only here: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("command", [["sync"], ["resync"]])
def test_read_only_state_file(sqlite_history, command):
    setup, engine, path = sqlite_history
    before, runs = durable_state(engine), run_count(engine)
    engine.dispose()
    with immutable(setup.tmp_path / "state.db"):
        line = one_line(cli(*command, "--config", str(path)))
        reading = cli("history", "--json", "--config", str(path))
    assert line.startswith(
        "reconciler: attempt to write a readonly database; make the file and its directory writable"
    ) and line.endswith(f"(state database {setup.state_url}?timeout=0.2)")
    assert reading.exit_code == 0, "reading history needs no write access"
    assert setup.receiver.bodies() == []
    assert (durable_state(engine), run_count(engine)) == (before, runs)
