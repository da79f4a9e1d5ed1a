"""Engines for the state and source databases, and migrations run from code."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

from .errors import DatabaseError
from .redact import Redactor, mask_database_url


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
    path = parsed.database
    if (engine.dialect.name == "sqlite" and path and path != ":memory:"
            and not path.startswith("file:") and parsed.query.get("uri") != "true"):
        event.listen(engine, "do_connect", _sqlite_read_only)
    return engine


def _sqlite_read_only(_dialect: Any, _record: Any, cargs: list[Any],
                      cparams: dict[str, Any]) -> None:
    # Done at connect time so that engine.url, which messages show, stays the user's.
    cargs[0] = f"file:{quote(str(cargs[0]))}?mode=ro"
    cparams["uri"] = True


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
            "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


# The newest migration's revision; a test checks it against migrations/.
HEAD_REVISION = "0005"


def at_head(engine: Engine) -> bool:
    """Whether the state database is already at HEAD_REVISION (no Alembic needed)."""
    try:
        with engine.connect() as connection:
            versions = connection.exec_driver_sql(
                "SELECT version_num FROM alembic_version").scalars().all()
    except SQLAlchemyError:
        return False  # no such table yet, or unreachable: let the upgrade say which
    return versions == [HEAD_REVISION]


def migrate(engine: Engine) -> None:
    """Bring the state database to the newest schema.

    Every command calls this first, so the common case, a database already at the
    newest revision, is one query; Alembic is loaded only to upgrade.
    """
    if at_head(engine):
        return
    from alembic import command  # ~0.1 s of imports, paid only to upgrade

    cfg = alembic_config()
    try:
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None


def database_error(which: str, engine: Engine, exc: BaseException,
                   context: str = "") -> DatabaseError:
    """One secret-free line saying which database failed, where (`context`) and why."""
    url = engine.url.render_as_string(hide_password=False)
    redact = Redactor(database_urls=(url,))
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = redact(reason[0]) if reason else type(exc).__name__
    hint = next((h for w, needle, h in _HINTS if needle in first.lower() and w in ("", which)),
                "")
    return DatabaseError(
        f"{which} database {mask_database_url(url)}: {context}{first}{hint}")


# Fixes for the reasons people meet most; the full list is in docs/troubleshooting.md.
_HINTS = (
    ("", "database is locked", "; another program holds a lock on the file: stop it or "
                               "wait (add ?timeout=SECONDS to the URL to wait longer)"),
    ("", "readonly database", "; make the file and its directory writable"),
    ("source", "unable to open database file", "; check the path: the file must exist"),
    ("state", "unable to open database file", "; check that the directory exists and is "
                                              "writable"),
    ("", "connection refused", "; is the server running, and are host and port right?"),
)
