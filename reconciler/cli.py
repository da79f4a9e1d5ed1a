"""The `reconciler` command: a thin adapter over the core functions.

Each command loads the config once, migrates the state database, calls one core
function, prints, and maps our errors to the exit statuses of SPEC §4 (one line on
stderr, never a traceback; RECONCILER_DEBUG=1 shows one for unexpected errors).
Output cut short by its reader (`reconciler history | head -1`) ends the command
quietly with status 141, as a process killed by SIGPIPE reports in a shell.

A command imports the core modules it calls in its own body: what a process loads is
what its command uses, so `sync` loads no scheduler, no metrics and no terminal tables,
a dry run no HTTP client either, and `--help` none of the pipeline (tests/test_imports.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from reconciler.errors import ReconcilerError, UsageError
from reconciler.ops import logs

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from reconciler.config import Config
    from reconciler.run import DryRunReport, RunRequest, RunResult, Seams

F = TypeVar("F", bound=Callable[..., Any])
# 128 + SIGPIPE: what a shell reports for `cat big | head -1`, seen by `set -o pipefail`
BROKEN_PIPE_STATUS = 141

config_option = click.option(
    "--config",
    "config_file",
    metavar="PATH",
    help="Config file (default: $RECONCILER_CONFIG, else ./reconciler.toml).",
)
accept_exits_option = click.option(
    "--accept-exits",
    "accept_exits",
    metavar="KEY",
    multiple=True,
    help="Let this audience's exits through the safety guard, for this run only "
    "(repeatable; 'all' for every audience).",
)


def _handle_errors(command: F) -> F:
    """Our errors become one redacted line on stderr and their exit status (SPEC §4)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return command(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        except BrokenPipeError:
            _quiet_after_broken_pipe()
        except ReconcilerError as exc:
            click.echo(f"reconciler: {_redact(str(exc))}", err=True)
            sys.exit(exc.exit_status)
        except KeyboardInterrupt:
            click.echo("reconciler: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("RECONCILER_DEBUG"):
                click.echo(_redact(traceback.format_exc()), err=True, nl=False)
            click.echo(
                f"reconciler: unexpected error: {type(exc).__name__}: {_redact(str(exc))}", err=True
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _quiet_after_broken_pipe() -> None:
    """The reader of our output has gone: say nothing more and exit 141.

    What is left in stdout's buffer goes to /dev/null, so flushing it at exit cannot
    fail again (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(BROKEN_PIPE_STATUS)


_REDACT = "reconciler.redact"  # the command's context keeps its config's redactor here


def _redact(text: str) -> str:
    """Masks the secrets of the loaded config; before one is loaded, any URL's path and
    password."""
    from reconciler.redact import Redactor

    ctx = click.get_current_context(silent=True)
    redact = ctx.meta.get(_REDACT) if ctx is not None else None
    return (redact or Redactor())(text)


def _use_redactor(config: Config) -> None:
    """From here on, this command's messages are masked with `config`'s secrets."""
    click.get_current_context().meta[_REDACT] = config.redact


def _setup(
    config_file: str | None, check: Callable[[Config], object] | None = None
) -> tuple[Config, Engine]:
    """Load the config (and `check` it) and bring the state database to the newest schema."""
    from reconciler.config import config_path, load_config
    from reconciler.state.db import migrate

    config = load_config(config_path(config_file))
    if check is not None:
        check(config)  # before anything is written
    _use_redactor(config)
    engine = state_engine(config.database_url)
    click.get_current_context().call_on_close(engine.dispose)
    created = migrate(engine)
    if created:
        click.echo(f"reconciler: {created}", err=True)
    return config, engine


def state_engine(url: str) -> Engine:
    """The state database's engine (reconciler.state.db): imported when a command needs
    one, so that `--help` loads no SQLAlchemy. Tests replace this to track the engines."""
    from reconciler.state import db

    return db.state_engine(url)


def _print_json(data: Any) -> None:
    """Written in pieces of about 64 KiB: one huge write into a pipe whose reader has
    gone would be cut short silently, where a later piece fails as it should."""
    encoder = json.JSONEncoder(indent=2, ensure_ascii=False, default=str)
    pieces: list[str] = []
    size = 0
    for piece in encoder.iterencode(data):
        pieces.append(piece)
        size += len(piece)
        if size >= 1 << 16:
            sys.stdout.write("".join(pieces))
            pieces, size = [], 0
    sys.stdout.write("".join(pieces) + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    metavar="PATH",
    help="Config file for the command (a --config after the command's name wins).",
)
@click.version_option(package_name="reconciler")
@click.pass_context
def main(ctx: click.Context, config_file: str | None) -> None:
    """Sync SQL audiences and computed traits to ChartMogul's Send Contact and Send
    Customer webhook."""
    _without_httpx_cli()
    if config_file is not None:
        # The default of every command's own --config, so one given there still wins.
        ctx.default_map = {
            **(ctx.default_map or {}),
            **{name: {"config_file": config_file} for name in main.commands},
        }


def _without_httpx_cli() -> None:
    """httpx's package imports its own command-line client (`httpx._main`) whenever
    click, rich and pygments are installed, as they are here: rich's console, progress,
    syntax and table modules and pygments' lexers, about 0.1 s of every run that sends.
    Marked absent, httpx defines its stand-in `httpx.main` instead, as it does without
    its `cli` extra; no command of ours runs httpx's command line."""
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


@main.command("migrate")
@config_option
@_handle_errors
def migrate_command(config_file: str | None) -> None:
    """Bring the state database to the newest schema."""
    _setup(config_file)
    click.echo("state database is at the newest schema")


@main.command("sync")
@config_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="Snapshot and diff, print what would be sent; send and keep nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@accept_exits_option
@_handle_errors
def sync_command(
    config_file: str | None, dry_run: bool, as_json: bool, accept_exits: tuple[str, ...]
) -> None:
    """Run one sync now: snapshot, diff, send, record."""
    from reconciler.pipeline.guard import resolve_accepted
    from reconciler.run import RunRequest

    config, engine = _setup(config_file, check=lambda c: resolve_accepted(c, accept_exits))
    accepted = resolve_accepted(config, accept_exits)
    if dry_run:
        report = _dry_run(config, engine, accepted)
        _print_dry_run(report, as_json)
        sys.exit(report.exit_status)
    result = _run(config, engine, RunRequest(trigger="manual", accept_exits=accepted), as_json)
    _print_result(result, as_json)
    sys.exit(result.exit_status)


def _dry_run(config: Config, engine: Engine, accepted: frozenset[str]) -> DryRunReport:
    from reconciler.run import dry_run

    return dry_run(config, engine, accept_exits=accepted)


@main.command("resync")
@config_option
@click.option(
    "--audience", "key", metavar="KEY", help="Resync only this key (default: every configured key)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@accept_exits_option
@_handle_errors
def resync_command(
    config_file: str | None, key: str | None, as_json: bool, accept_exits: tuple[str, ...]
) -> None:
    """Send every user's current value for every key (or one key), acknowledged or not."""
    from reconciler.pipeline.guard import resolve_accepted
    from reconciler.run import RunRequest

    def check(config: Config) -> None:
        _resync_keys(config, key)
        resolve_accepted(config, accept_exits)

    config, engine = _setup(config_file, check=check)
    request = RunRequest(
        trigger="full_resync",
        resync_keys=_resync_keys(config, key),
        resync_label=key or "*",
        accept_exits=resolve_accepted(config, accept_exits),
    )
    result = _run(config, engine, request, as_json)
    _print_result(result, as_json)
    sys.exit(result.exit_status)


def _resync_keys(config: Config, key: str | None) -> list[str]:
    from reconciler.pipeline.fields import field_keys

    keys = [e.key for e in config.entries]
    if key is not None and key not in keys:
        raise UsageError(f'unknown key "{key}"; known keys: {", ".join(keys) or "none"}')
    # A full resync sends the account (and diffed contact) fields again too.
    return [key] if key else keys + sorted({k for _, k in field_keys(config)})


def _run(config: Config, engine: Engine, request: RunRequest, as_json: bool) -> RunResult:
    """One run, with a progress bar when stdout is a terminal; a signal stops it gently."""
    from reconciler.run import Seams, sync

    seams = Seams()
    with _stop_on_signal(seams), contextlib.ExitStack() as stack:
        if not as_json and _may_be_terminal():
            from reconciler import views  # rich: only a terminal gets the progress bar

            out = views.console()
            if out.is_terminal:
                seams.progress = stack.enter_context(views.progress_bar(out))
        return sync(config, engine, request, seams)


def _may_be_terminal() -> bool:
    """False when rich would not take stdout for a terminal: no tty, and neither
    TTY_COMPATIBLE=1 nor FORCE_COLOR set (rich's `Console.is_terminal`). Asked first so
    that a run whose output goes to a file or a pipe never loads rich; when True, the
    console views.console() makes has the last word."""
    if os.environ.get("TTY_COMPATIBLE") == "1" or os.environ.get("FORCE_COLOR"):
        return True
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed: rich says no terminal
        return False


@contextlib.contextmanager
def _stop_on_signal(options: Seams) -> Iterator[None]:
    """The first SIGINT/SIGTERM lets in-flight deliveries finish and leaves the rest
    pending; a second one ends the process at once (the next run recovers from that)."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if options.stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        options.stopped_by = signal.Signals(signum).name
        options.stop.set()
        sys.stderr.write(
            "\nreconciler: stopping; deliveries in flight finish, the rest stay "
            "pending for the next run (signal again to quit at once)\n"
        )

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command("daemon")
@config_option
@click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    default="text",
    show_default=True,
    help="Log lines as text, or one JSON object a line.",
)
@_handle_errors
def daemon_command(config_file: str | None, log_format: str) -> None:
    """Sync at start, then on [schedule] (UTC), until SIGTERM or SIGINT.

    One log line a run on stderr. A stop signal lets deliveries in flight finish and
    leaves the rest pending for the next run; exit status 0 after a clean stop.
    """
    from reconciler.ops.daemon import require_schedule, run_daemon
    from reconciler.redact import install_log_redaction

    config, engine = _setup(config_file, check=require_schedule)
    logs.configure(log_format)
    install_log_redaction(config.redact)
    run_daemon(config, engine)


@main.command("prune")
@config_option
@click.option(
    "--keep-days",
    type=click.IntRange(min=1),
    metavar="DAYS",
    help="Keep runs of the last DAYS days (default: [history] keep_days, 90).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was deleted as JSON.")
@_handle_errors
def prune_command(config_file: str | None, keep_days: int | None, as_json: bool) -> None:
    """Delete run history older than [history] keep_days (runs also do this as they end).

    Pending updates, rejected ones that still block a re-send, and the acknowledged
    state are never deleted. Takes the run lock: exit status 3 while a run holds it.
    """
    from reconciler.state import history as history_core
    from reconciler.state.retention import prune_now

    config, engine = _setup(config_file)
    days = keep_days or config.history.keep_days
    cutoff, pruned = prune_now(engine, days)
    data = {"keep_days": days, "cutoff": history_core.iso(cutoff), **vars(pruned)}
    if as_json:
        _print_json(data)
        return
    click.echo(
        f"pruned runs started before {data['cutoff']} (keep_days = {days}): "
        f"{pruned.runs} runs, {pruned.updates} updates, {pruned.changes} changes, "
        f"{pruned.deliveries} delivery attempts"
    )


@main.command("check")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@_handle_errors
def check_command(config_file: str | None, as_json: bool) -> None:
    """Check the config, both databases, every query and the webhook, without syncing.

    One line per check: ok, or what is wrong and the fix. Exit status 0 when every
    check is ok, 1 when one failed, 2 when the config is invalid.
    """
    from reconciler.config import config_path
    from reconciler.ops import check as check_core

    config, config_check = check_core.check_config(config_path(config_file))
    checks = [config_check]
    if config is not None:
        _use_redactor(config)
        report = check_core.run_checks(config)
        if report.created:
            click.echo(f"reconciler: {report.created}", err=True)
        checks += report.checks
    if as_json:
        _print_json({"ok": all(c.ok for c in checks), "checks": [vars(c) for c in checks]})
    else:
        for item in checks:
            click.echo(f"{item.name}: {item.message}")
    sys.exit(2 if config is None else 0 if all(c.ok for c in checks) else 1)


@main.command("history")
@config_option
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many runs to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of runs.")
@_handle_errors
def history_command(config_file: str | None, limit: int, as_json: bool) -> None:
    """The newest runs first, with their counts."""
    from reconciler.state import history as history_core

    _, engine = _setup(config_file)
    runs = _read(engine, lambda conn: history_core.list_runs(conn, limit))
    if as_json:
        _print_json(runs)
        return
    from reconciler import views  # rich, for the table

    views.print_runs(views.console(), runs)


@main.command("show")
@click.argument("run_id", type=int)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@_handle_errors
def show_command(run_id: int, config_file: str | None, as_json: bool) -> None:
    """One run: counts, changes, and deliveries with their errors."""
    from reconciler.state import history as history_core

    _, engine = _setup(config_file)
    if as_json:
        _print_json(_read(engine, lambda conn: history_core.show_run(conn, run_id)))
        return
    from reconciler import views  # rich, for the tables

    def for_terminal(conn: Any) -> tuple[Any, ...]:
        return (
            {**history_core.run_summary(conn, run_id), **history_core.run_left_out(conn, run_id)},
            history_core.run_changes(conn, run_id, views.ROWS),
            history_core.run_deliveries(conn, run_id, views.ROWS, unacknowledged_only=True),
            history_core.run_totals(conn, run_id),
            history_core.run_causes(conn, run_id),
        )

    views.print_run(views.console(), *_read(engine, for_terminal))


@main.command("user")
@click.argument("user_id")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the user's state as JSON.")
@_handle_errors
def user_command(user_id: str, config_file: str | None, as_json: bool) -> None:
    """One user's acknowledged state and timeline of changes and deliveries."""
    from reconciler.state import history as history_core

    _print_timeline(config_file, as_json, lambda conn: history_core.user_timeline(conn, user_id))


@main.command("account")
@click.argument("group_id")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the account's state as JSON.")
@_handle_errors
def account_command(group_id: str, config_file: str | None, as_json: bool) -> None:
    """One account's acknowledged state and timeline of changes and deliveries."""
    from reconciler.state import history as history_core

    _print_timeline(
        config_file, as_json, lambda conn: history_core.account_timeline(conn, group_id)
    )


def _print_timeline(
    config_file: str | None, as_json: bool, read: Callable[[Any], dict[str, Any]]
) -> None:
    """`user` and `account`: the acknowledged state and the timeline, as JSON or a view."""
    _, engine = _setup(config_file)
    data = _read(engine, read)
    if as_json:
        _print_json(data)
        return
    from reconciler import views  # rich, for the tables

    views.print_user(views.console(), data)


def _read(engine: Engine, query: Callable[[Any], Any]) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from reconciler.state.db import database_error

    try:
        with engine.connect() as conn:
            return query(conn)
    except SQLAlchemyError as exc:
        raise database_error("state", engine, exc) from None


def _print_result(result: RunResult, as_json: bool) -> None:
    from reconciler import summaries

    if as_json:
        _print_json(result.as_dict())
        return
    click.echo(summaries.run_line(result))


def _print_dry_run(report: DryRunReport, as_json: bool) -> None:
    from reconciler import summaries

    if as_json:
        _print_json(summaries.dry_run_data(report))
        return
    for line in summaries.dry_run_lines(report):
        click.echo(line)


if __name__ == "__main__":
    main()
