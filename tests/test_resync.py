"""`reconciler resync [--audience KEY]` (SPEC §6), through the command, on both backends."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from reconciler.state.schema import sync_runs, updates

from .conftest import Setup
from .helpers import custom
from .helpers import setup_cli as cli
from .receiver import Reply

OC = "order_completed_last_30_days"
HV = "high_value_users"
LTV = "lifetime_value"


def sent(setup: Setup) -> dict[str, dict[str, Any]]:
    """user_id → custom attributes of the one body each user got."""
    bodies = setup.receiver.bodies()
    assert len({b["user_id"] for b in bodies}) == len(bodies), "a user got two bodies"
    return {b["user_id"]: custom(b) for b in bodies}


def message_ids(setup: Setup) -> set[str]:
    return {b["message_id"] for b in setup.receiver.bodies()}


@pytest.fixture
def synced(setup: Setup, engine_of) -> Setup:
    """Four users, one first sync acknowledged; the receiver is cleared afterwards."""
    w = setup.warehouse
    for user in ("u1", "u2", "u3", "u4"):
        w.user(user, email=f"{user}@example.com")
    w.members("Order Completed Last 30 Days", "u1", "u2")
    w.members("High Value Users", "u2")
    w.trait("Lifetime Value", {"u1": 120, "u3": 9.5})
    setup.write()
    engine_of(setup)
    assert cli(setup, "sync").exit_code == 0
    setup.first_ids = message_ids(setup)  # type: ignore[attr-defined]
    setup.receiver.clear()
    return setup


def test_resync_sends_every_current_value_with_new_message_ids(synced):
    result = cli(synced, "resync")
    assert result.exit_code == 0, result.output
    assert sent(synced) == {
        "u1": {OC: True, LTV: 120},
        "u2": {OC: True, HV: True},
        "u3": {LTV: 9.5},
    }
    assert not message_ids(synced) & synced.first_ids


def test_resync_sends_false_to_acknowledged_members_now_absent(synced):
    synced.warehouse.members("High Value Users")
    assert cli(synced, "resync").exit_code == 0
    assert sent(synced)["u2"] == {OC: True, HV: False}


def test_sync_after_a_resync_sends_nothing(synced):
    assert cli(synced, "resync").exit_code == 0
    synced.receiver.clear()
    result = cli(synced, "sync", "--json")
    assert result.exit_code == 0
    assert synced.receiver.bodies() == []


def test_resync_of_one_audience_sends_only_that_key_to_unchanged_users(synced):
    result = cli(synced, "resync", "--audience", HV)
    assert result.exit_code == 0, result.output
    assert sent(synced) == {"u2": {HV: True}}
    assert not message_ids(synced) & synced.first_ids


def test_resync_of_one_audience_includes_members_who_left(synced):
    synced.warehouse.members("High Value Users", "u4")
    assert cli(synced, "resync", "--audience", HV).exit_code == 0
    assert sent(synced) == {"u2": {HV: False}, "u4": {HV: True}}


def test_resync_is_recorded_with_trigger_full_resync_and_its_key(synced, engine_of):
    cli(synced, "resync", "--audience", HV)
    cli(synced, "resync")
    with engine_of(synced).connect() as conn:
        runs = conn.execute(
            select(sync_runs.c.trigger, sync_runs.c.resync_key).order_by(sync_runs.c.id)
        ).all()
    assert [tuple(r) for r in runs] == [("manual", None), ("full_resync", HV), ("full_resync", "*")]


def test_two_resyncs_use_different_message_ids(synced):
    cli(synced, "resync")
    first = message_ids(synced)
    synced.receiver.clear()
    cli(synced, "resync")
    assert len(message_ids(synced)) == len(first) and not message_ids(synced) & first


def test_resync_resends_an_update_that_was_rejected(synced, engine_of):
    synced.warehouse.trait("Lifetime Value", {"u1": 120, "u3": 10})
    synced.receiver.respond = lambda _n, body: Reply(400, "invalid contact")
    assert cli(synced, "sync").exit_code == 1
    synced.receiver.respond = lambda _n, body: Reply(200)
    synced.receiver.clear()
    assert cli(synced, "sync").exit_code == 0 and synced.receiver.bodies() == []
    assert cli(synced, "resync", "--audience", LTV).exit_code == 0
    assert sent(synced) == {"u1": {LTV: 120}, "u3": {LTV: 10}}
    with engine_of(synced).connect() as conn:
        statuses = (
            conn.execute(
                select(updates.c.status).where(updates.c.user_id == "u3").order_by(updates.c.id)
            )
            .scalars()
            .all()
        )
    assert statuses == ["sent", "superseded", "sent"]


def test_unacknowledged_resync_update_is_resent_by_the_next_sync_with_its_id(synced):
    synced.receiver.respond = lambda _n, body: Reply(503 if body["user_id"] == "u3" else 200)
    text = synced.config_text(destination="max_attempts = 1")
    (synced.tmp_path / "reconciler.toml").write_text(text)
    assert cli(synced, "resync").exit_code == 1
    (earlier,) = [b for b in synced.receiver.bodies() if b["user_id"] == "u3"]
    synced.receiver.respond = lambda _n, body: Reply(200)
    synced.receiver.clear()
    assert cli(synced, "sync").exit_code == 0
    (again,) = synced.receiver.bodies()
    assert (again["message_id"], again["timestamp"]) == (
        earlier["message_id"],
        earlier["timestamp"],
    )


def test_resync_of_an_unknown_key_exits_2_listing_the_known_keys(synced, engine_of):
    result = cli(synced, "resync", "--audience", "nope")
    assert result.exit_code == 2
    assert 'unknown key "nope"' in result.stderr
    for key in (OC, HV, LTV):
        assert key in result.stderr
    assert synced.receiver.bodies() == []
    with engine_of(synced).connect() as conn:
        assert len(conn.execute(select(sync_runs)).all()) == 1  # the first sync only
