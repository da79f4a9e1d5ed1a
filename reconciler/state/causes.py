"""Why updates were not acknowledged, grouped by cause with counts (SPEC §4).

Read back from the `deliveries` rows of a run, so a run's summary line, its
`sync_runs.error` and `reconciler show` say the same thing, whatever process recorded
the attempts:

    explain(state, run_id, pending)   `3775 pending: connection refused (3775)`;
                                      `42 rejected: 422 "email taken" (40), 401 (2)`
    attempt_causes(state, run_id)     every attempt not acknowledged, by cause (`show`)
    cause_of(status, outcome, error)  one attempt's cause, short: `503`, `timeout`,
                                      `422 "email taken"`, `connection refused`

An update counts under the cause of its last attempt in the run: `rejected` when that
attempt was a permanent rejection, `pending` when it was a retryable failure. Pending
updates the run never attempted (it was stopped, or lost its lock) count as `not sent`.
Causes are built from what `deliveries` already holds (status codes and redacted
excerpts), never from a URL; the caller still passes the text through its Redactor.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, text

MAX_CAUSES = 5  # causes named per group; the rest are summed as "other causes"
MAX_MESSAGE = 60  # characters of a response's message kept in a cause
NOT_SENT = "not sent"

# Transport failures, most specific first: (needle in the lower-cased error, cause).
_TRANSPORT = (
    ("connection refused", "connection refused"),
    ("errno 111", "connection refused"),
    ("connecttimeout", "connect timeout"),
    ("readtimeout", "read timeout"),
    ("writetimeout", "write timeout"),
    ("pooltimeout", "connection pool timeout"),
    ("server disconnected", "server disconnected without answering"),
    ("connection reset", "connection reset"),
    ("errno 104", "connection reset"),
    ("name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("temporary failure in name resolution", "host name not found"),
    ("getaddrinfo failed", "host name not found"),
    ("no address associated", "host name not found"),
    ("certificate verify failed", "TLS certificate not trusted"),
    ("network is unreachable", "network unreachable"),
    ("no route to host", "no route to host"),
    ("timed out", "timeout"),
    ("remoteprotocolerror", "protocol error"),
    ("localprotocolerror", "protocol error"),
    ("ssl", "TLS error"),
    ("connecterror", "connection failed"),
)
_EXCEPTION_NAME = re.compile(r"\b([A-Z][A-Za-z]*(?:Error|Timeout|Exception))\b")
_MESSAGE_KEYS = ("error", "message", "detail", "error_description", "title", "msg", "errors")
_QUOTED_MESSAGE = re.compile(r'"(?:error|message|detail|msg)"\s*:\s*"([^"\\]{1,200})')


def cause_of(status_code: int | None, outcome: str, error: str | None) -> str:
    """One attempt's cause: its status code and the gist of the response, or the kind of
    transport failure."""
    detail = error or ""
    if status_code is None:
        return _transport(detail)
    if outcome != "rejected":
        # A retryable answer: what it said follows `response: ` (after the retry decision).
        _, found, detail = detail.partition("response: ")
        if not found:
            return str(status_code)
    message = _gist(detail)
    return f'{status_code} "{message}"' if message else str(status_code)


def explain(
    state: Connection,
    run_id: int,
    pending: int,
    stopped_by: str | None = None,
    lock_lost: bool = False,
) -> str | None:
    """The updates a run left unacknowledged, grouped by cause; None when there are none.

    `pending` is how many updates were still pending when the run ended (some may not
    have been attempted); `stopped_by` names the signal that stopped the run, if any.
    """
    groups: dict[str, Counter[str]] = {"pending": Counter(), "rejected": Counter()}
    for outcome, status_code, error, count in state.execute(
        text("""
            SELECT d.outcome, d.status_code, d.error, COUNT(*)
            FROM deliveries AS d
            JOIN (SELECT MAX(id) AS id FROM deliveries WHERE run_id = :run
                  GROUP BY update_id) AS last ON last.id = d.id
            WHERE d.outcome <> 'acknowledged'
            GROUP BY d.outcome, d.status_code, d.error"""),
        {"run": run_id},
    ):
        group = "rejected" if outcome == "rejected" else "pending"
        groups[group][cause_of(status_code, outcome, error)] += int(count)
    never_attempted = pending - sum(groups["pending"].values())
    if never_attempted > 0:
        reason = (
            f"{NOT_SENT}: the run lost its lock"
            if lock_lost
            else f"{NOT_SENT} before the stop"
            if stopped_by
            else "not attempted"
        )
        groups["pending"][reason] += never_attempted
    parts = [
        f"{sum(counts.values())} {group}: {_listed(counts)}"
        for group, counts in groups.items()
        if counts
    ]
    if not parts:
        return None
    summary = "; ".join(parts)
    return f"stopped by {stopped_by}: {summary}" if stopped_by else summary


def attempt_causes(state: Connection, run_id: int) -> list[dict[str, Any]]:
    """Every attempt of a run that was not acknowledged, grouped by cause, most frequent
    first: `{"cause", "attempts", "updates"}` (updates: how many had such an attempt)."""
    attempts: Counter[str] = Counter()
    updates: dict[str, set[int]] = {}
    rows = state.execution_options(yield_per=10_000).execute(
        text("""
        SELECT status_code, outcome, error, update_id FROM deliveries
        WHERE run_id = :run AND outcome <> 'acknowledged'"""),
        {"run": run_id},
    )
    known: dict[tuple[Any, ...], str] = {}
    for status_code, outcome, error, update_id in rows:
        key = (status_code, outcome, error)
        cause = known.get(key)
        if cause is None:
            cause = known[key] = cause_of(status_code, outcome, error)
        attempts[cause] += 1
        updates.setdefault(cause, set()).add(update_id)
    return [
        {"cause": cause, "attempts": count, "updates": len(updates[cause])}
        for cause, count in attempts.most_common()
    ]


def _listed(counts: Counter[str]) -> str:
    """`connection refused (3775), 503 (2)`: the most frequent causes first."""
    ranked = counts.most_common()
    shown = [f"{cause} ({count})" for cause, count in ranked[:MAX_CAUSES]]
    rest = sum(count for _, count in ranked[MAX_CAUSES:])
    if rest:
        shown.append(f"other causes ({rest})")
    return ", ".join(shown)


def _transport(error: str) -> str:
    lowered = error.lower()
    for needle, cause in _TRANSPORT:
        if needle in lowered:
            return cause
    name = _EXCEPTION_NAME.search(error)
    if name:
        return name.group(1)
    return _short(error) or "no answer"


def _gist(body: str) -> str:
    """A response body's message, short and on one line; nothing for HTML pages."""
    body = body.strip()
    if not body or body.startswith("<"):
        return ""
    try:
        message = _message_in(json.loads(body))
    except ValueError:
        quoted = _QUOTED_MESSAGE.search(body)  # a JSON body cut at 500 characters
        message = quoted.group(1) if quoted else ("" if body[0] in "{[" else body)
    return _short(message)


def _message_in(document: Any) -> str:
    if isinstance(document, str):
        return document
    if isinstance(document, list):
        return _message_in(document[0]) if document else ""
    if isinstance(document, dict):
        for key in _MESSAGE_KEYS:
            value = document.get(key)
            if value:
                return _message_in(value)
    return ""


def _short(text: str) -> str:
    words = " ".join(text.split()).replace('"', "'")
    return words if len(words) <= MAX_MESSAGE else words[: MAX_MESSAGE - 3] + "..."


def join(*parts: str | None) -> str | None:
    """Parts of a run's error, in order, without the empty ones."""
    kept: Iterable[str] = (p for p in parts if p)
    return "; ".join(kept) or None
