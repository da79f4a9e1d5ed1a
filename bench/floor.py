"""The floor: the least work a snapshot-and-diff can do, written against plain drivers.

One invocation is one measured run, as a whole process like the CLI it is compared with:

1. runs the config's queries (five audiences, one trait, the profile) against the
   SQLite source with the stdlib ``sqlite3`` module, streaming rows;
2. writes the same rows into snapshot tables of the state database, replacing the
   previous snapshot, in one transaction (SQLite: ``executemany`` into a ``WITHOUT
   ROWID`` table keyed ``(user_id, key)``; PostgreSQL: ``COPY``);
3. computes the difference against the ``acked`` table (the acknowledged state) and
   walks every changed row in ``(user_id, key)`` order, counting users, entries, exits
   and trait changes, by one of two methods:
   ``merge``: a streaming merge of two index-ordered cursors over ``snap`` and ``acked``;
   ``sql``:   one set-based query that returns only the changed rows.

``ack`` copies the snapshot into ``acked`` (setup, not measured). The harness runs both
methods and takes the faster as the floor. Prints one JSON object: phases and counts.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gen_source import PROFILE_QUERY, TRAIT, TRAIT_QUERY, audience_queries

Row = tuple[str, str, Any]
PROFILE_COLUMNS = "user_id, email, first_name, last_name, company_id, company_name"

SQLITE_SCHEMA = """
    CREATE TABLE IF NOT EXISTS snap (user_id TEXT NOT NULL, key TEXT NOT NULL, value,
        PRIMARY KEY (user_id, key)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS acked (user_id TEXT NOT NULL, key TEXT NOT NULL, value,
        PRIMARY KEY (user_id, key)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS profile (user_id TEXT PRIMARY KEY, email TEXT,
        first_name TEXT, last_name TEXT, company_id INTEGER, company_name TEXT) WITHOUT ROWID;
"""
PG_SCHEMA = """
    CREATE TABLE IF NOT EXISTS snap (user_id TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL, value TEXT, PRIMARY KEY (user_id, key));
    CREATE TABLE IF NOT EXISTS acked (user_id TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL, value TEXT, PRIMARY KEY (user_id, key));
    CREATE TABLE IF NOT EXISTS profile (user_id TEXT COLLATE "C" PRIMARY KEY, email TEXT,
        first_name TEXT, last_name TEXT, company_id BIGINT, company_name TEXT);
"""
# Changed rows only: new or different values, then acknowledged keys that disappeared.
# SQLite has no hash join, so its FULL JOIN is this same pair of passes; PostgreSQL's
# hash full join reads each table once.
SQLITE_DIFF_SQL = """
    SELECT s.user_id, s.key, s.value, a.value IS NULL FROM snap s
      LEFT JOIN acked a ON a.user_id = s.user_id AND a.key = s.key
     WHERE a.value IS NOT s.value
    UNION ALL
    SELECT a.user_id, a.key, NULL, FALSE FROM acked a
     WHERE NOT EXISTS (SELECT 1 FROM snap s WHERE s.user_id = a.user_id AND s.key = a.key)
    ORDER BY 1, 2
"""
PG_DIFF_SQL = """
    SELECT coalesce(s.user_id, a.user_id), coalesce(s.key, a.key), s.value, a.user_id IS NULL
      FROM snap s FULL JOIN acked a ON a.user_id = s.user_id AND a.key = s.key
     WHERE a.value IS DISTINCT FROM s.value
    ORDER BY 1, 2
"""
ORDERED = "SELECT user_id, key, value FROM {table} ORDER BY user_id, key"


@dataclass
class Counts:
    """What the difference holds, counted as ``sync_runs`` counts it (SPEC §7)."""

    users_changed: int = 0
    entered: int = 0
    exited: int = 0
    traits_changed: int = 0


def _usable(query: str, columns: str) -> str:
    """``query`` wrapped so that rows without a user id (or, for traits, a value) drop out."""
    return f"SELECT {columns} FROM ({query}) AS q WHERE q.user_id IS NOT NULL AND q.user_id <> ''"


def snapshot_cursors(source: sqlite3.Connection) -> Iterator[tuple[str, sqlite3.Cursor]]:
    """``(key, cursor)`` per audience and trait query; cursors yield ``(user_id, value)``.

    Audience keys are ``audience:<n>`` with value 1, the trait's key is ``trait``.
    Duplicate audience rows are collapsed by the snapshot table's key.
    """
    for n, (_, query) in enumerate(audience_queries(), 1):
        yield f"audience:{n}", source.execute(_usable(query, "q.user_id, 1"))
    yield (
        "trait",
        source.execute(_usable(TRAIT_QUERY, "q.user_id, q.value") + " AND q.value IS NOT NULL"),
    )


def profile_cursor(source: sqlite3.Connection) -> sqlite3.Cursor:
    """The profile query's rows that have a user id."""
    return source.execute(_usable(PROFILE_QUERY, PROFILE_COLUMNS))


def count_changes(changes: Iterable[tuple[str, str, Any, bool]], counts: Counts) -> None:
    """Count ``(user_id, key, new_value, is_new)`` changes ordered by user; None = gone."""
    last_user = None
    for uid, key, value, is_new in changes:
        if key == "trait":
            if value is None:
                continue  # a trait value that disappears sends nothing (SPEC §6)
            counts.traits_changed += 1
        elif value is None:
            counts.exited += 1
        elif is_new:
            counts.entered += 1
        else:
            continue
        if uid != last_user:
            counts.users_changed += 1
            last_user = uid


def merge(snap: Iterator[Row], acked: Iterator[Row]) -> Iterator[tuple[str, str, Any, bool]]:
    """Merge two ``(user_id, key)``-ordered streams into the changed rows, still ordered."""
    a, b = next(snap, None), next(acked, None)
    while a is not None or b is not None:
        if b is None or (a is not None and (a[0], a[1]) < (b[0], b[1])):
            yield a[0], a[1], a[2], True  # type: ignore[index]
            a = next(snap, None)
        elif a is None or (b[0], b[1]) < (a[0], a[1]):
            yield b[0], b[1], None, False
            b = next(acked, None)
        else:
            if a[2] != b[2]:
                yield a[0], a[1], a[2], False
            a, b = next(snap, None), next(acked, None)


def _ordered(cursor: Any, table: str) -> Iterator[Row]:
    """The rows of ``table`` in primary-key order, streamed from ``cursor``."""
    cursor.execute(ORDERED.format(table=table))
    return iter(cursor)


class SqliteState:
    """The floor's state tables in a SQLite file (WAL, synchronous=NORMAL, as a daemon would)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.executescript(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;" + SQLITE_SCHEMA
        )

    def load(self, cursors: Iterable[tuple[str, sqlite3.Cursor]]) -> None:
        """Replace the snapshot with the cursors' rows inside the open transaction.

        Each source cursor is handed straight to ``executemany``: no Python loop per row
        (the key is one of ours, so it is safe to write it into the statement).
        """
        self.conn.execute("DELETE FROM snap")
        for key, cursor in cursors:
            self.conn.executemany(f"INSERT OR IGNORE INTO snap VALUES (?, '{key}', ?)", cursor)

    def load_profiles(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Replace the stored profiles with ``rows`` inside the open transaction."""
        self.conn.execute("DELETE FROM profile")
        self.conn.executemany("INSERT OR REPLACE INTO profile VALUES (?, ?, ?, ?, ?, ?)", rows)

    def changes(self, method: str) -> Iterator[tuple[str, str, Any, bool]]:
        """The changed rows in ``(user_id, key)`` order, computed by ``method``."""
        if method == "sql":
            return iter(self.conn.execute(SQLITE_DIFF_SQL))
        return merge(_ordered(self.conn.cursor(), "snap"), _ordered(self.conn.cursor(), "acked"))

    def begin(self) -> None:
        """Open the one transaction of a run."""
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        """Commit it."""
        self.conn.execute("COMMIT")

    def acknowledge(self) -> None:
        """Make the acknowledged state equal to the snapshot (setup, not measured)."""
        self.conn.executescript(
            "BEGIN; DELETE FROM acked; INSERT INTO acked SELECT * FROM snap; COMMIT;"
        )


class PostgresState:
    """The floor's state tables in PostgreSQL, loaded with ``COPY``."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn)
        self.conn.execute(PG_SCHEMA)
        self.conn.commit()

    def load(self, cursors: Iterable[tuple[str, sqlite3.Cursor]]) -> None:
        """Replace the snapshot with the cursors' rows by ``COPY``, in the open transaction."""
        with self.conn.cursor() as cur:
            cur.execute("TRUNCATE snap")
            with cur.copy("COPY snap (user_id, key, value) FROM STDIN") as copy:
                for key, cursor in cursors:
                    for uid, value in _dedup_adjacent(cursor):
                        copy.write_row((uid, key, str(value)))
            cur.execute("ANALYZE snap")  # fresh statistics, or the planner guesses badly

    def load_profiles(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Replace the stored profiles with ``rows`` by ``COPY``, inside the open transaction."""
        with self.conn.cursor() as cur:
            cur.execute("TRUNCATE profile")
            with cur.copy(f"COPY profile ({PROFILE_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    def changes(self, method: str) -> Iterator[tuple[str, str, Any, bool]]:
        """The changed rows in ``(user_id, key)`` order, computed by ``method``."""
        if method == "sql":
            cur = self.conn.cursor(name="diff")
            cur.itersize = 10_000
            cur.execute(PG_DIFF_SQL)
            return iter(cur)
        snap, acked = self.conn.cursor(name="snap"), self.conn.cursor(name="acked")
        snap.itersize = acked.itersize = 10_000
        return merge(_ordered(snap, "snap"), _ordered(acked, "acked"))

    def begin(self) -> None:
        """Open the run's transaction; JIT compiling costs more than it saves here."""
        self.conn.execute("SET LOCAL jit = off")

    def commit(self) -> None:
        """Commit the run's transaction."""
        self.conn.commit()

    def acknowledge(self) -> None:
        """Make the acknowledged state equal to the snapshot (setup, not measured)."""
        self.conn.execute("TRUNCATE acked")
        self.conn.execute("INSERT INTO acked SELECT * FROM snap")
        self.conn.execute("ANALYZE acked")
        self.conn.commit()


def _dedup_adjacent(rows: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Drop a row whose user id equals the one before it (duplicate audience rows collapse).

    ``COPY`` has no ``ON CONFLICT``; this data's queries emit rows in user order, so
    adjacent duplicates are the only ones it can hold.
    """
    previous = None
    for row in rows:
        if row[0] != previous:
            previous = row[0]
            yield row


def run(
    source: Path, state: SqliteState | PostgresState, method: str, with_profile: bool
) -> dict[str, Any]:
    """One floor run: snapshot, difference, commit; the seconds of each phase and the counts."""
    phases: dict[str, float] = {}
    counts = Counts()
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    start = time.perf_counter()
    state.begin()
    state.load(snapshot_cursors(src))
    phases["snapshot"] = time.perf_counter() - start
    if with_profile:
        state.load_profiles(profile_cursor(src))
    phases["profile"] = time.perf_counter() - start - sum(phases.values())
    count_changes(state.changes(method), counts)
    phases["diff"] = time.perf_counter() - start - sum(phases.values())
    state.commit()
    phases["commit"] = time.perf_counter() - start - sum(phases.values())
    phases["total"] = time.perf_counter() - start
    src.close()
    return {"method": method, "phases": phases, "counts": asdict(counts), "trait": TRAIT}


def main() -> None:
    """Command line: ``run`` (measured) or ``ack`` (setup) against one state database."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "ack"))
    parser.add_argument("--source", type=Path, required=True)
    state = parser.add_mutually_exclusive_group(required=True)
    state.add_argument("--sqlite", type=Path, help="state database file")
    state.add_argument("--pg", help="state database DSN (psycopg)")
    parser.add_argument("--method", choices=("merge", "sql"), default="merge")
    parser.add_argument(
        "--no-profile", action="store_true", help="leave the profile query out of the snapshot"
    )
    args = parser.parse_args()
    db = SqliteState(args.sqlite) if args.sqlite else PostgresState(args.pg)
    if args.action == "ack":
        db.acknowledge()
        print(json.dumps({"acknowledged": True}))
    else:
        print(json.dumps(run(args.source, db, args.method, not args.no_profile)))


if __name__ == "__main__":
    main()
