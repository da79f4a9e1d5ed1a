"""`reconciler check`: everything a sync needs, tried without syncing (SPEC §4).

    check_config(path, env)   the config, loaded and validated: (Config or None, Check)
    run_checks(config)        the state database, the source database, every query and
                              the webhook, one Check each, in that order

Nothing is written but the migration every command does first. Each query runs as
`SELECT * FROM (<query>) AS q LIMIT 5`, read-only, and its rows go through the same
column and value checks a run applies. The webhook gets one POST of `{}`, as the
Segment action's own connection test sends. Messages are secret-free: the webhook is
shown as `https://host/***`, database URLs without their password.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from reconciler.config import ACCOUNT_FIELDS, PROFILE_FIELDS, Config, is_loopback_host, load_config
from reconciler.errors import ConfigError, DatabaseError, SourceEntryError
from reconciler.pipeline.fields import account_fields
from reconciler.pipeline.source import ReadStats, profile_fields, read_rows, trait_json
from reconciler.redact import mask_webhook
from reconciler.state.causes import cause_of
from reconciler.state.db import (
    HEAD_REVISION,
    database_error,
    migrate,
    shown_url,
    source_engine,
    state_engine,
)

SAMPLE_ROWS = 5
_COLUMNS = {
    ("contact", "audience"): ("user_id",),
    ("contact", "trait"): ("user_id", "value"),
    ("customer", "audience"): ("group_id",),
    ("customer", "trait"): ("group_id", "value"),
}


@dataclass(frozen=True)
class Check:
    """One line of `reconciler check`: `message` starts with `ok` when `ok`, else says
    what is wrong and the fix."""

    name: str
    ok: bool
    message: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    created: str | None = None  # where the state database was created, if it was now

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def check_config(path: Path, env: Mapping[str, str] = os.environ) -> tuple[Config | None, Check]:
    """The config at `path`, and the check line saying whether it is valid."""
    try:
        config = load_config(path, env)
    except ConfigError as exc:
        return None, Check("config", False, str(exc))
    kinds = [_count(len(config.audiences), "audience"), _count(len(config.traits), "trait")]
    if config.profile_query:
        kinds.append("a profile query")
    return config, Check("config", True, f"ok ({path}: {', '.join(kinds)})")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def run_checks(config: Config, transport: httpx.BaseTransport | None = None) -> Report:
    """Every check after the config's; never raises for what it checks."""
    redact = config.redact
    report = Report()
    report.checks.append(_state(config, report))
    report.checks.extend(_source(config))
    report.checks.append(_webhook(config, transport))
    report.checks = [Check(c.name, c.ok, redact(c.message)) for c in report.checks]
    return report


def _state(config: Config, report: Report) -> Check:
    engine = state_engine(config.database_url)
    try:
        report.created = migrate(engine)
        with engine.connect() as conn:
            revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    except DatabaseError as exc:
        return Check("state database", False, str(exc))
    except SQLAlchemyError as exc:
        return Check("state database", False, str(database_error("state", engine, exc)))
    finally:
        engine.dispose()
    created = "; created now" if report.created else ""
    if revision != HEAD_REVISION:
        return Check(
            "state database",
            False,
            f"schema at revision {revision}, not {HEAD_REVISION}; upgrade reconciler "
            "(this database was migrated by a newer version)",
        )
    return Check("state database", True, f"ok ({shown_url(engine)}, schema {revision}{created})")


def _source(config: Config) -> list[Check]:
    """The source database, then each query on it."""
    queries: list[tuple[str, str, Callable[[Connection, str, str], str]]] = [
        (entry.label, entry.query, _entry_checker(entry.entity, entry.kind))
        for entry in config.entries
    ]
    if config.profile_query:
        queries.append(("[profile]", config.profile_query, _profile_sample))
    if config.accounts_query:
        queries.append(("[accounts]", config.accounts_query, _accounts_sample))
    engine = source_engine(config.source_url)
    try:
        conn = engine.connect()
    except SQLAlchemyError as exc:
        problem = str(database_error("source", engine, exc))
        engine.dispose()
        return [
            Check("source database", False, problem),
            *(
                Check(label, False, "not run: the source database cannot be opened")
                for label, _, _ in queries
            ),
        ]
    checks = [Check("source database", True, f"ok ({shown_url(engine)}, read-only)")]
    with conn:
        for label, query, sample in queries:
            checks.append(_query(conn, engine, label, query, sample))
    engine.dispose()
    return checks


def _query(
    conn: Connection,
    engine: Engine,
    label: str,
    query: str,
    sample: Callable[[Connection, str, str], str],
) -> Check:
    # The newline ends a trailing `--` comment; a trailing `;` cannot sit in a subquery.
    wrapped = f"SELECT * FROM ({query.strip().rstrip(';').rstrip()}\n) AS q LIMIT {SAMPLE_ROWS}"
    try:
        try:
            return Check(label, True, f"ok ({_read_only(conn, sample, label, wrapped)})")
        except DatabaseError:
            # The wrapping itself may be what failed (a `;` before a comment, a clause
            # the database refuses in a subquery); the query as written says, and runs
            # only until its first rows are read.
            conn.rollback()
            return Check(label, True, f"ok ({_read_only(conn, sample, label, query)})")
    except SourceEntryError as exc:
        return Check(label, False, exc.problem)
    except DatabaseError as exc:
        return Check(label, False, str(exc).removeprefix(f"{label}: "))
    except SQLAlchemyError as exc:
        return Check(label, False, str(database_error("source", engine, exc)))
    finally:
        conn.rollback()  # nothing to keep; and on PostgreSQL a failed query ends it


def _read_only(
    conn: Connection, sample: Callable[[Connection, str, str], str], label: str, query: str
) -> str:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    return sample(conn, label, query)


def _entry_checker(entity: str, kind: str) -> Callable[[Connection, str, str], str]:
    columns = _COLUMNS.get((entity, kind))

    def sample(conn: Connection, label: str, query: str) -> str:
        if columns is None:
            return f"not checked: no rule for {kind} queries"
        rows, stats = _rows(conn, label, query, columns)
        if kind == "trait":
            for user_id, value in rows:
                trait_json(label, user_id, value)
        return _described(rows, stats)

    return sample


def _profile_sample(conn: Connection, label: str, query: str) -> str:
    rows, stats = _rows(conn, label, query, ("user_id",), PROFILE_FIELDS)
    for user_id, *values in rows:
        profile_fields(user_id, stats.columns[1:], values)
    return _described(rows, stats)


def _accounts_sample(conn: Connection, label: str, query: str) -> str:
    rows, stats = _rows(conn, label, query, ("group_id", "user_id"), ACCOUNT_FIELDS)
    for group_id, _user_id, *values in rows:
        account_fields(group_id, stats.columns[2:], values)
    return _described(rows, stats)


def _rows(
    conn: Connection,
    label: str,
    query: str,
    columns: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> tuple[list[Any], ReadStats]:
    """The first rows, read as a run reads them, and what reading them found."""
    stats = ReadStats(columns=columns)
    chunks = read_rows(conn, label, query, columns, optional, stats)
    try:
        rows = next(chunks, [])[:SAMPLE_ROWS]
    finally:
        if isinstance(chunks, Generator):
            chunks.close()  # a query not wrapped in a LIMIT is read no further
    return rows, stats


def _described(rows: list[Any], stats: ReadStats) -> str:
    read = _count(len(rows), "sample row") if rows else "the query returns no rows"
    if stats.ignored:
        read += f" and {stats.ignored} without a {stats.columns[0]} (ignored)"
    return f"{read}; columns {', '.join(stats.columns)}"


def _user_agent() -> str:
    try:
        return f"reconciler/{version('reconciler')}"
    except PackageNotFoundError:
        return "reconciler"


def _webhook(config: Config, transport: httpx.BaseTransport | None) -> Check:
    """One POST of `{}`, the Segment action's connection test."""
    destination = config.destination
    shown = mask_webhook(destination.webhook_url)
    redact = config.redact
    try:
        with httpx.Client(
            timeout=httpx.Timeout(destination.timeout_seconds),
            transport=transport,
            headers={"User-Agent": _user_agent()},
        ) as client:
            response, hops = _post_following(client, destination.webhook_url.reveal())
    except _RefusedRedirect as exc:
        # Masked URLs end the message: the redactor takes punctuation after one for path.
        return Check(
            "webhook",
            False,
            f"{shown} redirects to a URL that is neither https nor on a loopback "
            "host; paste the webhook URL from ChartMogul again; it redirects to "
            f"{mask_webhook(str(exc))}",
        )
    except httpx.RequestError as exc:
        cause = cause_of(None, "error", redact(f"{type(exc).__name__}: {exc}"))
        return Check(
            "webhook",
            False,
            f"{shown} did not answer: {cause}; check the host name, your network "
            "and any proxy or firewall between here and ChartMogul",
        )
    status = response.status_code
    if 200 <= status < 300:
        via = f" after {hops} redirect{'s' * (hops > 1)}" if hops else ""
        return Check("webhook", True, f"ok ({shown} answered {status} to a POST of {{}}{via})")
    answer = cause_of(status, "rejected", redact(response.text[:500]))
    if 300 <= status < 400:
        location = response.headers.get("Location")
        where = f"; it redirects to {mask_webhook(location)}" if location else ""
        fix = f"paste the webhook URL from ChartMogul again{where}"
    elif status in (401, 403, 404, 410):
        fix = (
            "ChartMogul does not accept this URL; paste the webhook URL from ChartMogul "
            "again (the source may have been deleted or the URL mistyped)"
        )
    elif status in (408, 423, 429) or status >= 500:
        fix = "ChartMogul is busy or failing; try again in a few minutes"
    else:
        fix = "check the webhook URL (it must be ChartMogul's Send Contact webhook)"
    return Check("webhook", False, f"{shown} answered {answer}; {fix}")


MAX_REDIRECTS = 3


class _RefusedRedirect(Exception):
    """A 307/308 pointed at a URL the sender would not follow (the URL is the message)."""


def _post_following(client: httpx.Client, url: str) -> tuple[httpx.Response, int]:
    """POST `{}`, following 307/308 (same method and body) as the sender does (SPEC §5):
    at most 3 hops, to https or loopback http only."""
    hops = 0
    while True:
        response = client.post(url, json={})
        location = response.headers.get("Location")
        if response.status_code not in (307, 308) or not location or hops == MAX_REDIRECTS:
            return response, hops
        target = response.url.join(location)
        if not (
            target.scheme == "https" or (target.scheme == "http" and is_loopback_host(target.host))
        ):
            raise _RefusedRedirect(str(target))
        url, hops = str(target), hops + 1
