"""Generate the benchmark's SQLite *source* database, and change 1 % of its memberships.

The source holds N users, each with a profile row and one numeric trait
(``lifetime_value``), and five audiences in which every user is a member with
probability 0.3, drawn independently from a seeded generator: the same N and seed
always give the same database.

``flip_memberships`` toggles a fixed, seeded set of (audience, user) cells: as many as
1 % of the expected memberships (0.015 * N). Toggling the same cells twice restores the
database, so the benchmark flips once for a measured run and once more to undo it.

``ensure_accounts`` adds accounts to a source (SPEC §9): N / 10 accounts in
``companies`` (every fifth with a second row for a larger user id, so the smallest one
is picked), one account audience (``account_members``, each account a member with
probability 0.3) and the account trait ``seats``. The users' tables are untouched, so
the floor and the other sections see the same source.

Run ``python bench/gen_source.py --users 100000 PATH`` to build one by hand.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

AUDIENCES: tuple[str, ...] = (
    "Active Last 30 Days",
    "High-Value Users",
    "Newsletter Subscribers",
    "Trial Users",
    "Churn Risk",
)
TRAIT = "Lifetime Value"
MEMBERSHIP_PROBABILITY = 0.3
FLIP_FRACTION = 0.01
SCHEMA_VERSION = "1"

ACCOUNT_AUDIENCE = "Enterprise Accounts"
ACCOUNT_TRAIT = "Seats"
ACCOUNTS_PER_USER = 0.1
ACCOUNTS_QUERY = (
    "SELECT group_id, user_id, name, website, created_at, city, postal_code, country FROM companies"
)
ACCOUNT_AUDIENCE_QUERY = "SELECT group_id FROM account_members"
ACCOUNT_TRAIT_QUERY = "SELECT group_id, seats AS value FROM companies"

# The queries of the config (SPEC §3); the floor runs exactly these too.
AUDIENCE_QUERY = "SELECT user_id FROM audience_members WHERE audience_id = {audience_id}"
TRAIT_QUERY = "SELECT user_id, lifetime_value AS value FROM users"
PROFILE_QUERY = "SELECT user_id, email, first_name, last_name, company_id, company_name FROM users"

_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")


@dataclass(frozen=True)
class FlipResult:
    """What one ``flip_memberships`` call changed."""

    entered: int
    exited: int
    users_changed: int


def user_id(index: int) -> str:
    """The id of the user at ``index`` (0-based); ids sort in index order.

    >>> user_id(41)
    'user-0000041'
    """
    return f"user-{index:07d}"


def audience_queries() -> list[tuple[str, str]]:
    """``(name, query)`` of every audience, as written into configs and run by the floor."""
    return [(name, AUDIENCE_QUERY.format(audience_id=i)) for i, name in enumerate(AUDIENCES, 1)]


def _user_rows(users: int, rng: random.Random) -> Iterator[tuple[object, ...]]:
    """Profile and trait rows of every user, in id order."""
    for i in range(users):
        first, last = _FIRST[i % len(_FIRST)], _LAST[(i // len(_FIRST)) % len(_LAST)]
        company = i % 5000
        yield (
            user_id(i),
            f"{first.lower()}.{last.lower()}.{i}@example.com",
            first,
            last,
            company,
            f"Company {company}",
            round(rng.uniform(0, 5000), 2),
        )


def _membership_rows(users: int, rng: random.Random) -> Iterator[tuple[int, str]]:
    """``(audience_id, user_id)`` of every membership, audience by audience."""
    for audience_id in range(1, len(AUDIENCES) + 1):
        for i in range(users):
            if rng.random() < MEMBERSHIP_PROBABILITY:
                yield audience_id, user_id(i)


def generate(path: Path, users: int, seed: int = 1) -> None:
    """Write a fresh source database of ``users`` users at ``path`` (replacing any file)."""
    path.unlink(missing_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    rng = random.Random(seed)
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript("""
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            CREATE TABLE users (user_id TEXT PRIMARY KEY, email TEXT, first_name TEXT,
                last_name TEXT, company_id INTEGER, company_name TEXT, lifetime_value REAL);
            CREATE TABLE audience_members (audience_id INTEGER NOT NULL, user_id TEXT NOT NULL,
                PRIMARY KEY (audience_id, user_id)) WITHOUT ROWID;
            CREATE TABLE bench_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        """)
        with conn:
            conn.executemany(
                "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)", _user_rows(users, rng)
            )
            conn.executemany(
                "INSERT INTO audience_members VALUES (?, ?)", _membership_rows(users, rng)
            )
            conn.executemany(
                "INSERT INTO bench_meta VALUES (?, ?)",
                [
                    ("users", str(users)),
                    ("seed", str(seed)),
                    ("flipped", "0"),
                    ("schema", SCHEMA_VERSION),
                ],
            )
        conn.execute("ANALYZE")
    finally:
        conn.close()
    tmp.rename(path)


def _flip_cells(users: int, seed: int) -> list[tuple[int, str]]:
    """The seeded (audience_id, user_id) cells that ``flip_memberships`` toggles."""
    count = max(1, round(users * len(AUDIENCES) * MEMBERSHIP_PROBABILITY * FLIP_FRACTION))
    cells = random.Random(seed).sample(range(users * len(AUDIENCES)), count)
    return [(cell % len(AUDIENCES) + 1, user_id(cell // len(AUDIENCES))) for cell in cells]


def flip_memberships(path: Path, seed: int = 2) -> FlipResult:
    """Toggle 1 % of the expected memberships of the source at ``path``, in one transaction.

    A toggled member leaves its audience and a toggled non-member enters it. Calling it
    again with the same seed undoes it; ``bench_meta.flipped`` tracks the parity.
    """
    conn = sqlite3.connect(path)
    try:
        users = int(conn.execute("SELECT value FROM bench_meta WHERE name = 'users'").fetchone()[0])
        cells = _flip_cells(users, seed)
        with conn:
            conn.execute(
                "CREATE TEMP TABLE flip (audience_id INTEGER, user_id TEXT, "
                "present INTEGER, PRIMARY KEY (audience_id, user_id))"
            )
            conn.executemany("INSERT INTO flip VALUES (?, ?, 0)", cells)
            conn.execute(
                "UPDATE flip SET present = 1 WHERE (audience_id, user_id) IN "
                "(SELECT audience_id, user_id FROM audience_members)"
            )
            exited = conn.execute(
                "DELETE FROM audience_members WHERE (audience_id, user_id) IN "
                "(SELECT audience_id, user_id FROM flip WHERE present)"
            ).rowcount
            entered = conn.execute(
                "INSERT INTO audience_members SELECT audience_id, user_id "
                "FROM flip WHERE NOT present"
            ).rowcount
            conn.execute(
                "UPDATE bench_meta SET value = CAST(1 - value AS TEXT) WHERE name = 'flipped'"
            )
            conn.execute("DROP TABLE flip")
    finally:
        conn.close()
    return FlipResult(entered, exited, len({uid for _, uid in cells}))


def group_id(index: int) -> str:
    """The id of the account at ``index`` (0-based).

    >>> group_id(7)
    'acct-000007'
    """
    return f"acct-{index:06d}"


def _company_rows(accounts: int, rng: random.Random) -> Iterator[tuple[object, ...]]:
    """``companies`` rows: one per account, a second one (larger user id) every fifth."""
    cities = ("Paris", "Berlin", "Lisbon", "Austin", "Osaka")
    for i in range(accounts):
        row = (
            group_id(i),
            f"Company {i}",
            f"https://company{i}.example",
            f"20{10 + i % 15}-0{1 + i % 9}-1{i % 10} 10:00:00",
            cities[i % 5],
            10000 + i % 90000,
            "FR",
            rng.randint(1, 500),
        )
        yield (row[0], user_id(i * 10), *row[1:])
        if i % 5 == 0:
            yield (row[0], user_id(i * 10 + 1), *row[1:])


def ensure_accounts(path: Path, seed: int = 3) -> int:
    """Add the account tables to the source at ``path`` if missing; return the account count."""
    conn = sqlite3.connect(path)
    try:
        meta = dict(conn.execute("SELECT name, value FROM bench_meta").fetchall())
        if "accounts" in meta:
            return int(meta["accounts"])
        accounts = max(1, int(int(meta["users"]) * ACCOUNTS_PER_USER))
        rng = random.Random(seed)
        with conn:
            conn.executescript("""
                CREATE TABLE companies (group_id TEXT NOT NULL, user_id TEXT, name TEXT,
                    website TEXT, created_at TEXT, city TEXT, postal_code INTEGER,
                    country TEXT, seats INTEGER);
                CREATE TABLE account_members (group_id TEXT PRIMARY KEY) WITHOUT ROWID;
            """)
            conn.executemany(
                "INSERT INTO companies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _company_rows(accounts, rng),
            )
            conn.executemany(
                "INSERT INTO account_members VALUES (?)",
                ((group_id(i),) for i in range(accounts) if rng.random() < MEMBERSHIP_PROBABILITY),
            )
            conn.execute("INSERT INTO bench_meta VALUES ('accounts', ?)", (str(accounts),))
        return accounts
    finally:
        conn.close()


def ensure_source(workdir: Path, users: int, seed: int = 1) -> Path:
    """The cached source of ``users`` users under ``workdir``, generated if missing or stale.

    A source left flipped by an interrupted benchmark is flipped back.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"source-{users}-seed{seed}.db"
    meta: dict[str, str] = {}
    if path.exists():
        conn = sqlite3.connect(path)
        try:
            meta = dict(conn.execute("SELECT name, value FROM bench_meta").fetchall())
        except sqlite3.Error:
            meta = {}
        finally:
            conn.close()
    if meta.get("schema") != SCHEMA_VERSION:
        generate(path, users, seed)
    elif meta.get("flipped") == "1":
        flip_memberships(path)
    return path


def main() -> None:
    """Command line: generate a source database, or flip one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--flip", action="store_true", help="toggle 1 %% of memberships instead")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.flip:
        print(flip_memberships(args.path))
    else:
        generate(args.path, args.users, args.seed)
    print(f"done in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
