"""One consistent, read-only view of the source for all the queries of a run (SPEC §1).

A run opens one source connection and calls `begin_snapshot` on it before its first
query; every audience, trait, profile and account query then reads the same moment of
the source, and none can change it. The transaction is never committed: it ends when
the connection closes.

    PostgreSQL      REPEATABLE READ, READ ONLY; the snapshot is taken by the first
                    statement, which also reads its id (`pg_current_snapshot()`)
    SQLite          one read transaction (BEGIN, db.source_engine) pinned by a first
                    read; the file is opened read-only and `query_only` is on
    MySQL, MariaDB  REPEATABLE READ, START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY
    anything else   one transaction at the database's default isolation level, rolled
                    back at the end; no snapshot guarantee, no read-only guarantee
                    beyond the database role (README, "The source database")

(Not to be confused with snapshot.py, which stores what these queries return in the
state database.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from reconciler.state.db import database_error


@dataclass(frozen=True)
class SourceSnapshot:
    """The moment every query of the run reads."""

    taken_at: datetime  # the client's clock just before the snapshot was taken
    id: str | None = None  # PostgreSQL's snapshot, `xmin:xmax:xip,...`; None elsewhere


def begin_snapshot(connection: Connection) -> SourceSnapshot:
    """Start the run's one read-only transaction on `connection` and take its snapshot.

    Must be called before anything else runs on the connection. Raises `DatabaseError`
    (naming the source database) when the database refuses.
    """
    dialect = connection.dialect.name
    try:
        if dialect == "postgresql":
            connection.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            # pg_current_snapshot() is PostgreSQL 13's name for txid_current_snapshot().
            version = connection.dialect.server_version_info or (0,)
            function = "pg_current_snapshot" if version >= (13,) else "txid_current_snapshot"
            taken_at = datetime.now(UTC)
            # The first statement of a REPEATABLE READ transaction takes its snapshot.
            snapshot_id = connection.exec_driver_sql(f"SELECT {function}()::text").scalar()
            return SourceSnapshot(taken_at, snapshot_id)
        if dialect in ("mysql", "mariadb"):
            connection.execution_options(isolation_level="REPEATABLE READ")
            taken_at = datetime.now(UTC)
            connection.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            return SourceSnapshot(taken_at)
        taken_at = datetime.now(UTC)
        if dialect == "sqlite":
            # BEGIN (emitted by the engine) is deferred: the snapshot is taken by the
            # first read, so read now rather than at the first query.
            connection.exec_driver_sql("SELECT COUNT(*) FROM sqlite_master").scalar()
        return SourceSnapshot(taken_at)
    except SQLAlchemyError as exc:
        raise database_error(
            "source", connection.engine, exc, "starting the read-only snapshot: "
        ) from None
