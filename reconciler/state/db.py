"""Engines for the state and source databases, and migrations run from code."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

from reconciler.errors import DatabaseError
from reconciler.redact import Redactor, mask_database_url

# Each engine's URL as the user wrote it (`postgresql://`, before normalize_url picks the
# driver), for messages.
_WRITTEN: WeakKeyDictionary[Engine, str] = WeakKeyDictionary()


def shown_url(engine: Engine) -> str:
    """The engine's URL as the user wrote it, password masked: what messages show."""
    written = _WRITTEN.get(engine) or engine.url.render_as_string(hide_password=False)
    return mask_database_url(written)


def normalize_url(url: str) -> URL:
    """Plain `postgresql://` URLs use psycopg 3, the driver we ship."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def state_engine(url: str) -> Engine:
    """The state database engine: one per process.

    SQLite gets WAL (readers never block the writer), a busy timeout instead of
    immediate "database is locked" errors (30 s, or the URL's `?timeout=SECONDS`), and
    enforced foreign keys.
    """
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        timeout = float(parsed.query.get("timeout", 30))  # type: ignore[arg-type]
        kwargs["connect_args"] = {"timeout": timeout}
    engine = create_engine(parsed, **kwargs)
    _WRITTEN[engine] = url
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The busy timeout is sqlite3's `timeout` connect argument, set in state_engine.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA temp_store=FILE")
    cursor.close()


def source_engine(url: str) -> Engine:
    """The source database engine. No pool: it is used once a run, read-only.

    A SQLite source file is opened read-only, so a mistyped path fails instead of
    creating an empty database, and no query can change the user's data.
    """
    parsed = normalize_url(url)
    engine = create_engine(parsed, poolclass=NullPool)
    _WRITTEN[engine] = url
    path = parsed.database
    if (
        engine.dialect.name == "sqlite"
        and path
        and path != ":memory:"
        and not path.startswith("file:")
        and parsed.query.get("uri") != "true"
    ):
        event.listen(engine, "do_connect", _sqlite_read_only)
    if engine.dialect.name == "sqlite":
        # SQLAlchemy's recipe for real pysqlite transactions: the driver emits no BEGIN
        # before a SELECT, so every query would read its own moment. We emit it, and
        # every query of a run shares one read transaction (source_snapshot.py).
        event.listen(engine, "connect", _sqlite_source_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_read_only(
    _dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]
) -> None:
    # Done at connect time so that engine.url, which messages show, stays the user's.
    cargs[0] = f"file:{quote(str(cargs[0]))}?mode=ro"
    cparams["uri"] = True


def _sqlite_source_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # pysqlite's own BEGIN handling off
    # Refuses writes on any source, `file:` URIs and `:memory:` included.
    dbapi_connection.execute("PRAGMA query_only = ON")


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


def migrations_dir() -> str:
    """The Alembic scripts: shipped as `reconciler.migrations` when installed, or the
    repository's `migrations/` when the package is imported from a source tree."""
    try:
        return str(files("reconciler.migrations"))
    except ModuleNotFoundError:
        return str(Path(__file__).resolve().parent.parent / "migrations")


def alembic_config(engine: Engine | None = None) -> AlembicConfig:
    """An Alembic config built in code, so migrations work after `pip install .`."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", migrations_dir())
    if engine is not None:
        cfg.set_main_option(
            "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
        )
    return cfg


# The newest migration's revision; a test checks it against migrations/.
HEAD_REVISION = "0006"


def at_head(engine: Engine) -> bool:
    """Whether the state database is already at HEAD_REVISION (no Alembic needed)."""
    try:
        with engine.connect() as connection:
            versions = (
                connection.exec_driver_sql("SELECT version_num FROM alembic_version")
                .scalars()
                .all()
            )
    except SQLAlchemyError:
        return False  # no such table yet, or unreachable: let the upgrade say which
    return versions == [HEAD_REVISION]


def migrate(engine: Engine) -> str | None:
    """Bring the state database to the newest schema; say so when it was new.

    Every command calls this first, so the common case, a database already at the
    newest revision, is one query; Alembic is loaded only to upgrade. Returns a line
    saying where the state database was created when this made it (a new SQLite file,
    or the tables of an empty database), else None.
    """
    if at_head(engine):
        return None
    from alembic import command  # ~0.1 s of imports, paid only to upgrade

    cfg = alembic_config()
    try:
        with migration_connection(engine) as connection:
            new = not inspect(connection).has_table("alembic_version")
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None
    if not new:
        return None
    if engine.dialect.name == "sqlite" and engine.url.database:
        return f"created state database {engine.url.database}"
    return f"created the state database's tables in {shown_url(engine)}"


@contextlib.contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction, to run Alembic on (SQLite: foreign keys off)."""
    with engine.connect() as connection, _foreign_keys_off(connection), connection.begin():
        yield connection


@contextlib.contextmanager
def _foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite's batch migrations copy a table, drop it and rename the copy; with foreign
    keys enforced, dropping a table other rows refer to fails. Alembic's advice: turn
    enforcement off around the migration (the pragma is a no-op inside a transaction,
    so this runs before it begins; pysqlite starts none for a PRAGMA)."""
    if connection.dialect.name != "sqlite":
        yield
        return
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.commit()  # SQLAlchemy's own bookkeeping; SQLite began nothing
    try:
        yield
    finally:
        connection.rollback()  # a failed upgrade left its transaction to undo
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()


def database_error(
    which: str, engine: Engine, exc: BaseException, context: str = ""
) -> DatabaseError:
    """One secret-free line saying where (`context`) and why, then which database.

    The cause comes first and the URL (as the user wrote it) last, so that a display
    that cuts the line short loses the URL, not the cause.
    """
    url = engine.url.render_as_string(hide_password=False)
    redact = Redactor(database_urls=(url, _WRITTEN.get(engine) or url))
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = redact(reason[0]) if reason else type(exc).__name__
    hint = next((h for w, needle, h in _HINTS if needle in first.lower() and w in ("", which)), "")
    return DatabaseError(f"{context}{first}{hint} ({which} database {shown_url(engine)})")


# Fixes for the reasons people meet most; the full list is in docs/troubleshooting.md.
_HINTS = (
    (
        "",
        "database is locked",
        "; another program holds a lock on the file: stop it or "
        "wait (add ?timeout=SECONDS to the URL to wait longer)",
    ),
    ("state", "readonly database", "; make the file and its directory writable"),
    ("source", "readonly database", "; source queries are read-only: the query must only read"),
    ("source", "unable to open database file", "; check the path: the file must exist"),
    ("state", "unable to open database file", "; check that the directory exists and is writable"),
    ("", "connection refused", "; is the server running, and are host and port right?"),
)


def source_query_error(
    engine: Engine, exc: BaseException, entry_label: str, query: str
) -> DatabaseError:
    """A source query that failed, as one line; one that tried to write says so.

    The source transaction is read-only (source_snapshot.py), so a write is refused by
    the database before it changes anything; the message names the entry and the fix
    instead of leaving the user with the database's own words alone.
    """
    if not tried_to_write(exc, query):
        return database_error("source", engine, exc, f"{entry_label}: query failed: ")
    url = engine.url.render_as_string(hide_password=False)
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    redact = Redactor(database_urls=(url, _WRITTEN.get(engine) or url))
    first = redact(reason[0]) if reason else type(exc).__name__
    return DatabaseError(
        f"{entry_label}: query tried to change the source, and source queries are "
        f"read-only: {first}; nothing was changed; make it a SELECT that writes nothing "
        "(no INSERT, UPDATE or DELETE, no data-modifying WITH, no function that writes) "
        f"(source database {shown_url(engine)})"
    )


# SQLSTATE 25006 read_only_sql_transaction (PostgreSQL: "cannot execute DELETE in a
# read-only transaction"), and what other databases say: SQLite "attempt to write a
# readonly database", MySQL/MariaDB 1792 "Cannot execute statement in a READ ONLY
# transaction". PostgreSQL's server-side cursors refuse a data-modifying WITH before the
# read-only check ("DECLARE CURSOR must not contain data-modifying statements in WITH"),
# and a bare DELETE ... RETURNING as a syntax error: the query's first word tells.
_WRITE_REFUSED = re.compile(
    r"read[- ]?only (sql )?transaction|readonly database"
    r"|data-modifying statement",
    re.IGNORECASE,
)
_WRITE_STATEMENT = re.compile(
    r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/|\()*"
    r"(insert|update|delete|merge|upsert|replace|truncate|create|drop|alter|grant|revoke"
    r"|copy|call|do|lock|refresh|vacuum|reindex|cluster|comment)\b",
    re.IGNORECASE | re.DOTALL,
)


def tried_to_write(exc: BaseException, query: str) -> bool:
    """Whether a failed source query was refused for trying to change the source."""
    orig = getattr(exc, "orig", None) or exc
    if getattr(orig, "sqlstate", None) == "25006":
        return True
    if getattr(orig, "sqlite_errorname", "SQLITE_READONLY") != "SQLITE_READONLY":
        # SQLITE_READONLY_RECOVERY, _CANTINIT, ...: the same words, but a WAL file that
        # cannot be read from a read-only directory, not a query that writes.
        return bool(_WRITE_STATEMENT.match(query))
    return bool(_WRITE_REFUSED.search(str(orig)) or _WRITE_STATEMENT.match(query))


# The fixes above, so that displays short of room can leave them out.
FIX_HINTS = tuple(hint for _, _, hint in _HINTS)
