"""Pruning run history: old runs go, what the next diff or a re-send needs stays."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select, update

from reconciler.cli import main
from reconciler.run import RunResult, Seams, sync
from reconciler.state.lock import RunLock
from reconciler.state.retention import prune
from reconciler.state.schema import ack_versions, acked, changes, deliveries, sync_runs, updates

from .conftest import Setup
from .receiver import Reply

FAR_FUTURE = datetime(2999, 1, 1, tzinfo=UTC)  # a cutoff that makes every run old


def run(setup: Setup, engine: Engine, **config: Any) -> RunResult:
    return sync(setup.config(**config), engine, seams=Seams(backoff_initial=0.01))


def rows(engine: Engine, table: Any, *columns: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        query = select(*(columns or table.columns)).select_from(table)
        return sorted(tuple(r) for r in conn.execute(query))


def prune_all_before(engine: Engine, cutoff: datetime):
    with engine.begin() as conn:
        return prune(conn, cutoff)


def age(engine: Engine, run_id: int, days: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(sync_runs)
            .where(sync_runs.c.id == run_id)
            .values(started_at=datetime.now(UTC) - timedelta(days=days))
        )


def refuse(user: str, status: int):
    return lambda _n, body: Reply(status if body["user_id"] == user else 200)


@pytest.fixture
def people(setup: Setup) -> Setup:
    w = setup.warehouse
    w.members("High Value Users", "u1", "u2")
    w.trait("Lifetime Value", {"u1": 120, "u3": 9.5})
    return setup


def test_prune_keeps_live_updates_and_acknowledged_state(people, engine_of):
    engine, w, receiver = engine_of(people), people.warehouse, people.receiver
    run(people, engine)  # run 1: all sent
    w.trait("Lifetime Value", {"u1": 120, "u3": 10})
    receiver.respond = refuse("u3", 400)
    run(people, engine)  # run 2: u3 rejected
    w.members("High Value Users", "u1", "u2", "u4")
    receiver.respond = refuse("u4", 503)
    run(people, engine, destination="max_attempts = 1")  # run 3: u4 pending
    run(people, engine, destination="max_attempts = 1")  # run 4: still pending
    w.trait("Lifetime Value", {"u1": 130, "u3": 10})
    run(people, engine, destination="max_attempts = 1")  # run 5: u1 sent
    pending_id = next(b["message_id"] for b in receiver.bodies() if b["user_id"] == "u4")
    state_before = rows(engine, acked), rows(engine, ack_versions)

    pruned = prune_all_before(engine, FAR_FUTURE)

    assert [r[0] for r in rows(engine, sync_runs, sync_runs.c.id)] == [2, 3, 5]
    assert rows(engine, updates, updates.c.user_id, updates.c.status) == [
        ("u1", "sent"),
        ("u3", "rejected"),
        ("u4", "pending"),
    ]
    assert {r[0] for r in rows(engine, changes, changes.c.user_id)} == {"u1", "u3", "u4"}
    assert {r[0] for r in rows(engine, deliveries, deliveries.c.run_id)} == {5}
    assert (rows(engine, acked), rows(engine, ack_versions)) == state_before
    assert (pruned.runs, pruned.updates) == (2, 3)

    receiver.respond = lambda _n, _body: Reply(200)
    receiver.clear()
    run(people, engine)
    (body,) = receiver.bodies()  # the pending one, same id; the rejected one not
    assert (body["user_id"], body["message_id"]) == ("u4", pending_id)


def test_update_settled_after_the_cutoff_stays_with_its_run(people, engine_of):
    engine, receiver = engine_of(people), people.receiver
    receiver.respond = refuse("u3", 503)
    run(people, engine, destination="max_attempts = 1")  # run 1: u3 pending
    receiver.respond = lambda _n, _body: Reply(200)
    people.warehouse.members("High Value Users", "u1")
    second = run(people, engine)  # run 2: u3 sent, u2 exits
    with engine.connect() as conn:
        cutoff = conn.execute(
            select(sync_runs.c.started_at).where(sync_runs.c.id == second.run_id)
        ).scalar_one()
    prune_all_before(engine, cutoff)
    assert [r[0] for r in rows(engine, sync_runs, sync_runs.c.id)] == [1, 2]
    assert rows(engine, updates, updates.c.user_id, updates.c.run_id) == [("u2", 2), ("u3", 1)]
    with engine.connect() as conn:
        attempts = (
            conn.execute(
                select(deliveries.c.run_id)
                .join(updates, updates.c.id == deliveries.c.update_id)
                .where(updates.c.user_id == "u3")
            )
            .scalars()
            .all()
        )
    assert attempts == [2]


def test_the_newest_run_is_kept_so_run_ids_keep_increasing(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.warehouse.trait("Lifetime Value", {"u1": 1, "u3": 9.5})
    run(people, engine)
    prune_all_before(engine, FAR_FUTURE)
    assert [r[0] for r in rows(engine, sync_runs, sync_runs.c.id)] == [2]
    assert run(people, engine).run_id == 3


def test_recent_history_is_untouched(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.warehouse.trait("Lifetime Value", {"u1": 1})
    run(people, engine)
    before = [rows(engine, t) for t in (sync_runs, updates, changes, deliveries)]
    pruned = prune_all_before(engine, datetime.now(UTC) - timedelta(days=90))
    assert (pruned.runs, pruned.updates, pruned.changes, pruned.deliveries) == (0, 0, 0, 0)
    assert [rows(engine, t) for t in (sync_runs, updates, changes, deliveries)] == before


def test_a_run_prunes_history_older_than_keep_days_as_it_ends(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    age(engine, 1, days=91)
    people.warehouse.trait("Lifetime Value", {"u1": 1, "u3": 9.5})
    run(people, engine)
    assert [r[0] for r in rows(engine, sync_runs, sync_runs.c.id)] == [2]
    assert rows(engine, updates, updates.c.user_id, updates.c.run_id) == [("u1", 2)]


def test_keep_days_comes_from_the_config(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    age(engine, 1, days=8)
    people.warehouse.trait("Lifetime Value", {"u1": 1, "u3": 9.5})
    run(people, engine, extra="[history]\nkeep_days = 30\n")
    assert len(rows(engine, sync_runs, sync_runs.c.id)) == 2
    people.warehouse.trait("Lifetime Value", {"u1": 2, "u3": 9.5})
    run(people, engine, extra="[history]\nkeep_days = 7\n")
    assert [r[0] for r in rows(engine, sync_runs, sync_runs.c.id)] == [2, 3]


def test_prune_command_reports_what_it_deleted(people, engine_of):
    engine = engine_of(people)
    path = people.write()
    run(people, engine)
    people.warehouse.trait("Lifetime Value", {"u1": 1, "u3": 9.5})
    run(people, engine)
    age(engine, 1, days=3)
    result = CliRunner().invoke(
        main, ["prune", "--keep-days", "2", "--json", "--config", str(path)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"keep_days", "cutoff", "runs", "updates", "changes", "deliveries"}
    assert (data["keep_days"], data["runs"], data["updates"]) == (2, 1, 3)
    assert data["cutoff"].endswith("Z")
    text = CliRunner().invoke(main, ["prune", "--config", str(path)])
    assert text.exit_code == 0 and "pruned" in text.stdout and "0 runs" in text.stdout


def test_prune_command_waits_for_no_run(people, engine_of):
    engine = engine_of(people)
    path = people.write()
    with RunLock(engine):
        result = CliRunner().invoke(main, ["prune", "--config", str(path)])
    assert result.exit_code == 3 and "another run holds the lock" in result.stderr
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(sync_runs)).scalar_one() == 0
