"""The rules that turn a parsed TOML document into a `Config` (SPEC §3).

`Reader(where).config(raw, env)` checks every section and key, applies the environment
overrides, and raises `ConfigError` naming the file, the entry and the fix for the
first problem it finds. Nothing here touches a database or the network.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from reconciler.config import (
    DEFAULT_DATABASE_URL,
    MAX_CONCURRENCY,
    MAX_KEY_LENGTH,
    Config,
    Daemon,
    Destination,
    Entry,
    History,
    Safety,
    Schedule,
    is_loopback_host,
)
from reconciler.errors import ConfigError
from reconciler.keys import EXPLICIT_KEY, derive_key
from reconciler.redact import mask_webhook
from reconciler.secret import Secret

_TOP = (
    "database",
    "source",
    "destination",
    "schedule",
    "profile",
    "audiences",
    "traits",
    "daemon",
    "history",
    "safety",
    "accounts",
    "account_audiences",
    "account_traits",
)
_SECTIONS: dict[str, tuple[str, ...]] = {
    "database": ("url",),
    "source": ("url",),
    "destination": (
        "webhook_url",
        "requests_per_second",
        "max_concurrency",
        "timeout_seconds",
        "max_attempts",
        "custom_attributes",
        "retry_budget_seconds",
    ),
    "schedule": ("interval_minutes", "cron"),
    "profile": ("query", "send_changes"),
    "audiences": ("name", "key", "query"),
    "traits": ("name", "key", "query"),
    "accounts": ("query",),
    "account_audiences": ("name", "key", "query"),
    "account_traits": ("name", "key", "query"),
    "daemon": ("metrics_port", "metrics_host"),
    "history": ("keep_days",),
    "safety": ("max_exit_share", "min_members"),
}
# Keys people reach for to switch TLS verification off; it cannot be.
_TLS_KEYS = (
    "verify",
    "verify_tls",
    "verify_ssl",
    "tls_verify",
    "ssl_verify",
    "insecure",
    "skip_tls_verify",
    "ca_bundle",
    "tls",
    "ssl",
)


def _describe(value: Any) -> str:
    """A TOML value's kind for messages; never the text of a string (it may be a URL)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


class Reader:
    """Validates one parsed TOML document; `self.where` is the file for messages."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, entry: str, problem: str, fix: str = "") -> ConfigError:
        return ConfigError(self.where, entry, problem, fix)

    def table(
        self, raw: Mapping[str, Any], name: str, required: bool = False
    ) -> dict[str, Any] | None:
        """The section `[name]` checked for unknown keys; None when absent."""
        value = raw.get(name)
        if value is None:
            if required:
                raise self.fail(f"[{name}]", "section is missing", f"add a [{name}] section")
            return None
        if not isinstance(value, dict):
            raise self.fail(
                name,
                f"must be a section, got {_describe(value)}",
                f"write it as [{name}] with its keys on the lines below",
            )
        self.no_unknown(value, _SECTIONS[name], f"[{name}]")
        return value

    def no_unknown(self, table: Mapping[str, Any], allowed: tuple[str, ...], entry: str) -> None:
        for key in table:
            if key in allowed:
                continue
            if entry == "top level":
                problem = f"unknown section [{key}]"
            elif key.lower() in _TLS_KEYS:
                raise self.fail(
                    entry,
                    f'unknown key "{key}"',
                    "TLS certificate verification cannot be switched off; remove "
                    "it (a private CA can be trusted with SSL_CERT_FILE)",
                )
            else:
                problem = f'unknown key "{key}"'
            close = difflib.get_close_matches(key, allowed, n=1)
            home = [f"[{s}]" for s, keys in _SECTIONS.items() if key in keys and s != entry]
            if close:
                hint = f'did you mean "{close[0]}"?'
            elif home and entry != "top level":
                hint = f"it belongs in {' or '.join(home)}"
            else:
                hint = f"allowed: {', '.join(allowed)}"
            raise self.fail(entry, problem, hint)

    def typed(
        self,
        table: Mapping[str, Any],
        key: str,
        types: type | tuple[type, ...],
        entry: str,
        default: Any = None,
        type_name: str = "",
    ) -> Any:
        value = table.get(key, default)
        if value is None:
            return None
        # bool is an int in Python; a `true` where a number belongs is still a mistake.
        allowed = types if isinstance(types, tuple) else (types,)
        value_ok = isinstance(value, types) and (bool in allowed or not isinstance(value, bool))
        if not value_ok:
            wanted = type_name or getattr(types, "__name__", "value")
            example = {
                "a string": f'{key} = "..."',
                "true or false": f"{key} = true",
                "a whole number": f"{key} = 5",
                "a number": f"{key} = 1.5",
            }
            raise self.fail(
                f"{entry} {key}",
                f"must be {wanted}, got {_describe(value)}",
                f"write it like {example.get(wanted, wanted)}",
            )
        return value

    def number(
        self,
        table: Mapping[str, Any],
        key: str,
        entry: str,
        default: float,
        minimum: float,
        maximum: float | None = None,
        integer: bool = False,
    ) -> Any:
        types: tuple[type, ...] = (int,) if integer else (int, float)
        value = self.typed(
            table, key, types, entry, default, "a whole number" if integer else "a number"
        )
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
            raise self.fail(f"{entry} {key}", f"is {value}", f"use a value {bound}")
        return value

    def text(
        self,
        table: Mapping[str, Any],
        key: str,
        entry: str,
        env_name: str = "",
        env: Mapping[str, str] | None = None,
    ) -> tuple[str | None, str]:
        """A string setting, the environment variable winning; also says where it came from."""
        from_env = (env or {}).get(env_name, "").strip() if env_name else ""
        if from_env:
            return from_env, f"{env_name} (environment)"
        value = self.typed(table, key, str, entry, type_name="a string")
        return (value.strip() if value is not None else None), f"{entry} {key}"

    def database_url(
        self,
        table: Mapping[str, Any],
        entry: str,
        env_name: str,
        env: Mapping[str, str],
        default: str | None = None,
    ) -> str:
        url, origin = self.text(table, "url", entry, env_name, env)
        # A relative SQLite path in the file is relative to the file (so a daemon
        # started from anywhere finds the same state); in the environment, to the
        # working directory (SPEC §3).
        base = Path.cwd() if origin.endswith("(environment)") else Path(self.where).parent
        if not url:
            if default is not None:
                return resolve_sqlite_path(default, base)
            raise self.fail(
                origin,
                "is missing",
                f'set url = "sqlite:///file.db" in {entry} or the {env_name} variable',
            )
        example = 'write it like "sqlite:///file.db" or "postgresql://user@host/db"'
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            raise self.fail(origin, "is not a database URL", example) from None
        _check_driver(parsed, self.fail, origin)
        if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
            raise self.fail(
                origin,
                "is an in-memory SQLite database, which keeps nothing",
                'give a file path: "sqlite:///file.db"',
            )
        return resolve_sqlite_path(url, base)

    def config(self, raw: dict[str, Any], env: Mapping[str, str]) -> Config:
        self.no_unknown(raw, _TOP, "top level")
        database_url = self.database_url(
            self.table(raw, "database") or {},
            "[database]",
            "RECONCILER_DATABASE_URL",
            env,
            DEFAULT_DATABASE_URL,
        )
        source_url = self.database_url(
            self.table(raw, "source") or {}, "[source]", "RECONCILER_SOURCE_URL", env
        )
        entries = self.entries(raw)
        profile = self.table(raw, "profile")
        profile_query = self.query(profile, "[profile]") if profile is not None else None
        send_changes = bool(
            self.typed(profile or {}, "send_changes", bool, "[profile]", False, "true or false")
        )
        accounts = self.table(raw, "accounts")
        accounts_query = (
            self.query(accounts, "[accounts]", "group_id, user_id")
            if accounts is not None
            else None
        )
        account_entry = next((e for e in entries if e.entity == "customer"), None)
        if account_entry is not None and accounts_query is None:
            raise self.fail(
                _section_label(account_entry),
                "needs an [accounts] section (the account fields and the user "
                "each account is sent for)",
                'add [accounts] with query = "SELECT group_id, user_id, name FROM ..."',
            )
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
            safety=self.safety(raw),
            accounts_query=accounts_query,
            profile_send_changes=send_changes,
        )

    def destination(self, raw: Mapping[str, Any], env: Mapping[str, str]) -> Destination:
        entry = "[destination]"
        from_env = bool(env.get("CHARTMOGUL_WEBHOOK_URL", "").strip())
        table = self.table(raw, "destination", required=not from_env) or {}
        url, origin = self.text(table, "webhook_url", entry, "CHARTMOGUL_WEBHOOK_URL", env)
        if not url:
            raise self.fail(
                f"{entry} webhook_url",
                "is missing",
                "set webhook_url or the CHARTMOGUL_WEBHOOK_URL variable",
            )
        check_webhook_url(url, self.where, origin)
        defaults = Destination(webhook_url=Secret(url))
        return Destination(
            webhook_url=Secret(url),
            requests_per_second=float(
                self.number(table, "requests_per_second", entry, defaults.requests_per_second, 0)
            ),
            max_concurrency=self.number(
                table, "max_concurrency", entry, defaults.max_concurrency, 1, MAX_CONCURRENCY, True
            ),
            timeout_seconds=float(
                self.number(table, "timeout_seconds", entry, defaults.timeout_seconds, 0.001)
            ),
            max_attempts=self.number(
                table, "max_attempts", entry, defaults.max_attempts, 1, integer=True
            ),
            custom_attributes=self.typed(
                table, "custom_attributes", bool, entry, True, "true or false"
            ),
            retry_budget_seconds=float(
                self.number(table, "retry_budget_seconds", entry, defaults.retry_budget_seconds, 0)
            ),
        )

    def query(self, table: Mapping[str, Any], entry: str, columns: str = "user_id") -> str:
        query = self.typed(table, "query", str, entry, type_name="a string")
        if query is None or not query.strip():
            raise self.fail(entry, "has no query", f'add query = "SELECT {columns} ..."')
        return str(query)

    def entries(self, raw: Mapping[str, Any]) -> tuple[Entry, ...]:
        found: list[Entry] = []
        for section, kind, entity in _ENTRY_SECTIONS:
            tables = raw.get(section, [])
            if not isinstance(tables, list):
                raise self.fail(
                    section,
                    f"must be an array of tables, got {_describe(tables)}",
                    f"write each one under its own [[{section}]] line",
                )
            for index, table in enumerate(tables, 1):
                label = f"[[{section}]] #{index}"
                if not isinstance(table, dict):
                    raise self.fail(
                        label,
                        f"must be a table, got {_describe(table)}",
                        f"write each one under its own [[{section}]] line",
                    )
                self.no_unknown(table, _SECTIONS[section], label)
                name = self.typed(table, "name", str, label, type_name="a string")
                if not name or not name.strip():
                    raise self.fail(label, "has no name", 'add name = "..."')
                label = f'[[{section}]] "{name}"'
                query = self.query(table, label, "group_id" if entity == "customer" else "user_id")
                key = self.typed(table, "key", str, label, type_name="a string")
                if key is not None:
                    if not EXPLICIT_KEY.match(key):
                        raise self.fail(
                            f"{label} key", f'"{key}" is not a valid key', "use only a-z, 0-9 and _"
                        )
                else:
                    key = derive_key(name)
                    if not key:
                        raise self.fail(
                            label,
                            "name yields an empty key",
                            'give it letters or digits, or set key = "..."',
                        )
                if len(key) > MAX_KEY_LENGTH:
                    raise self.fail(
                        label,
                        f"key is {len(key)} characters long",
                        f'use a shorter name or set key = "..." (at most {MAX_KEY_LENGTH})',
                    )
                found.append(
                    Entry(
                        kind=kind,  # type: ignore[arg-type]
                        name=name,
                        key=key,
                        query=query,
                        entity=entity,  # type: ignore[arg-type]
                    )
                )
        by_key: dict[str, Entry] = {}
        for entry in found:
            other = by_key.get(entry.key)
            if other is not None:
                raise self.fail(
                    f"{other.label} and {entry.label}",
                    f'both produce the key "{entry.key}"',
                    'rename one or give it an explicit key = "..."',
                )
            by_key[entry.key] = entry
        return tuple(found)

    def schedule(self, raw: Mapping[str, Any]) -> Schedule | None:
        table = self.table(raw, "schedule")
        if table is None:
            return None
        entry = "[schedule]"
        interval = table.get("interval_minutes")
        cron = self.typed(table, "cron", str, entry, type_name="a string")
        if interval is not None and cron is not None:
            raise self.fail(entry, "has both interval_minutes and cron", "keep exactly one")
        if interval is None and cron is None:
            raise self.fail(
                entry,
                "has neither interval_minutes nor cron",
                'add interval_minutes = 120 or cron = "0 */2 * * *"',
            )
        if interval is not None:
            interval = self.number(table, "interval_minutes", entry, 0, 0.001)
        if cron is not None:
            check_cron(cron, self.where)
        return Schedule(interval_minutes=interval, cron=cron)

    def daemon(self, raw: Mapping[str, Any]) -> Daemon:
        table = self.table(raw, "daemon") or {}
        entry = "[daemon]"
        port = None
        if "metrics_port" in table:
            port = self.number(table, "metrics_port", entry, 0, 1, 65535, integer=True)
        host = self.typed(table, "metrics_host", str, entry, "127.0.0.1", "a string")
        return Daemon(metrics_port=port, metrics_host=host)

    def history(self, raw: Mapping[str, Any]) -> History:
        table = self.table(raw, "history") or {}
        return History(keep_days=self.number(table, "keep_days", "[history]", 90, 1, integer=True))

    def safety(self, raw: Mapping[str, Any]) -> Safety:
        table = self.table(raw, "safety") or {}
        entry, defaults = "[safety]", Safety()
        share = table.get("max_exit_share", defaults.max_exit_share)
        if isinstance(share, bool) or not isinstance(share, int | float):
            raise self.fail(
                f"{entry} max_exit_share",
                f"must be a number, got {_describe(share)}",
                "write it like max_exit_share = 0.5",
            )
        # The lower bound is exclusive, which `number` cannot say.
        if not math.isfinite(share) or not 0 < share <= 1:
            raise self.fail(
                f"{entry} max_exit_share",
                f"is {share}",
                "use a share above 0 and at most 1, e.g. 0.5 (a run halts when "
                "an audience would lose more than that share; 1 turns the guard "
                "off)",
            )
        members = self.number(table, "min_members", entry, defaults.min_members, 1, integer=True)
        return Safety(max_exit_share=float(share), min_members=members)


def resolve_sqlite_path(url: str, base: Path) -> str:
    """`url` with a relative SQLite file path made absolute against `base`.

    Other URLs, absolute paths and SQLite URI filenames (`file:...`, `?uri=true`) are
    returned as they are.
    """
    parsed = make_url(url)
    path = parsed.database
    if (
        parsed.get_backend_name() != "sqlite"
        or not path
        or path == ":memory:"
        or path.startswith("file:")
        or parsed.query.get("uri") == "true"
        or os.path.isabs(path)
    ):
        return url
    absolute = os.path.abspath(os.path.join(base, path))
    return parsed.set(database=absolute).render_as_string(hide_password=False)


_ENTRY_SECTIONS = (
    ("audiences", "audience", "contact"),
    ("traits", "trait", "contact"),
    ("account_audiences", "audience", "customer"),
    ("account_traits", "trait", "customer"),
)


def _section_label(entry: Entry) -> str:
    """`[[account_traits]] "Seats"`: the entry as the config file writes it."""
    section = next(
        s for s, kind, entity in _ENTRY_SECTIONS if kind == entry.kind and entity == entry.entity
    )
    return f'[[{section}]] "{entry.name}"'


def _check_driver(url: URL, fail: Any, origin: str) -> None:
    """The URL's dialect and driver are installed (psycopg is, as `postgresql://`)."""
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise fail(
            origin,
            f'names an unknown database kind "{url.drivername}"',
            'use "sqlite:///file.db" or "postgresql://user@host/db"',
        ) from None
    except ImportError as exc:
        raise fail(
            origin,
            f'needs the driver module "{exc.name}", which is not installed',
            "install that database's SQLAlchemy driver next to reconciler, or use a "
            "postgresql:// or sqlite:// URL",
        ) from None


def check_webhook_url(url: str, where: str, entry: str = "[destination] webhook_url") -> None:
    """https only; http solely for loopback hosts. Messages never show the URL's path."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(
            where,
            entry,
            "is not a valid URL",
            "paste the webhook URL from ChartMogul (https://...)",
        ) from None
    if any(c.isspace() for c in url):
        raise ConfigError(
            where, entry, "contains spaces", "paste the webhook URL from ChartMogul without spaces"
        )
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(
            where,
            entry,
            f"{mask_webhook(url)} is not an https URL",
            "paste the webhook URL from ChartMogul (https://...)",
        )
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ConfigError(
            where,
            entry,
            f"{mask_webhook(url)} uses http",
            "use https; http is allowed only for localhost, 127.0.0.0/8 and ::1",
        )


def check_cron(expression: str, where: str) -> None:
    """Validate a five-field cron expression by building the trigger the daemon runs."""
    from datetime import UTC

    from reconciler.ops.crontab import cron_trigger

    try:
        cron_trigger(expression, UTC)
    except ValueError as exc:
        raise ConfigError(
            where,
            "[schedule] cron",
            f'"{expression}" is invalid ({exc})',
            'use five fields (minute hour day month weekday), e.g. "0 */2 * * *"',
        ) from None
