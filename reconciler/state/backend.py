"""The one place that asks which database the state lives in (SQLite or PostgreSQL).

Every stage that writes or reads the run's temporary tables in bulk goes through a
`Backend` chosen once from its connection:

    mark                the DBAPI parameter mark (`?` or `%s`)
    temp(name)          how a temporary table is named in DDL (`temp.snap` on SQLite)
    true                the SQL literal of a true boolean column value
    bulk_settings()     settings for a run's bulk statements (no JIT on PostgreSQL)
    load(...)           bulk insert: executemany on SQLite, COPY on PostgreSQL
    analyze(table)      refresh planner statistics where the planner uses them
    analyze_stale(...)  ANALYZE state tables whose statistics went stale (PostgreSQL)
    unique(table)       whether a temporary table has a unique index
    server_now()        the time leases are judged by (the server's clock on PostgreSQL)
    hash_joins()        around a bulk statement PostgreSQL's planner misjudges: no nested loops
    collate_c           ` COLLATE "C"` where text order would follow the locale
    json_each(...)      the FROM items and value expression that spread a JSON object

The source database's own dialect questions (its snapshot, its read-only mode) are
source_snapshot.py's: they concern the user's warehouse, not the state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, text

# The state tables a run's diff, plan and ledger join in bulk, and the columns their
# queries filter and join on where a table has others (statistics of the bodies would
# cost a third of the time of ANALYZE updates, measured at 100k users).
JOINED = {
    "acked": "",
    "ack_versions": "",
    "updates": "(id, message_id, user_id, run_id, status, in_flight_since, entity)",
    "changes": "",
    "uncertain_keys": "",
}


@dataclass(frozen=True)
class Backend:
    conn: Connection

    @property
    def name(self) -> str:
        return self.conn.dialect.name

    @property
    def postgres(self) -> bool:
        return self.name == "postgresql"

    @property
    def mark(self) -> str:
        return "%s" if self.postgres else "?"

    @property
    def true(self) -> str:
        return "true" if self.postgres else "1"

    def temp(self, table: str) -> str:
        """The name to drop a temporary table by (SQLite keeps them in `temp`)."""
        return table if self.postgres else f"temp.{table}"

    def marks(self, count: int) -> str:
        return ", ".join([self.mark] * count)

    def load(
        self, table: str, columns: Sequence[str], chunks: Iterable[Sequence[Sequence[Any]]]
    ) -> None:
        """Bulk-insert chunks of rows into `table` (a temporary table of this run)."""
        names = ", ".join(columns)
        if self.postgres:
            raw = self.conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cursor, cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for chunk in chunks:
                    for row in chunk:
                        copy.write_row(row)
            return
        sql = f"INSERT INTO {table} ({names}) VALUES ({self.marks(len(columns))})"
        for chunk in chunks:
            if chunk:
                self.conn.exec_driver_sql(sql, list(chunk))

    def bulk_settings(self) -> None:
        """Settings for the bulk statements of a run, within its transaction: no JIT on
        PostgreSQL. The diff's statements are costed high enough to be compiled, which
        costs more than it saves (100 ms of the diff at 1M users, whose whole statement
        takes a few seconds; the floor turns it off too)."""
        if self.postgres:
            self.conn.exec_driver_sql("SET LOCAL jit = off")

    def analyze(self, table: str) -> None:
        """Planner statistics for a freshly filled table (PostgreSQL plans by them;
        SQLite's planner does well on its indexes alone)."""
        if self.postgres:
            self.conn.exec_driver_sql(f"ANALYZE {table}")

    def analyze_stale(self, tables: Mapping[str, str] = JOINED) -> None:
        """ANALYZE those of `tables` (state tables: name → column list, or "" for all)
        whose planner statistics are stale: more rows changed since the last ANALYZE
        than autovacuum's default threshold (50 + 10 %), which a server with
        autovacuum off, or behind, never acts on; or never gathered for a table that
        has rows. A state fresh from an initial sync has no statistics at all, and the
        next run's joins on `acked`, `updates` and `changes` are planned as if they
        were empty (measured at 100k users, 1 % changed: 28 s in `fill_plan` instead
        of 0.4 s). One catalog query when nothing is stale. SQLite's planner does well
        on the indexes of these tables alone."""
        if not self.postgres:
            return
        stale = self.conn.exec_driver_sql(
            "SELECT c.relname FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid "
            "WHERE s.schemaname = current_schema() AND c.relname = ANY(%s) "
            "AND (s.n_mod_since_analyze > 50 + 0.1 * GREATEST(c.reltuples, 0) "
            # Never analyzed, yet not empty: the counters start at zero in a database
            # copied or restored with its rows.
            "OR (c.reltuples < 0 AND pg_relation_size(c.oid) > 65536))",
            (list(tables),),
        ).scalars()
        for table in stale.all():
            self.conn.exec_driver_sql(f'ANALYZE "{table}" {tables[table]}')

    def unique(self, table: str) -> bool:
        """Whether a temporary table of this run has a unique index."""
        if self.postgres:
            sql = (
                "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indisunique "
                f"AND indrelid = 'pg_temp.{table}'::regclass)"
            )
        else:
            sql = (
                f"SELECT EXISTS (SELECT 1 FROM temp.pragma_index_list('{table}') WHERE \"unique\")"
            )
        return bool(self.conn.exec_driver_sql(sql).scalar_one())

    def writer(self) -> Any:
        """A DBAPI cursor for executemany loops too hot for SQLAlchemy's per-row work."""
        return self.conn.connection.cursor()

    def server_now(self) -> datetime:
        if self.postgres:
            moment = self.conn.execute(text("SELECT statement_timestamp()")).scalar_one()
            assert isinstance(moment, datetime)
            return moment.astimezone(UTC)
        return datetime.now(UTC)

    @contextlib.contextmanager
    def hash_joins(self) -> Iterator[None]:
        """Within the caller's transaction, no nested-loop joins on PostgreSQL: for a
        statement that is bulk work whatever the sizes, where estimates go wrong."""
        if not self.postgres:
            yield
            return
        self.conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
        try:
            yield
        finally:
            self.conn.exec_driver_sql("RESET enable_nestloop")

    @property
    def collate_c(self) -> str:
        """Code point order for text (PostgreSQL's default collation follows the locale;
        SQLite's BINARY already is code point order)."""
        return ' COLLATE "C"' if self.postgres else ""

    def json_each(self, table: str, column: str) -> tuple[str, str]:
        """(FROM items, value expression) that spread `table.column`, a JSON object, into
        rows `j.key` and the value as canonical JSON text."""
        if self.postgres:
            return (
                f"{table} AS t, json_each_text(t.{column}::json) AS j",
                "to_json(j.value)::text",
            )
        return f"{table} AS t, json_each(t.{column}) AS j", "json_quote(j.value)"
