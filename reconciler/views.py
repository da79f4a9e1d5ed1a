"""How history looks on a terminal: rich tables for `history`, `show`, `user` and
`account`, and
the progress bar of `sync`/`resync`. `--json` output does not come through here.

Long lists are cut to `ROWS` rows with a line saying how many more there are and how
to get them all (`--json`); times are UTC.
"""

from __future__ import annotations

import json
import os
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
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as ProgressDisplay
from rich.text import Text

from reconciler.outcome import Progress
from reconciler.state.db import FIX_HINTS
from reconciler.tables import NUMBER, TEXT, Column, print_table

ROWS = 50
# sync_runs count → its history column
RUN_COUNTS = {
    "users_seen": "seen",
    "users_changed": "changed",
    "accounts_seen": "acc.seen",
    "accounts_changed": "acc.changed",
    "entered": "in",
    "exited": "out",
    "traits_changed": "traits",
    "resent": "resent",
    "sent": "sent",
    "failed": "failed",
    "skipped": "skipped",
    "pending": "pending",
}
STATUS_STYLE = {
    "succeeded": "green",
    "partial": "yellow",
    "failed": "red",
    "running": "cyan",
    "halted": "bold red",
    "sent": "green",
    "skipped": "dim",
    "pending": "yellow",
    "rejected": "red",
    "superseded": "dim",
    "acknowledged": "green",
    "retry": "yellow",
    "error": "red",
}


CHANGE_COLUMNS = [
    Column("entity"),
    Column("id"),
    Column("key"),
    Column("old", TEXT),
    Column("new", TEXT),
    Column("update"),
    Column("note", TEXT),
]
ATTEMPT_COLUMNS = [
    Column("entity"),
    Column("id"),
    Column("attempt", NUMBER),
    Column("sent at"),
    Column("status", NUMBER),
    Column("outcome"),
    Column("ms", NUMBER),
    Column("error", TEXT),
]
CAUSE_COLUMNS = [Column("cause", TEXT), Column("attempts", NUMBER), Column("updates", NUMBER)]
STATE_COLUMNS = [Column("key"), Column("acknowledged value", TEXT), Column("since (UTC)")]
# changes and attempts carry values and run ids: they wrap between items, never inside one
TIMELINE_COLUMNS = [
    Column("run", NUMBER),
    Column("observed (UTC)"),
    Column("update"),
    Column("changes"),
    Column("attempts (run: status)"),
    Column("note", TEXT),
]


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
    seconds = (
        datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])
    ).total_seconds()
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


def error_gist(error: str | None) -> str:
    """A run's error without the database URLs and fixes (`show` keeps them): the
    cause at its end survives, and the table wraps what is left, never cutting it."""
    text = _WHERE.sub("", error or "")
    for hint in FIX_HINTS:
        text = text.replace(hint, "")
    return text


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
    return text[:head].rstrip() + "…" + text[len(text) - (width - head - 1) :]


def print_runs(out: Console, runs: list[dict[str, Any]]) -> None:
    if not runs:
        out.print("no runs yet; `reconciler sync` starts one")
        return
    columns = [
        Column("run", NUMBER),
        Column("trigger"),
        Column("status"),
        Column("started"),
        Column("took"),
        *(Column(name, NUMBER) for name in RUN_COUNTS.values()),
        Column("error", TEXT),
    ]
    rows = []
    for run in runs:
        trigger = run["trigger"]
        if run.get("resync_key") and run["resync_key"] != "*":
            trigger += f" ({run['resync_key']})"
        rows.append(
            [
                str(run["id"]),
                trigger,
                _status(run["status"]),
                _when(run["started_at"]),
                _took(run),
                *(str(run[k]) for k in RUN_COUNTS),
                error_gist(run["error"]),
            ]
        )
    print_table(out, columns, rows, title="runs, newest first (UTC)")


def print_run(
    out: Console,
    run: dict[str, Any],
    changes: list[dict[str, Any]],
    attempts: list[dict[str, Any]],
    totals: dict[str, int],
    causes: list[dict[str, Any]] | None = None,
) -> None:
    """One run: its counts, its first changes, its unacknowledged delivery attempts
    (grouped by cause first, when `causes` are given)."""
    title = Text(f"run {run['id']} · {run['trigger']} · ")
    title.append_text(_status(run["status"]))
    out.print(title)
    out.print(
        f"started {_when(run['started_at'])} UTC"
        + (f", took {_took(run)}" if run.get("finished_at") else ", still running")
    )
    if run.get("snapshot_at"):
        out.print(
            f"source read as of {_when(run['snapshot_at'])} UTC"
            + (f" (snapshot {run['source_snapshot']})" if run.get("source_snapshot") else "")
        )
    out.print(
        f"users seen {run['users_seen']}, changed {run['users_changed']}; accounts "
        f"seen {run['accounts_seen']}, changed {run['accounts_changed']} (entered "
        f"{run['entered']}, exited {run['exited']}, traits {run['traits_changed']}, "
        f"resent unchanged {run['resent']})"
    )
    out.print(
        f"sent {run['sent']}, failed {run['failed']}, skipped {run['skipped']}, "
        f"pending after the run {run['pending']}, rows ignored {run['rows_ignored']}"
    )
    if run["status"] == "halted":
        out.print("halted by the safety guard: this run kept and sent nothing")
    print_left_out(out, run)
    if run["error"]:
        out.print(Text(f"error: {run['error']}", style="red"))
    if changes:
        print_table(
            out,
            CHANGE_COLUMNS,
            [
                [
                    c["entity"],
                    c["user_id"],
                    c["key"],
                    _json(c["old_value"]),
                    _json(c["new_value"]),
                    _status(c["status"]),
                    c["note"] or "",
                ]
                for c in changes
            ],
            title="changes",
        )
        _more(out, len(changes), totals["changes"], "changes")
    acknowledged = totals["deliveries"] - totals["unacknowledged"]
    out.print(f"{totals['deliveries']} delivery attempts, {acknowledged} acknowledged")
    if causes:
        print_causes(out, causes)
    if attempts:
        print_table(
            out,
            ATTEMPT_COLUMNS,
            [
                [
                    d["entity"],
                    d["user_id"],
                    str(d["attempt"]),
                    _when(d["sent_at"]),
                    str(d["status_code"] or ""),
                    _status(d["outcome"]),
                    f"{d['latency_ms']:.0f}" if d["latency_ms"] is not None else "",
                    d["error"] or "",
                ]
                for d in attempts
            ],
            title="attempts not acknowledged",
        )
        _more(out, len(attempts), totals["unacknowledged"], "attempts not acknowledged")


def print_left_out(out: Console, run: dict[str, Any]) -> None:
    """How many bodies of a run went without a field that failed validation."""
    parts = [
        f"{label} left out: {run[key]}"
        for key, label in (("emails_left_out", "emails"), ("linked_in_left_out", "linked_in"))
        if run.get(key)
    ]
    if parts:
        out.print(", ".join(parts) + " (invalid values; the notes of the changes say which)")


def print_causes(out: Console, causes: list[dict[str, Any]]) -> None:
    """The attempts not acknowledged, grouped by cause, most frequent first."""
    print_table(
        out,
        CAUSE_COLUMNS,
        [[item["cause"], str(item["attempts"]), str(item["updates"])] for item in causes],
        title="attempts not acknowledged, by cause",
    )


def print_user(out: Console, data: dict[str, Any]) -> None:
    """A user's (or an account's: `data` has a `group_id`) acknowledged state, then the
    newest part of their timeline."""
    what = "account" if "group_id" in data else "user"
    user_id = data["group_id"] if what == "account" else data["user_id"]
    acknowledged, timeline = data["acknowledged"], data["timeline"]
    if not acknowledged and not timeline:
        out.print(Text(f'nothing recorded for {what} "{user_id}"'))
        return
    if acknowledged:
        print_table(
            out,
            STATE_COLUMNS,
            [
                [key, _json(item["value"]), _when(item["acked_at"])]
                for key, item in acknowledged.items()
            ],
            title=Text(f'{what} "{user_id}": acknowledged state'),
        )
    else:
        out.print(Text(f'{what} "{user_id}": nothing acknowledged yet'))
    shown = timeline[-ROWS:]
    if len(timeline) > len(shown):
        out.print(
            f"… {len(timeline) - len(shown)} older updates; --json prints them all", style="dim"
        )
    print_table(
        out,
        TIMELINE_COLUMNS,
        [
            [
                str(u["run_id"]),
                _when(u["observed_at"]),
                _status(u["status"]),
                ", ".join(f"{c['key']}={_json(c['new_value'])}" for c in u["changes"]),
                ", ".join(
                    f"{d['run_id']}: {d['status_code'] or d['outcome']}" for d in u["deliveries"]
                ),
                u["note"] or "",
            ]
            for u in shown
        ],
        title="timeline, oldest first",
    )


class _CountColumn(MofNCompleteColumn):
    """`done/total` once the total is known; nothing before (not `0/?`)."""

    def render(self, task: Task) -> Text:
        return Text("") if task.total is None else super().render(task)


@contextmanager
def progress_bar(out: Console) -> Iterator[Progress]:
    """A progress display for one run; yields the `Seams.progress` callback."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        _CountColumn(),
        TimeElapsedColumn(),
    )
    with ProgressDisplay(*columns, console=out, transient=True) as display:
        task = display.add_task("snapshot and diff", total=None)

        def report(done: int, total: int) -> None:
            display.update(task, description="sending", completed=done, total=total)

        yield report
