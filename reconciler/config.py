"""Configuration: read once from TOML (SPEC §3), validated into frozen values.

`load_config` is the only way in. Every problem raises `ConfigError` naming the file,
the entry and the fix, before anything runs or is written. The rules that judge each
section are config_reader.py's; this module holds the values they produce.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reconciler.errors import ConfigError
from reconciler.redact import Redactor
from reconciler.secret import Secret

PROFILE_FIELDS = (
    "anonymous_id",
    "email",
    "first_name",
    "last_name",
    "name",
    "title",
    "phone",
    "linked_in",
    "twitter",
    "company_id",
    "company_name",
)
# The optional columns of the [accounts] query (SPEC §9), beside group_id and user_id.
ACCOUNT_FIELDS = (
    "name",
    "description",
    "email",
    "website",
    "created_at",
    "street",
    "city",
    "state",
    "postal_code",
    "country",
)
MAX_CONCURRENCY = 20  # ChartMogul answers 503 above 20 parallel connections.
MAX_KEY_LENGTH = 255  # the state database's key columns
DEFAULT_DATABASE_URL = "sqlite:///reconciler.state.db"

Kind = Literal["audience", "trait"]
# What an entry is about: users (Send Contact) or accounts (Send Customer, SPEC §9).
Entity = Literal["contact", "customer"]


@dataclass(frozen=True)
class Entry:
    """One `[[audiences]]`, `[[traits]]`, `[[account_audiences]]` or `[[account_traits]]`
    table."""

    kind: Kind
    name: str
    key: str
    query: str
    entity: Entity = "contact"

    @property
    def label(self) -> str:
        """How messages name the entry: `audience "High Value Users"`, `account trait
        "Seats"`."""
        prefix = "account " if self.entity == "customer" else ""
        return f'{prefix}{self.kind} "{self.name}"'


@dataclass(frozen=True)
class Destination:
    # A credential (SPEC §8): shown masked by str/repr, revealed only to send.
    webhook_url: Secret
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
class Safety:
    """`[safety]` (SPEC §10): a run halts when an audience of at least `min_members`
    acknowledged members would lose more than `max_exit_share` of them; 1 = off."""

    max_exit_share: float = 0.5
    min_members: int = 100


@dataclass(frozen=True)
class Config:
    path: str
    database_url: str
    source_url: str
    destination: Destination
    entries: tuple[Entry, ...]
    profile_query: str | None = None
    schedule: Schedule | None = None
    # [accounts] query (SPEC §9); account entries need it.
    accounts_query: str | None = None
    # [profile] send_changes: a change of a contact field alone sends an update.
    profile_send_changes: bool = False
    daemon: Daemon = field(default_factory=Daemon)
    history: History = field(default_factory=History)
    safety: Safety = field(default_factory=Safety)

    @property
    def audiences(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == "audience")

    @property
    def traits(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == "trait")

    def entry_for_key(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)

    @functools.cached_property
    def redact(self) -> Redactor:
        """The one redactor of this configuration: masks the webhook URL and the
        database passwords in any text (SPEC §8). Built once, where the config is."""
        return Redactor(
            webhook_url=self.destination.webhook_url,
            database_urls=(self.database_url, self.source_url),
        )


def is_loopback_host(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 and ::1 (SPEC §3)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_path(option: str | None, env: Mapping[str, str] = os.environ) -> Path:
    """`--config`, else `$RECONCILER_CONFIG`, else `./reconciler.toml`."""
    return Path(option or env.get("RECONCILER_CONFIG") or "reconciler.toml")


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Read, validate and return the configuration at `path` (env overrides applied)."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        origin = (
            " (the path comes from RECONCILER_CONFIG)"
            if env.get("RECONCILER_CONFIG") == where
            else ""
        )
        raise ConfigError(
            where,
            "file",
            f"not found{origin}",
            "create it, pass --config PATH or set RECONCILER_CONFIG",
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            where, "file", "is a directory", "pass the path of the .toml file itself"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(where, "file", "is not UTF-8 text", "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(
            where, "file", f"cannot be read ({exc.strerror})", "check its permissions"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, "TOML syntax", str(exc), "fix the syntax at that line") from None
    from reconciler.config_reader import Reader  # the validation rules, one module of their own

    return Reader(where).config(raw, env)
