"""Reading sync history back (SPEC §4 `history`, `show`, `user`, `account`) as plain
dicts.

Every time is ISO 8601 UTC; every dict is JSON-ready and is what `--json` prints.
Changes and deliveries name their `entity` (`contact` or `customer`); a customer's
`user_id` is its group_id.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from reconciler.errors import UsageError
from reconciler.pipeline.contact import NOTE_EMAIL, NOTE_LINKED_IN
from reconciler.state.causes import attempt_causes
from reconciler.state.schema import acked, changes, deliveries, sync_runs, updates

RUN_FIELDS = [c.name for c in sync_runs.columns]


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with a `Z`, as every time in the JSON output."""
    return moment.isoformat().replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    return iso(value) if isinstance(value, datetime) else value


def _row(row: Any) -> dict[str, Any]:
    return {key: _jsonable(value) for key, value in row._mapping.items()}


def _value(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def list_runs(state: Connection, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs first."""
    rows = state.execute(select(sync_runs).order_by(sync_runs.c.id.desc()).limit(limit))
    return [_row(row) for row in rows]


def show_run(state: Connection, run_id: int) -> dict[str, Any]:
    """One run with all its changes and delivery attempts; UsageError if unknown."""
    run = run_summary(state, run_id)
    run.update(run_left_out(state, run_id))
    run["causes"] = run_causes(state, run_id)
    run["changes"] = run_changes(state, run_id)
    run["deliveries"] = run_deliveries(state, run_id)
    return run


def run_left_out(state: Connection, run_id: int) -> dict[str, int]:
    """How many updates planned by a run left out an email or a linked_in that failed
    validation, counted from their notes (SPEC §5)."""
    counts = {"emails_left_out": 0, "linked_in_left_out": 0}
    planned = select(changes.c.update_id).where(changes.c.run_id == run_id)
    for (note,) in state.execute(
        select(updates.c.note).where(updates.c.id.in_(planned), updates.c.note.is_not(None))
    ):
        counts["emails_left_out"] += NOTE_EMAIL in note
        counts["linked_in_left_out"] += NOTE_LINKED_IN in note
    return counts


def run_causes(state: Connection, run_id: int) -> list[dict[str, Any]]:
    """A run's attempts not acknowledged, grouped by cause (`causes.attempt_causes`)."""
    return attempt_causes(state, run_id)


def run_summary(state: Connection, run_id: int) -> dict[str, Any]:
    """The `sync_runs` row of one run; UsageError if unknown."""
    row = state.execute(select(sync_runs).where(sync_runs.c.id == run_id)).first()
    if row is None:
        raise UsageError(f"no run with id {run_id}; `reconciler history` lists them")
    return _row(row)


def run_changes(state: Connection, run_id: int, limit: int | None = None) -> list[dict[str, Any]]:
    """The (user, key) changes recorded by a run, with their update's id and status."""
    query = (
        select(
            updates.c.entity,
            changes.c.user_id,
            changes.c.key,
            changes.c.kind,
            changes.c.old_value,
            changes.c.new_value,
            updates.c.message_id,
            updates.c.status,
            updates.c.note,
        )
        .join(updates, updates.c.id == changes.c.update_id)
        .where(changes.c.run_id == run_id)
        .order_by(updates.c.entity.desc(), changes.c.user_id, changes.c.key)
        .limit(limit)
    )
    return [
        {**_row(c), "old_value": _value(c.old_value), "new_value": _value(c.new_value)}
        for c in state.execute(query)
    ]


def run_deliveries(
    state: Connection, run_id: int, limit: int | None = None, unacknowledged_only: bool = False
) -> list[dict[str, Any]]:
    """The HTTP attempts a run made, in the order they were recorded."""
    query = (
        select(
            updates.c.entity,
            updates.c.user_id,
            updates.c.message_id,
            deliveries.c.attempt,
            deliveries.c.sent_at,
            deliveries.c.status_code,
            deliveries.c.outcome,
            deliveries.c.latency_ms,
            deliveries.c.error,
        )
        .join(updates, updates.c.id == deliveries.c.update_id)
        .where(deliveries.c.run_id == run_id)
        .order_by(deliveries.c.id)
        .limit(limit)
    )
    if unacknowledged_only:
        query = query.where(deliveries.c.outcome != "acknowledged")
    return [_row(d) for d in state.execute(query)]


def run_totals(state: Connection, run_id: int) -> dict[str, int]:
    """How many changes and delivery attempts (and unacknowledged ones) a run recorded."""

    def count(table: Any, *where: Any) -> int:
        return int(
            state.execute(
                select(func.count()).select_from(table).where(table.c.run_id == run_id, *where)
            ).scalar_one()
        )

    return {
        "changes": count(changes),
        "deliveries": count(deliveries),
        "unacknowledged": count(deliveries, deliveries.c.outcome != "acknowledged"),
    }


def account_timeline(state: Connection, group_id: str) -> dict[str, Any]:
    """An account's acknowledged state per key (its fields as `@name`, ...) and every
    update made for it."""
    timeline = user_timeline(state, group_id, "customer")
    del timeline["user_id"]
    return {"group_id": group_id, **timeline}


def user_timeline(state: Connection, user_id: str, entity: str = "contact") -> dict[str, Any]:
    """A user's acknowledged state per key and every update made for them."""
    state_rows = state.execute(
        select(acked.c.key, acked.c.value, acked.c.acked_at)
        .where(acked.c.entity == entity, acked.c.user_id == user_id)
        .order_by(acked.c.key)
    )
    timeline = []
    for u in state.execute(
        select(updates)
        .where(updates.c.entity == entity, updates.c.user_id == user_id)
        .order_by(updates.c.id)
    ):
        timeline.append(
            {
                "run_id": u.run_id,
                "message_id": u.message_id,
                "status": u.status,
                "observed_at": _jsonable(u.observed_at),
                "settled_at": _jsonable(u.settled_at),
                "note": u.note,
                "changes": [
                    {
                        "key": c.key,
                        "old_value": _value(c.old_value),
                        "new_value": _value(c.new_value),
                    }
                    for c in state.execute(
                        select(changes).where(changes.c.update_id == u.id).order_by(changes.c.key)
                    )
                ],
                "deliveries": [
                    _row(d)
                    for d in state.execute(
                        select(
                            deliveries.c.run_id,
                            deliveries.c.attempt,
                            deliveries.c.sent_at,
                            deliveries.c.status_code,
                            deliveries.c.outcome,
                            deliveries.c.error,
                        )
                        .where(deliveries.c.update_id == u.id)
                        .order_by(deliveries.c.id)
                    )
                ],
            }
        )
    return {
        "user_id": user_id,
        "acknowledged": {
            r.key: {"value": _value(r.value), "acked_at": _jsonable(r.acked_at)} for r in state_rows
        },
        "timeline": timeline,
    }
