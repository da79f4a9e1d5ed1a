"""The core pipeline on both state backends: snapshot → diff → send → acknowledge."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from reconciler.run import RunResult, Seams, dry_run, sync
from reconciler.state.schema import acked, sync_runs, updates

from .conftest import Setup
from .receiver import Reply

OC = "order_completed_last_30_days"
HV = "high_value_users"
LTV = "lifetime_value"


def run(setup: Setup, engine: Any, **config: Any) -> RunResult:
    return sync(setup.config(**config), engine, seams=Seams(backoff_initial=0.01))


def custom(body: dict[str, Any]) -> dict[str, Any]:
    return {item["key"]: item["value"] for item in body.get("custom", [])}


@pytest.fixture
def people(setup: Setup) -> Setup:
    w = setup.warehouse
    for user in ("u1", "u2", "u3", "u4"):
        w.user(user, email=f"{user}@example.com", first_name=user.upper())
    w.members("Order Completed Last 30 Days", "u1", "u2")
    w.members("High Value Users", "u2")
    w.trait("Lifetime Value", {"u1": 120, "u3": 9.5})
    return setup


def test_first_run_sends_true_for_members_and_trait_values(people, engine_of):
    result = run(people, engine_of(people))
    assert result.status == "succeeded"
    got = {user: custom(bodies[0]) for user, bodies in people.receiver.by_user().items()}
    assert got == {"u1": {OC: True, LTV: 120}, "u2": {OC: True, HV: True}, "u3": {LTV: 9.5}}


def test_body_follows_send_contact_wire_format(people, engine_of):
    run(people, engine_of(people))
    request = next(r for r in people.receiver.requests if r.body["user_id"] == "u2")
    assert request.path == "/hook/s3cr3t-token"
    assert request.headers["Content-Type"] == "application/json"
    body = request.body
    assert set(body) == {
        "type",
        "message_id",
        "timestamp",
        "sent_at",
        "user_id",
        "email",
        "first_name",
        "custom",
    }
    assert body["type"] == "Send Contact"
    assert body["custom"] == [{"key": HV, "value": True}, {"key": OC, "value": True}]
    for stamp in (body["timestamp"], body["sent_at"]):
        assert len(stamp) == 24 and stamp.endswith("Z") and stamp[19] == "."


def test_second_run_without_changes_sends_nothing(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.receiver.clear()
    result = run(people, engine)
    assert people.receiver.bodies() == []
    assert (result.users_changed, result.sent, result.status) == (0, 0, "succeeded")


@pytest.mark.parametrize(
    "change, user, expected",
    [
        (lambda w: w.members("High Value Users", "u2", "u4"), "u4", {HV: True}),
        (lambda w: w.members("Order Completed Last 30 Days", "u1"), "u2", {OC: False}),
        (lambda w: w.trait("Lifetime Value", {"u1": 150, "u3": 9.5}), "u1", {LTV: 150}),
    ],
    ids=["enter", "exit", "trait-change"],
)
def test_one_change_sends_exactly_one_body_for_that_user(people, engine_of, change, user, expected):
    engine = engine_of(people)
    run(people, engine)
    people.receiver.clear()
    change(people.warehouse)
    run(people, engine)
    bodies = people.receiver.bodies()
    assert len(bodies) == 1
    assert bodies[0]["user_id"] == user and custom(bodies[0]) == expected


def test_user_gets_one_update_carrying_all_changed_keys(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.receiver.clear()
    people.warehouse.members("High Value Users")
    people.warehouse.members("Order Completed Last 30 Days", "u1")
    people.warehouse.trait("Lifetime Value", {"u1": 120, "u2": 1, "u3": 9.5})
    run(people, engine)
    assert [custom(b) for b in people.receiver.bodies()] == [{OC: False, HV: False, LTV: 1}]


def test_leaving_and_rejoining_between_runs_is_no_change(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.receiver.clear()
    people.warehouse.members("High Value Users")
    people.warehouse.members("High Value Users", "u2")
    run(people, engine)
    assert people.receiver.bodies() == []


def test_enter_exit_enter_get_three_different_message_ids(people, engine_of):
    engine = engine_of(people)
    ids = []
    for members in (("u2", "u4"), ("u2",), ("u2", "u4")):
        people.warehouse.members("High Value Users", *members)
        people.receiver.clear()
        run(people, engine)
        ids += [b["message_id"] for b in people.receiver.bodies() if b["user_id"] == "u4"]
    assert len(ids) == 3 and len(set(ids)) == 3


def test_dry_run_sends_and_keeps_nothing(people, engine_of):
    engine = engine_of(people)
    report = dry_run(people.config(), engine)
    assert (report.counts.users, report.counts.entered, report.counts.traits_changed) == (3, 3, 2)
    assert people.receiver.bodies() == []
    with engine.connect() as conn:
        for table in (sync_runs, updates, acked):
            assert conn.execute(select(table)).all() == []
    assert {s["body"]["user_id"] for s in report.sample} == {"u1", "u2", "u3"}


def test_sync_runs_row_counts_what_happened(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.warehouse.members("High Value Users", "u4")  # u2 exits, u4 enters
    people.warehouse.trait("Lifetime Value", {"u1": 121, "u3": 9.5})
    result = run(people, engine)
    with engine.connect() as conn:
        row = conn.execute(select(sync_runs).where(sync_runs.c.id == result.run_id)).one()
    assert row.trigger == "manual" and row.status == "succeeded"
    assert (
        row.users_seen,
        row.users_changed,
        row.entered,
        row.exited,
        row.traits_changed,
        row.sent,
        row.failed,
        row.skipped,
    ) == (4, 3, 1, 1, 1, 3, 0, 0)
    assert row.finished_at >= row.started_at


def test_without_custom_attributes_a_body_with_nothing_of_interest_is_skipped(setup, engine_of):
    setup.warehouse.user("u1", email="u1@example.com")
    setup.warehouse.members("High Value Users", "u1", "u2")  # u2 has no profile row
    engine = engine_of(setup)
    result = run(setup, engine, destination="custom_attributes = false")
    assert [b["user_id"] for b in setup.receiver.bodies()] == ["u1"]
    assert "custom" not in setup.receiver.bodies()[0]
    assert (result.skipped, result.sent, result.status) == (1, 1, "succeeded")
    with engine.connect() as conn:
        skipped = conn.execute(select(updates).where(updates.c.user_id == "u2")).one()
        assert skipped.status == "skipped" and "5 keys or fewer" in skipped.note
        assert conn.execute(select(acked.c.value).where(acked.c.user_id == "u2")).scalar() == "true"
    setup.receiver.clear()
    assert run(setup, engine, destination="custom_attributes = false").users_changed == 0


def test_invalid_email_is_left_out_and_the_reason_recorded(setup, engine_of):
    setup.warehouse.user("u1", email="not an email", first_name="Ann")
    setup.warehouse.members("High Value Users", "u1")
    engine = engine_of(setup)
    run(setup, engine)
    (body,) = setup.receiver.bodies()
    assert "email" not in body and body["first_name"] == "Ann"
    with engine.connect() as conn:
        assert "email" in conn.execute(select(updates.c.note)).scalar_one()


def test_company_is_sent_only_with_an_id_and_as_a_string(setup, engine_of):
    setup.warehouse.user("u1", company_id=42, company_name="Acme")
    setup.warehouse.user("u2", company_name="No Id Inc")
    setup.warehouse.members("High Value Users", "u1", "u2")
    run(setup, engine_of(setup))
    by_user = {b["user_id"]: b for b in setup.receiver.bodies()}
    assert by_user["u1"]["company"] == {"id": "42", "name": "Acme"}
    assert "company" not in by_user["u2"]


def test_unacknowledged_update_is_resent_with_same_id_and_timestamp(people, engine_of):
    engine = engine_of(people)
    people.receiver.respond = lambda n, body: Reply(503 if body["user_id"] == "u3" else 200)
    first = run(people, engine, destination="max_attempts = 2")
    assert (first.status, first.failed, first.pending) == ("partial", 1, 1)
    assert first.exit_status == 1
    earlier = [b for b in people.receiver.bodies() if b["user_id"] == "u3"]
    people.receiver.respond = lambda n, body: Reply(200)
    people.receiver.clear()
    second = run(people, engine)
    (resent,) = people.receiver.bodies()
    assert resent["message_id"] == earlier[0]["message_id"]
    assert resent["timestamp"] == earlier[0]["timestamp"]
    assert (second.sent, second.pending, second.status) == (1, 0, "succeeded")


def test_pending_update_is_replaced_when_state_changes_in_between(people, engine_of):
    engine = engine_of(people)
    people.receiver.respond = lambda n, body: Reply(503 if body["user_id"] == "u3" else 200)
    run(people, engine, destination="max_attempts = 1")
    people.receiver.respond = lambda n, body: Reply(200)
    people.receiver.clear()
    people.warehouse.trait("Lifetime Value", {"u1": 120, "u3": 11})
    run(people, engine)
    (body,) = people.receiver.bodies()
    assert body["user_id"] == "u3" and custom(body) == {LTV: 11}


@pytest.mark.parametrize(
    "reply, resent",
    [
        (Reply(503), []),  # turned away: ChartMogul still has the acked state
        (Reply(429), []),
        (Reply(500), [{HV: False}]),  # may have been applied: send the current value
        (Reply(drop=True), [{HV: False}]),  # no answer: the same
    ],
    ids=["503", "429", "500", "dropped"],
)
def test_pending_update_superseded_by_the_acknowledged_state(people, engine_of, reply, resent):
    """Nothing is sent back, unless the superseded update may have reached ChartMogul."""
    engine = engine_of(people)
    run(people, engine)
    people.warehouse.members("High Value Users", "u2", "u4")
    people.receiver.respond = lambda n, body: reply
    run(people, engine, destination="max_attempts = 1")
    people.receiver.respond = lambda n, body: Reply(200)
    people.receiver.clear()
    people.warehouse.members("High Value Users", "u2")
    result = run(people, engine)
    assert [custom(b) for b in people.receiver.bodies()] == resent
    assert all(b["user_id"] == "u4" for b in people.receiver.bodies())
    assert result.pending == 0


def test_rejected_update_is_not_resent_until_state_changes(people, engine_of):
    engine = engine_of(people)
    people.receiver.respond = lambda n, body: (
        Reply(400, "bad contact " + "x" * 600) if body["user_id"] == "u3" else Reply(200)
    )
    first = run(people, engine)
    assert (first.failed, first.status) == (1, "partial")
    with engine.connect() as conn:
        rejected = conn.execute(select(updates).where(updates.c.user_id == "u3")).one()
    assert rejected.status == "rejected" and rejected.last_status_code == 400
    assert rejected.last_error == ("bad contact " + "x" * 600)[:500]
    people.receiver.clear()
    people.receiver.respond = lambda n, body: Reply(200)
    assert run(people, engine).exit_status == 0
    assert people.receiver.bodies() == []
    people.warehouse.trait("Lifetime Value", {"u1": 120, "u3": 10})
    run(people, engine)
    assert [custom(b) for b in people.receiver.bodies()] == [{LTV: 10}]


def test_renamed_entry_retires_old_key_and_first_syncs_new_one(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.receiver.clear()
    people.warehouse.execute(
        "UPDATE members SET audience = 'Big Spenders' WHERE audience = 'High Value Users'"
    )
    run(people, engine, audiences=("Order Completed Last 30 Days", "Big Spenders"))
    assert [(b["user_id"], custom(b)) for b in people.receiver.bodies()] == [
        ("u2", {"big_spenders": True})
    ]


def test_removed_audience_and_vanished_trait_send_nothing(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.receiver.clear()
    people.warehouse.trait("Lifetime Value", {"u1": 120})
    run(people, engine, audiences=("Order Completed Last 30 Days",))
    assert people.receiver.bodies() == []


def test_explicit_key_keeps_the_old_key_across_a_rename(people, engine_of):
    engine = engine_of(people)
    run(people, engine)
    people.receiver.clear()
    text = people.config_text().replace(
        'name = "High Value Users"', 'name = "VIPs"\nkey = "high_value_users"'
    )
    (people.tmp_path / "reconciler.toml").write_text(text)
    from reconciler.config import load_config

    sync(load_config(people.tmp_path / "reconciler.toml", env={}), engine)
    assert people.receiver.bodies() == []


def test_duplicate_audience_rows_collapse_and_blank_user_ids_are_counted(setup, engine_of):
    setup.warehouse.members("High Value Users", "u1", "u1", "", None)
    result = run(setup, engine_of(setup))
    assert [b["user_id"] for b in setup.receiver.bodies()] == ["u1"]
    assert result.rows_ignored == 2


def test_trait_with_two_values_for_one_user_fails_that_entry_only(people, engine_of):
    people.warehouse.execute("INSERT INTO traits VALUES ('Lifetime Value', 'u1', 7)")
    result = run(people, engine_of(people))
    assert result.status == "partial" and result.exit_status == 1
    assert result.error is not None
    assert 'trait "Lifetime Value"' in result.error and '"u1"' in result.error
    assert all(LTV not in custom(b) for b in people.receiver.bodies())
    assert {b["user_id"] for b in people.receiver.bodies()} == {"u1", "u2"}


def test_trait_values_keep_their_json_type(setup, engine_of):
    setup.warehouse.trait("Lifetime Value", {"i": 3, "f": 2.5, "t": "gold", "n": None})
    run(setup, engine_of(setup))
    got = {b["user_id"]: custom(b)[LTV] for b in setup.receiver.bodies()}
    assert got == {"i": 3, "f": 2.5, "t": "gold"}
    assert type(got["i"]) is int
