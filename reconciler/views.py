"""How history looks on a terminal: rich tables for `history`, `show` and `user`, and
the progress bar of `sync`/`resync`. `--json` output does not come through here.

Long lists are cut to `ROWS` rows with a line saying how many more there are and how
to get them all (`--json`); times are UTC.
"""

from __future__ import annotations

import json
import re
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

from .db import FIX_HINTS
from .run import Progress

ROWS = 50
STATUS_STYLE = {"succeeded": "green", "partial": "yellow", "failed": "red", "running": "cyan",
                "halted": "bold red",
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


ERROR_CELL = 48  # characters of a run's error in the `history` table
_WHERE = re.compile(r" \((?:state|source) database [^()\s]*\)")


def error_cell(error: str | None, width: int = ERROR_CELL) -> str:
    """A run's error cut to `width` characters so that its cause survives.

    Messages end with the cause (then our fix and which database): short of room, the
    database URLs and fixes go first, then the middle of the text, never its end.
    `show` and `--json` keep the whole text.
    """
    text = error or ""
    if len(text) <= width:
        return text
    text = _WHERE.sub("", text)
    for hint in FIX_HINTS:
        text = text.replace(hint, "")
    if len(text) <= width:
        return text
    head = width // 3
    return text[:head].rstrip() + "…" + text[len(text) - (width - head - 1):]


def print_runs(out: Console, runs: list[dict[str, Any]]) -> None:
    if not runs:
        out.print("no runs yet; `reconciler sync` starts one")
        return
    table = Table(title="runs, newest first (UTC)", title_justify="left")
    table.add_column("run", justify="right")
    for name in ("trigger", "status", "started", "took"):
        table.add_column(name, no_wrap=True)
    for name in ("seen", "changed", "in", "out", "traits", "sent", "failed", "skipped",
                 "pending"):
        table.add_column(name, justify="right")
    table.add_column("error", overflow="ellipsis", no_wrap=True, max_width=48)
    for run in runs:
        trigger = run["trigger"]
        if run.get("resync_key") and run["resync_key"] != "*":
            trigger += f" ({run['resync_key']})"
        table.add_row(str(run["id"]), trigger, _status(run["status"]),
                      _when(run["started_at"]), _took(run),
                      *(str(run[k]) for k in ("users_seen", "users_changed", "entered",
                                              "exited", "traits_changed", "sent", "failed",
                                              "skipped", "pending")),
                      error_cell(run["error"]))
    out.print(table)


def print_run(out: Console, run: dict[str, Any], changes: list[dict[str, Any]],
              attempts: list[dict[str, Any]], totals: dict[str, int],
              causes: list[dict[str, Any]] | None = None) -> None:
    """One run: its counts, its first changes, its unacknowledged delivery attempts
    (grouped by cause first, when `causes` are given)."""
    title = Text(f"run {run['id']} · {run['trigger']} · ")
    title.append_text(_status(run["status"]))
    out.print(title)
    out.print(f"started {_when(run['started_at'])} UTC"
              + (f", took {_took(run)}" if run.get("finished_at") else ", still running"))
    if run.get("snapshot_at"):
        out.print(f"source read as of {_when(run['snapshot_at'])} UTC"
                  + (f" (snapshot {run['source_snapshot']})" if run.get("source_snapshot")
                     else ""))
    out.print(f"users seen {run['users_seen']}, changed {run['users_changed']} (entered "
              f"{run['entered']}, exited {run['exited']}, traits {run['traits_changed']})")
    out.print(f"sent {run['sent']}, failed {run['failed']}, skipped {run['skipped']}, "
              f"pending after the run {run['pending']}, rows ignored {run['rows_ignored']}")
    if run["status"] == "halted":
        out.print("halted by the safety guard: this run kept and sent nothing")
    print_left_out(out, run)
    if run["error"]:
        out.print(Text(f"error: {run['error']}", style="red"))
    if changes:
        table = Table("user", "key", "old", "new", "update", "note", title="changes",
                      title_justify="left")
        for c in changes:
            table.add_row(c["user_id"], c["key"], _json(c["old_value"]),
                          _json(c["new_value"]), _status(c["status"]), c["note"] or "")
        out.print(table)
        _more(out, len(changes), totals["changes"], "changes")
    acknowledged = totals["deliveries"] - totals["unacknowledged"]
    out.print(f"{totals['deliveries']} delivery attempts, {acknowledged} acknowledged")
    if causes:
        print_causes(out, causes)
    if attempts:
        table = Table("user", "attempt", "sent at", "status", "outcome", "ms", "error",
                      title="attempts not acknowledged", title_justify="left")
        for d in attempts:
            table.add_row(d["user_id"], str(d["attempt"]), _when(d["sent_at"]),
                          str(d["status_code"] or ""), _status(d["outcome"]),
                          f"{d['latency_ms']:.0f}" if d["latency_ms"] is not None else "",
                          d["error"] or "")
        out.print(table)
        _more(out, len(attempts), totals["unacknowledged"], "attempts not acknowledged")


def print_left_out(out: Console, run: dict[str, Any]) -> None:
    """How many bodies of a run went without a field that failed validation."""
    parts = [f"{label} left out: {run[key]}" for key, label in
             (("emails_left_out", "emails"), ("linked_in_left_out", "linked_in"))
             if run.get(key)]
    if parts:
        out.print(", ".join(parts) + " (invalid values; the notes of the changes say which)")


def print_causes(out: Console, causes: list[dict[str, Any]]) -> None:
    """The attempts not acknowledged, grouped by cause, most frequent first."""
    table = Table(title="attempts not acknowledged, by cause", title_justify="left")
    table.add_column("cause", overflow="fold")
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("updates", justify="right", no_wrap=True)
    for item in causes:
        table.add_row(item["cause"], str(item["attempts"]), str(item["updates"]))
    out.print(table)


def print_user(out: Console, data: dict[str, Any]) -> None:
    """A user's acknowledged state, then the newest part of their timeline."""
    user_id, acknowledged, timeline = data["user_id"], data["acknowledged"], data["timeline"]
    if not acknowledged and not timeline:
        out.print(f'nothing recorded for user "{user_id}"')
        return
    if acknowledged:
        state = Table("key", "acknowledged value", "since (UTC)",
                      title=f'user "{user_id}": acknowledged state', title_justify="left")
        for key, item in acknowledged.items():
            state.add_row(key, _json(item["value"]), _when(item["acked_at"]))
        out.print(state)
    else:
        out.print(f'user "{user_id}": nothing acknowledged yet')
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
