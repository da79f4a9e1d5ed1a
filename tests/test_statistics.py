"""Planner statistics of the state tables: a run gathers them where they are missing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, insert

from reconciler.state.backend import Backend
from reconciler.state.db import migrate, state_engine
from reconciler.state.schema import acked


def _analyzed(conn: Connection, table: str) -> bool:
    # reltuples is -1 until the first ANALYZE (or VACUUM) of a table
    count = conn.exec_driver_sql(
        "SELECT reltuples FROM pg_class WHERE relname = %s AND relkind = 'r'", (table,)
    ).scalar_one()
    return bool(count >= 0)


def test_a_state_table_with_rows_and_no_statistics_is_analyzed(pg_url: str) -> None:
    engine = state_engine(pg_url)
    migrate(engine)
    now = datetime.now(UTC)
    rows = [
        {"user_id": f"u{n}", "key": "ltv", "value": "x" * 100, "update_id": n, "acked_at": now}
        for n in range(2000)
    ]
    with engine.begin() as conn:
        conn.execute(insert(acked), rows)
    with engine.begin() as conn:
        assert not _analyzed(conn, "acked")
        Backend(conn).analyze_stale()
        assert _analyzed(conn, "acked")
        # an empty table has nothing to plan by: left alone
        assert not _analyzed(conn, "uncertain_keys")
    engine.dispose()


def test_sqlite_state_tables_are_left_as_they_are(tmp_path: Path) -> None:
    engine = state_engine(f"sqlite:///{tmp_path / 'state.db'}")
    migrate(engine)
    with engine.begin() as conn:
        Backend(conn).analyze_stale()
        stat = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
        ).scalar_one()
    assert stat == 0
    engine.dispose()
