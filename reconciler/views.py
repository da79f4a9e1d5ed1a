"""How history looks on a terminal: rich tables for `history`, `show` and `user`, and
the progress bar of `sync`/`resync`. `--json` output does not come through here.

Long lists are cut to `ROWS` rows with a line saying how many more there are and how
to get them all (`--json`); times are UTC.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as ProgressDisplay
from rich.text import Text

from .run import Progress
from .tables import NUMBER, TEXT, Column, print_table

ROWS = 50
# sync_runs count → its history column
RUN_COUNTS = {"users_seen": "seen", "users_changed": "changed", "entered": "in",
              "exited": "out", "traits_changed": "traits", "resent": "resent", "sent": "sent",
              "failed": "failed", "skipped": "skipped", "pending": "pending"}
STATUS_STYLE = {"succeeded": "green", "partial": "yellow", "failed": "red", "running": "cyan",
                "sent": "green", "skipped": "dim", "pending": "yellow", "rejected": "red",
                "superseded": "dim", "acknowledged": "green", "retry": "yellow",
                "error": "red"}


CHANGE_COLUMNS = [Column("user"), Column("key"), Column("old", TEXT), Column("new", TEXT),
                  Column("update"), Column("note", TEXT)]
ATTEMPT_COLUMNS = [Column("user"), Column("attempt", NUMBER), Column("sent at"),
                   Column("status", NUMBER), Column("outcome"), Column("ms", NUMBER),
                   Column("error", TEXT)]
STATE_COLUMNS = [Column("key"), Column("acknowledged value", TEXT), Column("since (UTC)")]
# changes and attempts carry values and run ids: they wrap between items, never inside one
TIMELINE_COLUMNS = [Column("run", NUMBER), Column("observed (UTC)"), Column("update"),
                    Column("changes"), Column("attempts (run: status)"), Column("note", TEXT)]


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1 here; the CLI ends quietly with its own status (cli.py).
        self.quiet = True
        raise BrokenPipeError


def console() -> Console:
    """A console for stdout; colourless when stdout is not a terminal, and as wide as
    $COLUMNS says, else 200."""
    probe = Console()
    if probe.is_terminal:
        return _Console(highlight=False)
    return _Console(highlight=False, width=_columns() or 200, no_color=True)


def _columns() -> int | None:
    try:
        return max(int(os.environ.get("COLUMNS", "")), 20)
    except ValueError:
        return None


def _when(stamp: str | None) -> str:
    return stamp[:19].replace("T", " ") if stamp else ""


def _took(run: dict[str, Any]) -> str:
    if not run.get("finished_at"):
        return ""
    seconds = (datetime.fromisoformat(run["finished_at"])
               - datetime.fromisoformat(run["started_at"])).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, ensure_ascii=False)


def _more(out: Console, shown: int, total: int, what: str) -> None:
    if total > shown:
        out.print(f"… {total - shown} more {what}; --json prints them all", style="dim")


def print_runs(out: Console, runs: list[dict[str, Any]]) -> None:
    if not runs:
        out.print("no runs yet; `reconciler sync` starts one")
        return
    columns = [Column("run", NUMBER), Column("trigger"), Column("status"),
               Column("started"), Column("took"),
               *(Column(name, NUMBER) for name in RUN_COUNTS.values()), Column("error", TEXT)]
    rows = []
    for run in runs:
        trigger = run["trigger"]
        if run.get("resync_key") and run["resync_key"] != "*":
            trigger += f" ({run['resync_key']})"
        rows.append([str(run["id"]), trigger, _status(run["status"]), _when(run["started_at"]),
                     _took(run), *(str(run[k]) for k in RUN_COUNTS), run["error"] or ""])
    print_table(out, columns, rows, title="runs, newest first (UTC)")


def print_run(out: Console, run: dict[str, Any], changes: list[dict[str, Any]],
              attempts: list[dict[str, Any]], totals: dict[str, int]) -> None:
    """One run: its counts, its first changes, its unacknowledged delivery attempts."""
    title = Text(f"run {run['id']} · {run['trigger']} · ")
    title.append_text(_status(run["status"]))
    out.print(title)
    out.print(f"started {_when(run['started_at'])} UTC"
              + (f", took {_took(run)}" if run.get("finished_at") else ", still running"))
    out.print(f"users seen {run['users_seen']}, changed {run['users_changed']} (entered "
              f"{run['entered']}, exited {run['exited']}, traits {run['traits_changed']}, "
              f"resent unchanged {run['resent']})")
    out.print(f"sent {run['sent']}, failed {run['failed']}, skipped {run['skipped']}, "
              f"pending after the run {run['pending']}, rows ignored {run['rows_ignored']}")
    if run["error"]:
        out.print(Text(f"error: {run['error']}", style="red"))
    if changes:
        print_table(out, CHANGE_COLUMNS, [
            [c["user_id"], c["key"], _json(c["old_value"]), _json(c["new_value"]),
             _status(c["status"]), c["note"] or ""] for c in changes], title="changes")
        _more(out, len(changes), totals["changes"], "changes")
    acknowledged = totals["deliveries"] - totals["unacknowledged"]
    out.print(f"{totals['deliveries']} delivery attempts, {acknowledged} acknowledged")
    if attempts:
        print_table(out, ATTEMPT_COLUMNS, [
            [d["user_id"], str(d["attempt"]), _when(d["sent_at"]), str(d["status_code"] or ""),
             _status(d["outcome"]),
             f"{d['latency_ms']:.0f}" if d["latency_ms"] is not None else "", d["error"] or ""]
            for d in attempts], title="attempts not acknowledged")
        _more(out, len(attempts), totals["unacknowledged"], "attempts not acknowledged")


def print_user(out: Console, data: dict[str, Any]) -> None:
    """A user's acknowledged state, then the newest part of their timeline."""
    user_id, acknowledged, timeline = data["user_id"], data["acknowledged"], data["timeline"]
    if not acknowledged and not timeline:
        out.print(Text(f'nothing recorded for user "{user_id}"'))
        return
    if acknowledged:
        print_table(out, STATE_COLUMNS, [
            [key, _json(item["value"]), _when(item["acked_at"])]
            for key, item in acknowledged.items()],
            title=Text(f'user "{user_id}": acknowledged state'))
    else:
        out.print(Text(f'user "{user_id}": nothing acknowledged yet'))
    shown = timeline[-ROWS:]
    if len(timeline) > len(shown):
        out.print(f"… {len(timeline) - len(shown)} older updates; --json prints them all",
                  style="dim")
    print_table(out, TIMELINE_COLUMNS, [
        [str(u["run_id"]), _when(u["observed_at"]), _status(u["status"]),
         ", ".join(f"{c['key']}={_json(c['new_value'])}" for c in u["changes"]),
         ", ".join(f"{d['run_id']}: {d['status_code'] or d['outcome']}"
                   for d in u["deliveries"]),
         u["note"] or ""] for u in shown], title="timeline, oldest first")


class _CountColumn(MofNCompleteColumn):
    """`done/total` once the total is known; nothing before (not `0/?`)."""

    def render(self, task: Task) -> Text:
        return Text("") if task.total is None else super().render(task)


@contextmanager
def progress_bar(out: Console) -> Iterator[Progress]:
    """A progress display for one run; yields the `RunOptions.progress` callback."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               _CountColumn(), TimeElapsedColumn())
    with ProgressDisplay(*columns, console=out, transient=True) as display:
        task = display.add_task("snapshot and diff", total=None)

        def report(done: int, total: int) -> None:
            display.update(task, description="sending", completed=done, total=total)
        yield report
