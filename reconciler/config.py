"""Configuration: read once from TOML (SPEC §3), validated into frozen values.

`load_config` is the only way in. Every problem raises `ConfigError` naming the file,
the entry and the fix, before anything runs or is written.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError
from .keys import EXPLICIT_KEY, derive_key

PROFILE_FIELDS = (
    "anonymous_id", "email", "first_name", "last_name", "name", "title", "phone",
    "linked_in", "twitter", "company_id", "company_name",
)
MAX_CONCURRENCY = 20  # ChartMogul answers 503 above 20 parallel connections.

Kind = Literal["audience", "trait"]


@dataclass(frozen=True)
class Entry:
    """One `[[audiences]]` or `[[traits]]` table."""

    kind: Kind
    name: str
    key: str
    query: str

    @property
    def label(self) -> str:
        """How messages name the entry: `audience "High Value Users"`."""
        return f'{self.kind} "{self.name}"'


@dataclass(frozen=True)
class Destination:
    webhook_url: str
    requests_per_second: float = 20.0
    max_concurrency: int = 8
    timeout_seconds: float = 10.0
    max_attempts: int = 6
    custom_attributes: bool = True
    # Total time one run may spend waiting between retries; past it, updates stay pending.
    retry_budget_seconds: float = 300.0


@dataclass(frozen=True)
class Schedule:
    interval_minutes: float | None = None
    cron: str | None = None


@dataclass(frozen=True)
class Daemon:
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


@dataclass(frozen=True)
class History:
    keep_days: int = 90


@dataclass(frozen=True)
class Config:
    path: str
    database_url: str
    source_url: str
    destination: Destination
    entries: tuple[Entry, ...]
    profile_query: str | None = None
    schedule: Schedule | None = None
    daemon: Daemon = field(default_factory=Daemon)
    history: History = field(default_factory=History)

    @property
    def audiences(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == "audience")

    @property
    def traits(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == "trait")

    def entry_for_key(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)


def config_path(option: str | None, env: Mapping[str, str] = os.environ) -> Path:
    """`--config`, else `$RECONCILER_CONFIG`, else `./reconciler.toml`."""
    return Path(option or env.get("RECONCILER_CONFIG") or "reconciler.toml")


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Read, validate and return the configuration at `path` (env overrides applied)."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(where, "file", "not found",
                          "pass --config PATH or set RECONCILER_CONFIG") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(where, "file", f"cannot be read ({exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, "TOML syntax", str(exc), "fix the syntax at that line") from None
    return _Reader(where).config(raw, env)


_TOP = ("database", "source", "destination", "schedule", "profile", "audiences", "traits",
        "daemon", "history")


class _Reader:
    """Validates one parsed TOML document; `self.where` is the file for messages."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, entry: str, problem: str, fix: str = "") -> ConfigError:
        return ConfigError(self.where, entry, problem, fix)

    def table(self, raw: Mapping[str, Any], name: str, allowed: tuple[str, ...],
              required: bool = False) -> dict[str, Any]:
        value = raw.get(name)
        if value is None:
            if required:
                raise self.fail(f"[{name}]", "section is missing", f"add a [{name}] section")
            return {}
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table", f"write it as [{name}]")
        self.no_unknown(value, allowed, f"[{name}]")
        return value

    def no_unknown(self, table: Mapping[str, Any], allowed: tuple[str, ...], entry: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f'did you mean "{close[0]}"?' if close else f"allowed: {', '.join(allowed)}"
                raise self.fail(entry, f'unknown key "{key}"', hint)

    def typed(self, table: Mapping[str, Any], key: str, types: type | tuple[type, ...],
              entry: str, default: Any = None, type_name: str = "") -> Any:
        value = table.get(key, default)
        if value is None:
            return None
        # bool is an int in Python; a `true` where a number belongs is still a mistake.
        allowed = types if isinstance(types, tuple) else (types,)
        value_ok = isinstance(value, types) and (bool in allowed or not isinstance(value, bool))
        if not value_ok:
            wanted = type_name or getattr(types, "__name__", "value")
            raise self.fail(f"{entry} {key}", f"must be {wanted}, got {value!r}")
        return value

    def number(self, table: Mapping[str, Any], key: str, entry: str, default: float,
               minimum: float, maximum: float | None = None, integer: bool = False) -> Any:
        types: tuple[type, ...] = (int,) if integer else (int, float)
        value = self.typed(table, key, types, entry, default,
                           "a whole number" if integer else "a number")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.fail(f"{entry} {key}", f"is {value}", f"use a value {bound}")
        return value

    def database_url(self, url: Any, entry: str, env_name: str) -> str:
        if not isinstance(url, str) or not url:
            raise self.fail(f"{entry} url", "is missing",
                            f'set url = "sqlite:///file.db" or the {env_name} variable')
        try:
            make_url(url)
        except ArgumentError:
            raise self.fail(f"{entry} url", "is not a database URL",
                            'write it like "sqlite:///file.db" or '
                            '"postgresql+psycopg://user@host/db"') from None
        return url

    def config(self, raw: dict[str, Any], env: Mapping[str, str]) -> Config:
        self.no_unknown(raw, _TOP, "top level")
        database = self.table(raw, "database", ("url",))
        source = self.table(raw, "source", ("url",))
        database_url = self.database_url(
            env.get("RECONCILER_DATABASE_URL") or database.get("url"), "[database]",
            "RECONCILER_DATABASE_URL")
        source_url = self.database_url(
            env.get("RECONCILER_SOURCE_URL") or source.get("url"), "[source]",
            "RECONCILER_SOURCE_URL")
        entries = self.entries(raw)
        profile = self.table(raw, "profile", ("query",))
        profile_query = None
        if profile:
            profile_query = self.query(profile, "[profile]")
        return Config(
            path=self.where,
            database_url=database_url,
            source_url=source_url,
            destination=self.destination(raw, env),
            entries=entries,
            profile_query=profile_query,
            schedule=self.schedule(raw),
            daemon=self.daemon(raw),
            history=self.history(raw),
        )

    def destination(self, raw: Mapping[str, Any], env: Mapping[str, str]) -> Destination:
        allowed = ("webhook_url", "requests_per_second", "max_concurrency", "timeout_seconds",
                   "max_attempts", "custom_attributes", "retry_budget_seconds")
        table = self.table(raw, "destination", allowed, required=True)
        entry = "[destination]"
        url = env.get("CHARTMOGUL_WEBHOOK_URL") or self.typed(
            table, "webhook_url", str, entry, type_name="a string")
        if not url:
            raise self.fail(f"{entry} webhook_url", "is missing",
                            "set webhook_url or the CHARTMOGUL_WEBHOOK_URL variable")
        check_webhook_url(url, self.where)
        defaults = Destination(webhook_url=url)
        return Destination(
            webhook_url=url,
            requests_per_second=float(self.number(
                table, "requests_per_second", entry, defaults.requests_per_second, 0)),
            max_concurrency=self.number(table, "max_concurrency", entry,
                                        defaults.max_concurrency, 1, MAX_CONCURRENCY, True),
            timeout_seconds=float(self.number(table, "timeout_seconds", entry,
                                              defaults.timeout_seconds, 0.001)),
            max_attempts=self.number(table, "max_attempts", entry, defaults.max_attempts, 1,
                                     integer=True),
            custom_attributes=self.typed(table, "custom_attributes", bool, entry, True,
                                         "true or false"),
            retry_budget_seconds=float(self.number(table, "retry_budget_seconds", entry,
                                                   defaults.retry_budget_seconds, 0)),
        )

    def query(self, table: Mapping[str, Any], entry: str) -> str:
        query = table.get("query")
        if not isinstance(query, str) or not query.strip():
            raise self.fail(entry, "has no query", 'add query = "SELECT user_id ..."')
        return query

    def entries(self, raw: Mapping[str, Any]) -> tuple[Entry, ...]:
        found: list[Entry] = []
        for section, kind in (("audiences", "audience"), ("traits", "trait")):
            tables = raw.get(section, [])
            if not isinstance(tables, list):
                raise self.fail(section, "must be an array of tables", f"write [[{section}]]")
            for index, table in enumerate(tables, 1):
                label = f"[[{section}]] #{index}"
                if not isinstance(table, dict):
                    raise self.fail(label, "must be a table", f"write [[{section}]]")
                self.no_unknown(table, ("name", "key", "query"), label)
                name = self.typed(table, "name", str, label, type_name="a string")
                if not name or not name.strip():
                    raise self.fail(label, "has no name", 'add name = "..."')
                label = f'[[{section}]] "{name}"'
                query = self.query(table, label)
                key = self.typed(table, "key", str, label, type_name="a string")
                if key is not None:
                    if not EXPLICIT_KEY.match(key):
                        raise self.fail(f"{label} key", f'"{key}" is not a valid key',
                                        "use only a-z, 0-9 and _")
                else:
                    key = derive_key(name)
                    if not key:
                        raise self.fail(label, "name yields an empty key",
                                        'give it letters or digits, or set key = "..."')
                found.append(Entry(kind=kind, name=name, key=key,  # type: ignore[arg-type]
                                   query=query))
        by_key: dict[str, Entry] = {}
        for entry in found:
            other = by_key.get(entry.key)
            if other is not None:
                raise self.fail(f"{other.label} and {entry.label}",
                                f'both produce the key "{entry.key}"',
                                'rename one or give it an explicit key = "..."')
            by_key[entry.key] = entry
        return tuple(found)

    def schedule(self, raw: Mapping[str, Any]) -> Schedule | None:
        table = self.table(raw, "schedule", ("interval_minutes", "cron"))
        if not table:
            return None
        entry = "[schedule]"
        interval = table.get("interval_minutes")
        cron = self.typed(table, "cron", str, entry, type_name="a string")
        if interval is not None and cron is not None:
            raise self.fail(entry, "has both interval_minutes and cron", "keep exactly one")
        if interval is not None:
            interval = self.number(table, "interval_minutes", entry, 0, 0.001)
        if cron is not None:
            check_cron(cron, self.where)
        return Schedule(interval_minutes=interval, cron=cron)

    def daemon(self, raw: Mapping[str, Any]) -> Daemon:
        table = self.table(raw, "daemon", ("metrics_port", "metrics_host"))
        entry = "[daemon]"
        port = None
        if "metrics_port" in table:
            port = self.number(table, "metrics_port", entry, 0, 1, 65535, integer=True)
        host = self.typed(table, "metrics_host", str, entry, "127.0.0.1", "a string")
        return Daemon(metrics_port=port, metrics_host=host)

    def history(self, raw: Mapping[str, Any]) -> History:
        table = self.table(raw, "history", ("keep_days",))
        return History(keep_days=self.number(table, "keep_days", "[history]", 90, 1,
                                             integer=True))


def is_loopback_host(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 and ::1 (SPEC §3)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_webhook_url(url: str, where: str) -> None:
    """https only; http solely for loopback hosts. Messages never show the URL's path."""
    from .redact import mask_webhook

    entry = "[destination] webhook_url"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(where, entry, "is not a valid URL", "use https://host/path") from None
    if not host or parts.scheme not in ("https", "http"):
        raise ConfigError(where, entry, f"{mask_webhook(url)} is not an https URL",
                          "paste the webhook URL from ChartMogul (https://...)")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ConfigError(where, entry, f"{mask_webhook(url)} uses http",
                          "use https; http is allowed only for localhost/127.0.0.1/::1")


def check_cron(expression: str, where: str) -> None:
    """Validate a five-field cron expression with APScheduler's own parser."""
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expression, timezone="UTC")
    except ValueError as exc:
        raise ConfigError(where, "[schedule] cron", f'"{expression}" is invalid ({exc})',
                          'use five fields, e.g. "0 */2 * * *"') from None
