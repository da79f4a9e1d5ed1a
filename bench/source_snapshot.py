"""How long a run holds its source snapshot open on a PostgreSQL source, and what it costs.

Every source query of a run reads one REPEATABLE READ, READ ONLY snapshot (SPEC §1). On
the warehouse, that snapshot's xmin holds back vacuum for as long as the transaction is
open, so this measures, for an initial ``reconciler sync --dry-run`` of N users against a
PostgreSQL copy of the generated source:

- the whole process's wall time;
- how long the source transaction was open (``pg_stat_activity.xact_start``);
- the longest time one ``backend_xmin`` was held: the vacuum horizon the run pins.

With ``--baseline-rev REV`` the same is measured for another revision of reconciler (its
``reconciler/`` and ``migrations/`` from git, run from a temporary directory), e.g. the
one before the single snapshot, so the two can be compared in the same session.

    python bench/source_snapshot.py --users 1000000 --runs 2 --baseline-rev REV

The PostgreSQL source database ``reconciler_bench_source`` is created afresh and dropped
at the end; the state is a fresh SQLite file per run. Nothing is sent (a dry run).
"""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from _common import (
    DEFAULT_WORKDIR,
    PG_ADMIN_DSN,
    PYTHON,
    RECONCILER,
    REPO,
    median,
    pg_database,
    run_measured,
)
from _harness import fresh_state, write_config
from gen_source import ensure_source

SOURCE_DB = "reconciler_bench_source"
POLL_SECONDS = 0.02


def copy_to_postgresql(sqlite_path: Path, dsn: str) -> None:
    """Copy the generated SQLite source into PostgreSQL, with the same keys."""
    lite = sqlite3.connect(sqlite_path)
    try:
        with psycopg.connect(dsn) as pg:
            pg.execute(
                "CREATE TABLE users (user_id text PRIMARY KEY, email text, "
                "first_name text, last_name text, company_id integer, "
                "company_name text, lifetime_value double precision)"
            )
            pg.execute(
                "CREATE TABLE audience_members (audience_id integer NOT NULL, "
                "user_id text NOT NULL, PRIMARY KEY (audience_id, user_id))"
            )
            for table in ("users", "audience_members"):
                with pg.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                    for row in lite.execute(f"SELECT * FROM {table}"):
                        copy.write_row(row)
        with psycopg.connect(dsn, autocommit=True) as pg:
            pg.execute("VACUUM ANALYZE")
    finally:
        lite.close()


@dataclass
class Holds:
    """What the poller saw of the run's source backend."""

    transaction: float = 0.0  # longest now() - xact_start
    xmin: float = 0.0  # longest time one backend_xmin value was seen
    _xmin_seen: dict[tuple[int, str], list[float]] = field(default_factory=dict)

    def see(self, pid: int, xmin: str | None, open_for: float | None, at: float) -> None:
        if open_for is not None:
            self.transaction = max(self.transaction, open_for)
        if xmin is not None:
            span = self._xmin_seen.setdefault((pid, xmin), [at, at])
            span[1] = at
            self.xmin = max(self.xmin, span[1] - span[0])


@contextmanager
def watch(database: str) -> Iterator[Holds]:
    """Poll pg_stat_activity for the client backends on ``database`` while the body runs."""
    holds, stop = Holds(), threading.Event()

    def poll() -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            while not stop.is_set():
                for pid, xmin, open_for, at in conn.execute(
                    "SELECT pid, backend_xmin::text, "
                    "EXTRACT(EPOCH FROM clock_timestamp() - xact_start)::float8, "
                    "EXTRACT(EPOCH FROM clock_timestamp())::float8 "
                    "FROM pg_stat_activity WHERE datname = %s "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    (database,),
                ):
                    holds.see(pid, xmin, open_for, at)
                stop.wait(POLL_SECONDS)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield holds
    finally:
        stop.set()
        thread.join()


def baseline_tree(rev: str, into: Path) -> Path:
    """``reconciler/`` and ``migrations/`` of revision ``rev``, extracted under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "reconciler", "migrations"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def command(tree: Path | None) -> list[str]:
    """The reconciler command: the installed one, or the one of another tree."""
    if tree is None:
        return [str(RECONCILER)]
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); import reconciler.cli as c; "
        "assert c.__file__.startswith(sys.path[0]), c.__file__; c.main()"
    )
    return [str(PYTHON), "-c", code, str(tree)]


def pg_config(path: Path, state: str, sqlite_source: Path, source_url: str) -> Path:
    """The benchmark's config (bench/_harness.py) with the PostgreSQL copy as its source."""
    write_config(path, f"sqlite:///{state}", sqlite_source, "http://127.0.0.1:9/")
    path.write_text(path.read_text().replace(f"sqlite:///{sqlite_source}", source_url))
    return path


def measure_once(label: str, argv: list[str], config: Path) -> dict[str, float]:
    """One initial dry run: its wall time and how long it held the source snapshot."""
    with watch(SOURCE_DB) as holds:
        done = run_measured([*argv, "sync", "--dry-run", "--config", str(config)], timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{label}: exited {done.returncode}: {done.tail()}")
    print(
        f"{label}: {done.seconds:.2f} s; source transaction open {holds.transaction:.2f} s;"
        f" one xmin held {holds.xmin:.2f} s",
        file=sys.stderr,
    )
    return {"seconds": done.seconds, "transaction_open": holds.transaction, "xmin_held": holds.xmin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--baseline-rev", help="also measure this git revision")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()
    sqlite_source = ensure_source(args.workdir, args.users)
    runs: dict[str, list[dict[str, float]]] = {}
    with pg_database(SOURCE_DB) as dsn, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        copy_to_postgresql(sqlite_source, dsn)
        print(
            f"source copied to PostgreSQL in {time.perf_counter() - started:.1f} s", file=sys.stderr
        )
        source_url = dsn.replace("postgresql://", "postgresql+psycopg://")
        variants: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.baseline_rev:
            variants.append((args.baseline_rev, baseline_tree(args.baseline_rev, Path(tmp))))
        for _ in range(args.runs):  # interleaved, so a busy neighbour slows both sides
            for label, tree in variants:
                with fresh_state("sqlite", args.workdir, "source-snapshot") as state:
                    config = pg_config(
                        Path(tmp) / "reconciler.toml", state, sqlite_source, source_url
                    )
                    runs.setdefault(label, []).append(measure_once(label, command(tree), config))
    results = [
        {
            "label": label,
            "runs": got,
            **{f"median_{k}": median([r[k] for r in got]) for k in got[0]},
        }
        for label, got in runs.items()
    ]
    out = io.StringIO()
    out.write(
        f"| {args.users:,} users, PostgreSQL source | whole `sync --dry-run` | source "
        "transaction open | one xmin held |\n|---|---|---|---|\n"
    )
    for r in results:
        out.write(
            f"| {r['label']} | {r['median_seconds']:.2f} s | "
            f"{r['median_transaction_open']:.2f} s | {r['median_xmin_held']:.2f} s |\n"
        )
    print(out.getvalue(), end="")
    print(json.dumps({"users": args.users, "runs": args.runs, "results": results}))


if __name__ == "__main__":
    main()
