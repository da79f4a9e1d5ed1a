"""How history looks on a terminal: rich tables for `history`, `show`, `user` and
`account`, and
the progress bar of `sync`/`resync`. `--json` output does not come through here.

Long lists are cut to `ROWS` rows with a line saying how many more there are and how
to get them all (`--json`); times are UTC.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as ProgressDisplay
from rich.table import Table
from rich.text import Text

from .run import Progress

ROWS = 50
STATUS_STYLE = {"succeeded": "green", "partial": "yellow", "failed": "red", "running": "cyan",
                "sent": "green", "skipped": "dim", "pending": "yellow", "rejected": "red",
                "superseded": "dim", "acknowledged": "green", "retry": "yellow",
                "error": "red"}


def console() -> Console:
    """A console for stdout; wide and colourless when stdout is not a terminal."""
    probe = Console()
    if probe.is_terminal:
        return Console(highlight=False)
    return Console(highlight=False, width=200, no_color=True)


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
    table = Table(title="runs, newest first (UTC)", title_justify="left")
    table.add_column("run", justify="right")
    for name in ("trigger", "status", "started", "took"):
        table.add_column(name, no_wrap=True)
    for name in ("seen", "changed", "accounts", "in", "out", "traits", "sent", "failed",
                 "skipped", "pending"):
        table.add_column(name, justify="right")
    table.add_column("error", overflow="ellipsis", no_wrap=True, max_width=48)
    for run in runs:
        trigger = run["trigger"]
        if run.get("resync_key") and run["resync_key"] != "*":
            trigger += f" ({run['resync_key']})"
        table.add_row(str(run["id"]), trigger, _status(run["status"]),
                      _when(run["started_at"]), _took(run),
                      str(run["users_seen"]), str(run["users_changed"]),
                      f"{run['accounts_changed']}/{run['accounts_seen']}",
                      *(str(run[k]) for k in ("entered", "exited", "traits_changed", "sent",
                                              "failed", "skipped", "pending")),
                      run["error"] or "")
    out.print(table)


def print_run(out: Console, run: dict[str, Any], changes: list[dict[str, Any]],
              attempts: list[dict[str, Any]], totals: dict[str, int]) -> None:
    """One run: its counts, its first changes, its unacknowledged delivery attempts."""
    title = Text(f"run {run['id']} · {run['trigger']} · ")
    title.append_text(_status(run["status"]))
    out.print(title)
    out.print(f"started {_when(run['started_at'])} UTC"
              + (f", took {_took(run)}" if run.get("finished_at") else ", still running"))
    out.print(f"users seen {run['users_seen']}, changed {run['users_changed']}; accounts "
              f"seen {run['accounts_seen']}, changed {run['accounts_changed']} (entered "
              f"{run['entered']}, exited {run['exited']}, traits {run['traits_changed']})")
    out.print(f"sent {run['sent']}, failed {run['failed']}, skipped {run['skipped']}, "
              f"pending after the run {run['pending']}, rows ignored {run['rows_ignored']}")
    if run["error"]:
        out.print(Text(f"error: {run['error']}", style="red"))
    if changes:
        table = Table("entity", "id", "key", "old", "new", "update", "note", title="changes",
                      title_justify="left")
        for c in changes:
            table.add_row(c["entity"], c["user_id"], c["key"], _json(c["old_value"]),
                          _json(c["new_value"]), _status(c["status"]), c["note"] or "")
        out.print(table)
        _more(out, len(changes), totals["changes"], "changes")
    acknowledged = totals["deliveries"] - totals["unacknowledged"]
    out.print(f"{totals['deliveries']} delivery attempts, {acknowledged} acknowledged")
    if attempts:
        table = Table("entity", "id", "attempt", "sent at", "status", "outcome", "ms",
                      "error", title="attempts not acknowledged", title_justify="left")
        for d in attempts:
            table.add_row(d["entity"], d["user_id"], str(d["attempt"]), _when(d["sent_at"]),
                          str(d["status_code"] or ""), _status(d["outcome"]),
                          f"{d['latency_ms']:.0f}" if d["latency_ms"] is not None else "",
                          d["error"] or "")
        out.print(table)
        _more(out, len(attempts), totals["unacknowledged"], "attempts not acknowledged")


def print_user(out: Console, data: dict[str, Any]) -> None:
    """A user's (or an account's: `data` has a `group_id`) acknowledged state, then the
    newest part of their timeline."""
    what = "account" if "group_id" in data else "user"
    user_id = data["group_id"] if what == "account" else data["user_id"]
    acknowledged, timeline = data["acknowledged"], data["timeline"]
    if not acknowledged and not timeline:
        out.print(f'nothing recorded for {what} "{user_id}"')
        return
    if acknowledged:
        state = Table("key", "acknowledged value", "since (UTC)",
                      title=f'{what} "{user_id}": acknowledged state', title_justify="left")
        for key, item in acknowledged.items():
            state.add_row(key, _json(item["value"]), _when(item["acked_at"]))
        out.print(state)
    else:
        out.print(f'{what} "{user_id}": nothing acknowledged yet')
    shown = timeline[-ROWS:]
    if len(timeline) > len(shown):
        out.print(f"… {len(timeline) - len(shown)} older updates; --json prints them all",
                  style="dim")
    table = Table("run", "observed (UTC)", "update", "changes", "attempts (run: status)",
                  "note", title="timeline, oldest first", title_justify="left")
    for u in shown:
        table.add_row(str(u["run_id"]), _when(u["observed_at"]), _status(u["status"]),
                      ", ".join(f"{c['key']}={_json(c['new_value'])}" for c in u["changes"]),
                      ", ".join(f"{d['run_id']}: {d['status_code'] or d['outcome']}"
                                for d in u["deliveries"]),
                      u["note"] or "")
    out.print(table)


@contextmanager
def progress_bar(out: Console) -> Iterator[Progress]:
    """A progress display for one run; yields the `RunOptions.progress` callback."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with ProgressDisplay(*columns, console=out, transient=True) as display:
        task = display.add_task("snapshot and diff", total=None)

        def report(done: int, total: int) -> None:
            display.update(task, description="sending", completed=done, total=total)
        yield report
