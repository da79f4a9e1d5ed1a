"""A real run makes its plan durable page by page as the sender draws it (planning.py).

Every request must carry an update already committed as pending and marked in flight;
the first request must leave before the whole plan is written; a run stopped, or
failed, part way loses nothing: the next run sends the rest with the same ids.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

import reconciler.pipeline.planning as planning
import reconciler.state.ledger as ledger
from reconciler.errors import RunFailed
from reconciler.pipeline.plan import FIRST_PAGE_USERS
from reconciler.run import Seams, sync
from reconciler.state.schema import sync_runs, updates

from .conftest import Setup
from .receiver import Reply

USERS = FIRST_PAGE_USERS * 7  # four pages: 50, 100, 200 and the last 0 < n <= 400
AUDIENCE = "Order Completed Last 30 Days"


@pytest.fixture
def crowd(setup: Setup) -> Setup:
    users = [f"u{n:04d}" for n in range(USERS)]
    for user in users:
        setup.warehouse.user(user, email=f"{user}@example.com")
    setup.warehouse.members(AUDIENCE, *users)
    return setup


def _config(setup: Setup) -> Any:
    return setup.config(audiences=(AUDIENCE,), traits=())


def test_every_request_carries_an_update_committed_and_in_flight(crowd, engine_of):
    engine = engine_of(crowd)
    seen: list[tuple[str, bool]] = []

    def respond(_number: int, body: dict[str, Any]) -> Reply:
        with engine.connect() as conn:  # what a crash at this moment would leave
            row = conn.execute(
                select(updates.c.status, updates.c.in_flight_since).where(
                    updates.c.message_id == body["message_id"]
                )
            ).one_or_none()
        seen.append(
            (body["user_id"], row is not None and row[0] == "pending" and row[1] is not None)
        )
        return Reply()

    crowd.receiver.respond = respond
    result = sync(_config(crowd), engine, seams=Seams(backoff_initial=0.01))
    assert (result.status, result.sent) == ("succeeded", USERS)
    assert sorted(user for user, _ in seen) == sorted(f"u{n:04d}" for n in range(USERS))
    assert [user for user, durable in seen if not durable] == []


def test_the_first_request_leaves_before_the_whole_plan_is_written(crowd, engine_of):
    engine = engine_of(crowd)
    written_at_first: list[int] = []

    def respond(number: int, _body: dict[str, Any]) -> Reply:
        if number == 1:
            with engine.connect() as conn:
                written_at_first.append(
                    conn.execute(select(func.count()).select_from(updates)).scalar_one()
                )
        return Reply()

    crowd.receiver.respond = respond
    result = sync(_config(crowd), engine, seams=Seams(backoff_initial=0.01))
    assert result.sent == USERS
    # At most the first two pages exist when the first request arrives: the sender
    # may have drawn the second while the first request was on its way.
    assert written_at_first and written_at_first[0] <= 3 * FIRST_PAGE_USERS < USERS
    with engine.connect() as conn:  # the counts were recorded from the diff, up front
        row = conn.execute(select(sync_runs.c.users_changed, sync_runs.c.entered)).one()
    assert tuple(row) == (USERS, USERS)


def test_a_run_stopped_part_way_leaves_the_rest_to_the_next_with_the_same_ids(crowd, engine_of):
    engine = engine_of(crowd)
    seams = Seams(backoff_initial=0.01)
    # The sender takes up to 128 jobs ahead: pages one and two (150 updates). Stopping
    # at the tenth request, before 22 results came back, so the third page is never
    # drawn, whatever the threads' timing.
    stop_after = 10

    def respond(number: int, _body: dict[str, Any]) -> Reply:
        if number == stop_after:
            seams.stop.set()
        return Reply()

    crowd.receiver.respond = respond
    config = _config(crowd)
    first = sync(config, engine, seams=seams)
    assert first.status == "partial"
    assert stop_after <= first.sent < USERS
    with engine.connect() as conn:
        written = dict(conn.execute(select(updates.c.user_id, updates.c.message_id)).all())
    assert len(written) < USERS  # the rest was never planned

    crowd.receiver.respond = lambda _n, _b: Reply()
    second = sync(config, engine, seams=Seams(backoff_initial=0.01))
    assert second.status == "succeeded"
    bodies = crowd.receiver.bodies()
    assert {b["user_id"] for b in bodies} == {f"u{n:04d}" for n in range(USERS)}
    # Whatever the first run had written is sent with its own id, never a new one.
    assert all(b["message_id"] == written[b["user_id"]] for b in bodies if b["user_id"] in written)
    assert all(v is True for v in crowd.receiver.holds().values() for v in v.values())


def test_a_database_error_on_a_later_page_fails_the_run_and_loses_nothing(
    crowd, engine_of, monkeypatch
):
    engine = engine_of(crowd)
    real = ledger.commit_page
    calls = []

    def failing(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 2:
            raise OperationalError("INSERT INTO updates", {}, Exception("disk I/O error"))
        return real(*args)

    monkeypatch.setattr(planning, "commit_page", failing)
    config = _config(crowd)
    with pytest.raises(RunFailed, match="disk I/O error"):
        sync(config, engine, seams=Seams(backoff_initial=0.01))
    first_bodies = crowd.receiver.bodies()
    assert len(first_bodies) == FIRST_PAGE_USERS  # the first page was sent and recorded
    with engine.connect() as conn:
        statuses = conn.execute(select(updates.c.status, func.count()).group_by(updates.c.status))
        assert dict(statuses.all()) == {"sent": FIRST_PAGE_USERS}
        run = conn.execute(select(sync_runs.c.status, sync_runs.c.sent)).one()
    assert tuple(run) == ("failed", FIRST_PAGE_USERS)

    monkeypatch.setattr(planning, "commit_page", real)
    crowd.receiver.clear()
    assert sync(config, engine, seams=Seams(backoff_initial=0.01)).sent == USERS - FIRST_PAGE_USERS
    sent_again = {b["user_id"] for b in crowd.receiver.bodies()}
    assert sent_again.isdisjoint(b["user_id"] for b in first_bodies)
    assert len(sent_again) == USERS - FIRST_PAGE_USERS
