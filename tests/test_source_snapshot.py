"""All the source queries of a run read one snapshot, read-only (SPEC §1).

PostgreSQL: a commit made while the run is reading is not seen by it (the first audience
query waits on an advisory lock the test holds, taken inside the run's REPEATABLE READ,
READ ONLY transaction; the test commits while pg_locks shows the run waiting), and a
query that writes fails the run and changes nothing. SQLite: the same through SQLAlchemy's
`before_cursor_execute` event, which lets the test commit from another connection
exactly between two queries of the run.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, event, select

from reconciler.cli import main
from reconciler.state.schema import sync_runs

from .conftest import Setup
from .helpers import clean_env
from .processes import PATIENCE, RECONCILER, wait_for

FIRST, SECOND = "Order Completed Last 30 Days", "High Value Users"
LOCK_KEY = 815_001
SNAPSHOT_ID = re.compile(r"^\d+:\d+:(\d+(,\d+)*)?$")


def cli(setup: Setup, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(setup.tmp_path / "reconciler.toml")])


def runs(setup: Setup) -> list[Any]:
    engine = setup.engine()
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(sync_runs).order_by(sync_runs.c.id)))
    finally:
        engine.dispose()


def sent_users(setup: Setup) -> dict[str, dict[str, Any]]:
    return {r.body["user_id"]: r.body for r in setup.receiver.requests}


class PgSource:
    """A PostgreSQL source database with the tables the Setup config queries."""

    def __init__(self, admin: str, name: str) -> None:
        self.name = name
        self.dsn = admin.rsplit("/", 1)[0] + f"/{name}"
        self.url = self.dsn.replace("postgresql://", "postgresql+psycopg://")
        self.execute("CREATE TABLE members (audience text, user_id text)")
        self.execute("CREATE TABLE traits (trait text, user_id text, value numeric)")
        self.execute(
            "CREATE TABLE users (user_id text, email text, first_name text, "
            "last_name text, company_id text, company_name text, anonymous_id text)"
        )

    def execute(self, sql: str, *params: Any) -> None:
        with psycopg.connect(self.dsn) as conn:
            conn.execute(sql, params or None)

    def scalar(self, sql: str, *params: Any) -> Any:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(sql, params or None).fetchone()
            assert row is not None
            return row[0]


@pytest.fixture
def pg_source(pg_admin: str) -> Iterator[PgSource]:
    """A fresh PostgreSQL source database, apart from any state database."""
    name = f"reconciler_source_{os.getpid()}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PgSource(pg_admin, name)
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_config(
    setup: Setup,
    source_url: str,
    first_query: str | None = None,
    audiences: tuple[str, ...] = (FIRST, SECOND),
    profile: str | None = None,
) -> Path:
    text = setup.config_text(audiences=audiences).replace(setup.warehouse.url, source_url)
    if first_query is not None:
        text = text.replace(f"SELECT user_id FROM members WHERE audience = '{FIRST}'", first_query)
    if profile is not None:
        text = re.sub(
            r"query = '''SELECT user_id, email.*?'''",
            f"query = '''{profile}'''",
            text,
            flags=re.DOTALL,
        )
    path = setup.tmp_path / "reconciler.toml"
    path.write_text(text)
    return path


def fill(source: Any) -> None:
    """u1 in the first audience, u2 in the second, u1's and u2's profiles."""
    source.execute("INSERT INTO members VALUES (%s, 'u1'), (%s, 'u2')", FIRST, SECOND)
    source.execute(
        "INSERT INTO users (user_id, email) VALUES ('u1', 'old@example.com'), "
        "('u2', 'u2@example.com'), ('u3', 'u3@example.com')"
    )


def advisory_waiters(source: PgSource) -> int:
    return int(
        source.scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND objid = %s AND database = (SELECT oid FROM pg_database WHERE datname = %s)",
            LOCK_KEY,
            source.name,
        )
    )


@pytest.mark.parametrize("command", ["sync", "sync --dry-run"])
def test_a_commit_made_while_a_postgresql_run_reads_is_not_seen_by_it(
    setup: Setup, pg_source: PgSource, command: str
) -> None:
    """The write lands after the snapshot, during the first query: neither the second
    audience, the trait nor the profile query of that run sees it; the next run sends it."""
    fill(pg_source)
    config = write_config(
        setup,
        pg_source.url,
        first_query=(
            "SELECT user_id FROM members CROSS JOIN (SELECT pg_advisory_lock_shared("
            f"{LOCK_KEY})) AS l WHERE audience = '{FIRST}'"
        ),
    )
    with psycopg.connect(pg_source.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        proc = subprocess.Popen(
            [RECONCILER, *command.split(), "--json", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
            text=True,
        )
        try:
            wait_for(
                "the run to wait on the advisory lock",
                lambda: proc.poll() is not None or advisory_waiters(pg_source),
            )
            assert proc.poll() is None, proc.communicate()
            with psycopg.connect(pg_source.dsn) as writer:
                writer.execute("INSERT INTO members VALUES (%s, 'u3')", (SECOND,))
                writer.execute("INSERT INTO traits VALUES ('Lifetime Value', 'u3', 50)")
                writer.execute("UPDATE users SET email = 'new@example.com' WHERE user_id = 'u1'")
                writer_xid = writer.execute("SELECT pg_current_xact_id()::text").fetchone()
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            out, err = proc.communicate(timeout=PATIENCE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    if command == "sync --dry-run":
        report = json.loads(out)
        assert (report["users_seen"], report["entered"], report["traits_changed"]) == (2, 2, 0)
        assert {b["body"]["user_id"]: b["body"].get("email") for b in report["sample"]} == {
            "u1": "old@example.com",
            "u2": "u2@example.com",
        }
        assert runs(setup) == []
        return
    assert {u: b.get("email") for u, b in sent_users(setup).items()} == {
        "u1": "old@example.com",
        "u2": "u2@example.com",
    }
    setup.receiver.requests.clear()
    assert cli(setup, "sync").exit_code == 0
    assert set(sent_users(setup)) == {"u3"}
    assert sent_users(setup)["u3"]["custom"] == [
        {"key": "high_value_users", "value": True},
        {"key": "lifetime_value", "value": 50},
    ]
    first, second = runs(setup)
    assert SNAPSHOT_ID.match(first.source_snapshot) and SNAPSHOT_ID.match(second.source_snapshot)
    # The recorded ids are the runs' real snapshots: the writer's transaction is in
    # progress for the first and committed for the second.
    assert writer_xid is not None
    assert [
        pg_source.scalar(
            "SELECT pg_visible_in_snapshot(%s::xid8, %s::pg_snapshot)",
            writer_xid[0],
            run.source_snapshot,
        )
        for run in (first, second)
    ] == [False, True]
    assert first.snapshot_at <= first.finished_at
    history = json.loads(cli(setup, "history", "--json").stdout)
    assert [r["source_snapshot"] for r in history] == [
        second.source_snapshot,
        first.source_snapshot,
    ]
    assert json.loads(cli(setup, "show", "1", "--json").stdout)["source_snapshot"] == (
        first.source_snapshot
    )
    assert f"(snapshot {first.source_snapshot})" in cli(setup, "show", "1").stdout


WRITES = {
    "function": ("audience", "SELECT wipe() AS user_id"),
    "data-modifying WITH": (
        "audience",
        "WITH gone AS (DELETE FROM members RETURNING user_id) SELECT user_id FROM gone",
    ),
    "DELETE RETURNING": ("audience", "DELETE FROM members RETURNING user_id"),
    "profile function": ("profile", "SELECT user_id, wipe() AS email FROM users"),
}


@pytest.mark.parametrize(
    ("how", "command"), [*((how, "sync") for how in sorted(WRITES)), ("function", "sync --dry-run")]
)
def test_a_postgresql_query_that_writes_fails_the_run_and_changes_nothing(
    setup: Setup, pg_source: PgSource, how: str, command: str
) -> None:
    fill(pg_source)
    pg_source.execute(
        "CREATE FUNCTION wipe() RETURNS text LANGUAGE plpgsql AS "
        "$$ BEGIN DELETE FROM members; RETURN 'x'; END $$"
    )
    kind, query = WRITES[how]
    if kind == "audience":
        write_config(setup, pg_source.url, first_query=query)
    else:
        write_config(setup, pg_source.url, profile=query)
    result = cli(setup, *command.split())
    assert result.exit_code == 1, result.output
    entry = f'audience "{FIRST}"' if kind == "audience" else "[profile]"
    line = assert_read_only_line(result, entry)
    assert pg_source.scalar("SELECT COUNT(*) FROM members") == 2
    assert setup.receiver.requests == []
    if command == "sync":
        (run,) = runs(setup)
        assert run.status == "failed" and run.error in line
    else:
        assert runs(setup) == []


def assert_read_only_line(result: Result, entry: str) -> str:
    # The first command also says where it created the state database.
    lines = [
        line
        for line in result.stderr.strip().splitlines()
        if not line.startswith("reconciler: created ")
    ]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    (line,) = lines
    assert f"{entry}: query tried to change the source" in line
    assert "source queries are read-only" in line and "make it a SELECT" in line
    return line


# SQLite ---------------------------------------------------------------------------------


def between_queries(before: str, action: Callable[[], None]) -> Callable[..., None]:
    """An engine event that runs `action` once, just before the statement `before`."""
    done: list[bool] = []

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement == before and not done:
            done.append(True)
            action()

    return hook


def test_a_commit_between_two_sqlite_queries_of_a_run_is_not_seen_by_it(setup: Setup) -> None:
    w = setup.warehouse
    w.execute("PRAGMA journal_mode=WAL")  # a writer can commit while the run reads
    w.members(FIRST, "u1")
    w.members(SECOND, "u2")
    w.user("u1", email="old@example.com")
    w.user("u2", email="u2@example.com")
    setup.write()

    def commit_elsewhere() -> None:
        with sqlite3.connect(w.path) as other:
            other.execute("INSERT INTO members VALUES (?, 'u3')", (SECOND,))
            other.execute("INSERT INTO traits VALUES ('Lifetime Value', 'u3', 50)")
            other.execute("UPDATE users SET email = 'new@example.com' WHERE user_id = 'u1'")
        other.close()

    hook = between_queries(
        f"SELECT user_id FROM members WHERE audience = '{SECOND}'", commit_elsewhere
    )
    event.listen(Engine, "before_cursor_execute", hook)
    try:
        result = cli(setup, "sync")
    finally:
        event.remove(Engine, "before_cursor_execute", hook)
    assert result.exit_code == 0, result.output
    with sqlite3.connect(w.path) as check:  # the write did commit, during the run
        assert check.execute("SELECT COUNT(*) FROM members WHERE user_id = 'u3'").fetchone() == (1,)
    assert {u: b.get("email") for u, b in sent_users(setup).items()} == {
        "u1": "old@example.com",
        "u2": "u2@example.com",
    }
    setup.receiver.requests.clear()
    assert cli(setup, "sync").exit_code == 0
    assert set(sent_users(setup)) == {"u3"}
    assert [r.source_snapshot for r in runs(setup)] == [None, None]


@pytest.mark.parametrize("url_form", ["path", "uri"])
def test_a_sqlite_query_that_writes_fails_the_run_and_changes_nothing(
    setup: Setup, url_form: str
) -> None:
    """Plain paths are opened read-only; `file:` URIs are refused by query_only."""
    w = setup.warehouse
    w.members(FIRST, "u1")
    w.members(SECOND, "u2")
    url = w.url if url_form == "path" else f"sqlite:///file:{w.path}?uri=true"
    write_config(setup, url, first_query="DELETE FROM members RETURNING user_id")
    result = cli(setup, "sync")
    assert result.exit_code == 1, result.output
    line = assert_read_only_line(result, f'audience "{FIRST}"')
    assert "read-only: attempt to write a readonly database; nothing was changed" in line
    with sqlite3.connect(w.path) as check:
        assert check.execute("SELECT COUNT(*) FROM members").fetchone() == (2,)
    (run,) = runs(setup)
    assert run.status == "failed" and run.error in line
    assert setup.receiver.requests == []
