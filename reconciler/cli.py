"""The `reconciler` command: a thin adapter over the core functions.

Each command loads the config once, migrates the state database, calls one core
function, prints, and maps our errors to the exit statuses of SPEC §4 (one line on
stderr, never a traceback; RECONCILER_DEBUG=1 shows one for unexpected errors).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import history as history_core
from .config import Config, config_path, load_config
from .db import database_error, migrate, state_engine
from .errors import ReconcilerError, UsageError
from .run import DryRunReport, RunOptions, RunResult, dry_run, redactor, sync

F = TypeVar("F", bound=Callable[..., Any])

config_option = click.option(
    "--config", "config_file", metavar="PATH",
    help="Config file (default: $RECONCILER_CONFIG, else ./reconciler.toml).")


def _handle_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ReconcilerError as exc:
            click.echo(f"reconciler: {exc}", err=True)
            sys.exit(exc.exit_status)
        except Exception as exc:
            if os.environ.get("RECONCILER_DEBUG"):
                traceback.print_exc()
            click.echo(f"reconciler: unexpected error: {type(exc).__name__}: "
                       f"{_last_redactor(str(exc))}", err=True)
            sys.exit(1)
    return wrapper  # type: ignore[return-value]


def _last_redactor(text: str) -> str:
    return _REDACT[0](text) if _REDACT else text


_REDACT: list[Callable[[str], str]] = []


def _setup(config_file: str | None) -> tuple[Config, Engine]:
    """Load the config and bring the state database to the newest schema."""
    config = load_config(config_path(config_file))
    _REDACT[:] = [redactor(config)]
    engine = state_engine(config.database_url)
    migrate(engine)
    return config, engine


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reconciler")
def main() -> None:
    """Sync SQL audiences and computed traits to ChartMogul's Send Contact webhook."""


@main.command("migrate")
@config_option
@_handle_errors
def migrate_command(config_file: str | None) -> None:
    """Bring the state database to the newest schema."""
    _setup(config_file)
    click.echo("state database is at the newest schema")


@main.command("sync")
@config_option
@click.option("--dry-run", is_flag=True,
              help="Snapshot and diff, print what would be sent; send and keep nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_handle_errors
def sync_command(config_file: str | None, dry_run: bool, as_json: bool) -> None:
    """Run one sync now: snapshot, diff, send, record."""
    config, engine = _setup(config_file)
    if dry_run:
        report = _dry_run(config, engine)
        _print_dry_run(report, as_json)
        sys.exit(report.exit_status)
    result = sync(config, engine, RunOptions(trigger="manual"))
    _print_result(result, as_json)
    sys.exit(result.exit_status)


def _dry_run(config: Config, engine: Engine) -> DryRunReport:
    return dry_run(config, engine)


@main.command("resync")
@config_option
@click.option("--audience", "key", metavar="KEY",
              help="Resync only this key (default: every configured key).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_handle_errors
def resync_command(config_file: str | None, key: str | None, as_json: bool) -> None:
    """Send every user's current value for every key (or one key), acknowledged or not."""
    config, engine = _setup(config_file)
    keys = [e.key for e in config.entries]
    if key is not None and key not in keys:
        raise UsageError(f'unknown key "{key}"; known keys: {", ".join(keys) or "none"}')
    options = RunOptions(trigger="full_resync", resync_keys=[key] if key else keys,
                         resync_label=key or "*")
    result = sync(config, engine, options)
    _print_result(result, as_json)
    sys.exit(result.exit_status)


@main.command("history")
@config_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1),
              help="How many runs to show.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of runs.")
@_handle_errors
def history_command(config_file: str | None, limit: int, as_json: bool) -> None:
    """The newest runs first, with their counts."""
    _, engine = _setup(config_file)
    runs = _read(engine, lambda conn: history_core.list_runs(conn, limit))
    if as_json:
        _print_json(runs)
        return
    table = Table("run", "trigger", "status", "started", "seen", "changed", "entered",
                  "exited", "traits", "sent", "failed", "skipped", "error")
    for run in runs:
        table.add_row(*(str(run[k] if run[k] is not None else "") for k in (
            "id", "trigger", "status", "started_at", "users_seen", "users_changed",
            "entered", "exited", "traits_changed", "sent", "failed", "skipped", "error")))
    Console(width=200).print(table)


@main.command("show")
@click.argument("run_id", type=int)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@_handle_errors
def show_command(run_id: int, config_file: str | None, as_json: bool) -> None:
    """One run: counts, changes, and deliveries with their errors."""
    _, engine = _setup(config_file)
    run = _read(engine, lambda conn: history_core.show_run(conn, run_id))
    if as_json:
        _print_json(run)
        return
    console = Console(width=200)
    counts = {k: v for k, v in run.items() if k not in ("changes", "deliveries")}
    console.print(" ".join(f"{k}={v}" for k, v in counts.items() if v is not None))
    changes = Table("user", "key", "old", "new", "status", "note", title="changes")
    for c in run["changes"]:
        changes.add_row(c["user_id"], c["key"], json.dumps(c["old_value"]),
                        json.dumps(c["new_value"]), c["status"], c["note"] or "")
    console.print(changes)
    deliveries = Table("user", "attempt", "sent at", "status", "outcome", "ms", "error",
                       title="deliveries")
    for d in run["deliveries"]:
        deliveries.add_row(d["user_id"], str(d["attempt"]), d["sent_at"],
                           str(d["status_code"] or ""), d["outcome"],
                           str(d["latency_ms"] or ""), d["error"] or "")
    console.print(deliveries)


@main.command("user")
@click.argument("user_id")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the user's state as JSON.")
@_handle_errors
def user_command(user_id: str, config_file: str | None, as_json: bool) -> None:
    """One user's acknowledged state and timeline of changes and deliveries."""
    _, engine = _setup(config_file)
    data = _read(engine, lambda conn: history_core.user_timeline(conn, user_id))
    if as_json:
        _print_json(data)
        return
    console = Console(width=200)
    state = Table("key", "acknowledged value", "since", title=f"user {user_id}")
    for key, item in data["acknowledged"].items():
        state.add_row(key, json.dumps(item["value"]), item["acked_at"])
    console.print(state)
    timeline = Table("run", "message id", "status", "changes", "attempts", title="timeline")
    for u in data["timeline"]:
        timeline.add_row(str(u["run_id"]), u["message_id"], u["status"],
                         ", ".join(f"{c['key']}={json.dumps(c['new_value'])}"
                                   for c in u["changes"]),
                         "; ".join(f"{d['sent_at']} {d['status_code'] or d['outcome']}"
                                   for d in u["deliveries"]))
    console.print(timeline)


def _read(engine: Engine, query: Callable[[Any], Any]) -> Any:
    try:
        with engine.connect() as conn:
            return query(conn)
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None


def _print_result(result: RunResult, as_json: bool) -> None:
    fields = {k: v for k, v in vars(result).items()}
    if as_json:
        _print_json(fields)
        return
    click.echo(
        f"run {result.run_id} {result.status}: {result.users_seen} users seen, "
        f"{result.users_changed} changed (entered {result.entered}, exited {result.exited}, "
        f"traits {result.traits_changed}); sent {result.sent}, failed {result.failed}, "
        f"skipped {result.skipped}, pending {result.pending}"
        + (f"; ignored {result.rows_ignored} rows without user_id" if result.rows_ignored
           else "")
        + (f"; error: {result.error}" if result.error else ""))


def _print_dry_run(report: DryRunReport, as_json: bool) -> None:
    data = {"users_seen": report.users_seen, "users_changed": report.counts.users,
            "entered": report.counts.entered, "exited": report.counts.exited,
            "traits_changed": report.counts.traits_changed, "skipped": report.counts.skipped,
            "still_pending": report.kept, "rows_ignored": report.rows_ignored,
            "failed_entries": report.failed_entries, "sample": report.sample}
    if as_json:
        _print_json(data)
        return
    click.echo(f"dry run: {report.users_seen} users seen; would send {report.counts.users} "
               f"updates (entered {report.counts.entered}, exited {report.counts.exited}, "
               f"traits {report.counts.traits_changed}, skipped {report.counts.skipped}); "
               f"{report.kept} earlier updates still pending")
    for key, error in report.failed_entries.items():
        click.echo(f"  entry {key} failed: {error}")
    for item in report.sample:
        click.echo(f"  {item['status']}: {json.dumps(item['body'], ensure_ascii=False)}")


if __name__ == "__main__":
    main()
