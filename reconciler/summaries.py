"""The words a run is summed up in: one line for `sync`, `resync` and the daemon's log,
and the dry run's report. Plain strings and dicts; the CLI and the daemon print them."""

from __future__ import annotations

import json
from typing import Any

from reconciler.outcome import DryRunReport, RunResult
from reconciler.pipeline.guard import proceed_command


def run_line(result: RunResult, took: float | None = None) -> str:
    """`run 12 partial[ in 3.4s]: 5 users seen, ...; error: ...`."""
    head = f"run {result.run_id} {result.status}" + (f" in {took:.1f}s" if took is not None else "")
    if result.status == "halted":
        line = (
            f"{head}: {result.users_seen} users seen; nothing sent or kept "
            f"({result.pending} earlier updates stay pending)"
        )
    else:
        line = (
            f"{head}: {result.users_seen} users seen, {result.users_changed} changed"
            + (
                f"; {result.accounts_seen} accounts seen, {result.accounts_changed} changed"
                if result.accounts_seen or result.accounts_changed
                else ""
            )
            + f" (entered {result.entered}, exited {result.exited}, "
            f"traits {result.traits_changed}{_resent(result.resent)}); "
            f"sent {result.sent}, failed {result.failed}, skipped {result.skipped}, "
            f"pending {result.pending}"
            + (
                f"; ignored {result.rows_ignored} rows without user_id (or group_id)"
                if result.rows_ignored
                else ""
            )
            + (f"; emails left out: {result.emails_left_out}" if result.emails_left_out else "")
            + (
                f"; linked_in left out: {result.linked_in_left_out}"
                if result.linked_in_left_out
                else ""
            )
        )
    return line + (f"; error: {result.error}" if result.error else "")


def _resent(count: int) -> str:
    """Values sent again as acknowledged (a resync, an uncertain key): not changes."""
    return f", resent {count} unchanged" if count else ""


def dry_run_data(report: DryRunReport) -> dict[str, Any]:
    """`sync --dry-run --json`."""
    return {
        "users_seen": report.users_seen,
        "users_changed": report.counts.users,
        "accounts_seen": report.accounts_seen,
        "accounts_changed": report.counts.accounts,
        "entered": report.counts.entered,
        "exited": report.counts.exited,
        "traits_changed": report.counts.traits_changed,
        "skipped": report.counts.skipped,
        "resent": report.resent,
        "still_pending": report.kept,
        "rows_ignored": report.rows_ignored,
        "failed_entries": report.failed_entries,
        "sample": report.sample,
        "guard": report.guard.as_dict(),
    }


def dry_run_lines(report: DryRunReport) -> list[str]:
    """`sync --dry-run`: the counts, failed entries, the guard's verdict, the sample."""
    counts = report.counts
    with_accounts = bool(report.accounts_seen or counts.accounts)
    seen = f", {report.accounts_seen} accounts seen" if with_accounts else ""
    accounts = f" and {counts.accounts} account updates" if with_accounts else ""
    lines = [
        f"dry run: {report.users_seen} users seen{seen}; would send "
        f"{counts.users} updates{accounts} "
        f"(entered {counts.entered}, exited {counts.exited}, "
        f"traits {counts.traits_changed}{_resent(report.resent)}, "
        f"skipped {counts.skipped}); "
        f"{report.kept} earlier updates kept as they are (pending, or rejected and "
        "waiting for a change)"
        + (f"; ignored {report.rows_ignored} rows without user_id" if report.rows_ignored else "")
    ]
    lines += [f"  entry {key} failed: {error}" for key, error in report.failed_entries.items()]
    if report.guard.halted:
        lines.append(
            "a real run would halt and send nothing: "
            f"{report.guard.explanation(proceed_command('manual', None))}"
        )
    lines += [f"accepted by --accept-exits: {trip.describe()}" for trip in report.guard.accepted]
    lines += [
        f"  {_sample_label(item)}: {json.dumps(item['body'], ensure_ascii=False)}"
        for item in report.sample
    ]
    return lines


def _sample_label(item: dict[str, Any]) -> str:
    """`would send` or `would skip`, with the note of the body (why it is skipped, what
    was left out of it)."""
    verb = "would skip" if item["status"] == "skipped" else "would send"
    return f"{verb} ({item['note']})" if item["note"] else verb
