"""Real parts for every test: SQLite files, the machine's PostgreSQL, a loopback server.

PostgreSQL tests skip with a visible reason when no server answers, unless
RECONCILER_REQUIRE_POSTGRES=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from reconciler.config import Config, load_config
from reconciler.state.db import migrate, state_engine

from .receiver import Receiver

PG_ADMIN = os.environ.get("RECONCILER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_names = itertools.count()


def _pg_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]


@pytest.fixture(scope="session")
def pg_admin() -> str:
    problem = _pg_available()
    if problem:
        if os.environ.get("RECONCILER_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here but unreachable: {problem}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN}: {problem}")
    return PG_ADMIN


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"reconciler_test_{os.getpid()}_{next(_names)}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The state database URL, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


class Warehouse:
    """A real SQLite source database the tests fill and change between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.execute("CREATE TABLE members (audience TEXT, user_id TEXT)")
        self.execute("CREATE TABLE traits (trait TEXT, user_id TEXT, value)")
        self.execute(
            "CREATE TABLE users (user_id TEXT, email TEXT, first_name TEXT, "
            "last_name TEXT, company_id, company_name TEXT, anonymous_id TEXT)"
        )

    def execute(self, sql: str, *params: Any) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.executemany(sql, rows)

    def members(self, audience: str, *user_ids: str) -> None:
        """Set an audience's members exactly."""
        self.execute("DELETE FROM members WHERE audience = ?", audience)
        self.executemany("INSERT INTO members VALUES (?, ?)", [(audience, u) for u in user_ids])

    def trait(self, trait: str, values: dict[str, Any]) -> None:
        self.execute("DELETE FROM traits WHERE trait = ?", trait)
        self.executemany(
            "INSERT INTO traits VALUES (?, ?, ?)", [(trait, u, v) for u, v in values.items()]
        )

    def user(self, user_id: str, **fields: Any) -> None:
        columns = ["user_id", *fields]
        self.execute(
            f"INSERT INTO users ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
            user_id,
            *fields.values(),
        )


@pytest.fixture
def warehouse(tmp_path: Path) -> Warehouse:
    return Warehouse(tmp_path / "warehouse.db")


@dataclass
class Setup:
    """Writes a config file for the test and loads it like the CLI does."""

    tmp_path: Path
    state_url: str
    warehouse: Warehouse
    receiver: Receiver

    def config_text(
        self,
        audiences: tuple[str, ...] = ("Order Completed Last 30 Days", "High Value Users"),
        traits: tuple[str, ...] = ("Lifetime Value",),
        destination: str = "",
        extra: str = "",
        webhook_url: str | None = None,
    ) -> str:
        parts = [
            f"""
            [database]
            url = "{self.state_url}"

            [source]
            url = "{self.warehouse.url}"

            [destination]
            webhook_url = "{webhook_url or self.receiver.url}"
            requests_per_second = 0
            max_concurrency = 4
            timeout_seconds = 5
            {destination}

            [profile]
            query = '''SELECT user_id, email, first_name, last_name, company_id,
                company_name, anonymous_id FROM users'''
            """
        ]
        for name in audiences:
            parts.append(f"""
            [[audiences]]
            name = "{name}"
            query = "SELECT user_id FROM members WHERE audience = '{name}'"
            """)
        for name in traits:
            parts.append(f"""
            [[traits]]
            name = "{name}"
            query = "SELECT user_id, value FROM traits WHERE trait = '{name}'"
            """)
        parts.append(extra)
        return "".join(textwrap.dedent(p) for p in parts)

    def write(self, **kwargs: Any) -> Path:
        path = self.tmp_path / "reconciler.toml"
        path.write_text(self.config_text(**kwargs))
        return path

    def config(self, **kwargs: Any) -> Config:
        return load_config(self.write(**kwargs), env={})

    def engine(self) -> Engine:
        engine = state_engine(self.state_url)
        migrate(engine)
        return engine


@pytest.fixture
def setup(
    tmp_path: Path, state_url: str, warehouse: Warehouse, receiver: Receiver
) -> Iterator[Setup]:
    yield Setup(tmp_path, state_url, warehouse, receiver)


@pytest.fixture
def engine_of() -> Iterator[Callable[[Setup], Engine]]:
    engines: list[Engine] = []

    def make(s: Setup) -> Engine:
        engine = s.engine()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()
