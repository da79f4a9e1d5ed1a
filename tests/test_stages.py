"""The stages one at a time, on both backends: the workspace's tables, filled by hand
or by the stage before, then the diff and the plan read back as rows (issue 10)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, Engine, insert, select

from reconciler.config import Entry
from reconciler.pipeline import workspace
from reconciler.pipeline.diff import fill_diff, fill_run_keys
from reconciler.pipeline.plan import fill_plan, message_id
from reconciler.pipeline.snapshot import _group_profile
from reconciler.state.db import migrate, state_engine
from reconciler.state.schema import ack_versions, acked

T0 = datetime(2026, 11, 1, tzinfo=UTC)
HV = Entry("audience", "High Value", "high_value", "-")
LTV = Entry("trait", "Lifetime Value", "lifetime_value", "-")
SEATS = Entry("trait", "Seats", "seats", "-", entity="customer")


@pytest.fixture
def conn(state_url: str) -> Iterator[Connection]:
    engine: Engine = state_engine(state_url)
    migrate(engine)
    with engine.connect() as connection:
        workspace.create(connection)
        yield connection
        connection.rollback()
    engine.dispose()


def snapshot(conn: Connection, *rows: tuple[str, str, str, str]) -> None:
    """(entity, user_id, key, value) rows into `snap`, then the keys of the run."""
    conn.execute(
        insert(workspace.snap),
        [
            {"entity": entity, "user_id": user, "key": key, "value": value}
            for entity, user, key, value in rows
        ],
    )
    fill_run_keys(conn, [HV, LTV, SEATS], (), ())


def test_the_workspace_holds_every_table_the_stages_use(conn: Connection):
    names = {t.name for t in workspace.metadata.sorted_tables}
    assert names == {
        "snap",
        "profile_raw",
        "profile",
        "account_raw",
        "accounts",
        "run_keys",
        "uncertain",
        "diff",
        "kept",
        "plan",
    }
    for name in names:  # each exists, empty, on this connection
        assert conn.exec_driver_sql(f"SELECT COUNT(*) FROM {name}").scalar_one() == 0


def test_diff_rows_are_entries_exits_and_changed_values_of_both_entities(conn: Connection):
    conn.execute(
        insert(acked),
        [
            {
                "entity": "contact",
                "user_id": "u1",
                "key": "high_value",
                "value": "true",
                "update_id": 1,
                "acked_at": T0,
            },
            {
                "entity": "contact",
                "user_id": "u2",
                "key": "lifetime_value",
                "value": "5",
                "update_id": 1,
                "acked_at": T0,
            },
            {
                "entity": "customer",
                "user_id": "u2",
                "key": "seats",
                "value": "10",
                "update_id": 2,
                "acked_at": T0,
            },
        ],
    )
    snapshot(
        conn,
        ("contact", "u2", "high_value", "true"),
        ("contact", "u2", "lifetime_value", "5"),
        ("customer", "u2", "seats", "12"),
    )
    fill_diff(conn)
    rows = conn.execute(
        select(
            workspace.diff.c.entity,
            workspace.diff.c.user_id,
            workspace.diff.c.key,
            workspace.diff.c.new_value,
            workspace.diff.c.old_value,
        ).order_by(workspace.diff.c.entity, workspace.diff.c.user_id)
    ).all()
    assert [tuple(r) for r in rows] == [
        ("contact", "u1", "high_value", "false", "true"),  # left
        ("contact", "u2", "high_value", "true", None),  # entered; its trait is unchanged
        ("customer", "u2", "seats", "12", "10"),
    ]  # same id text, other entity


def test_plan_rows_carry_deterministic_ids_and_bodies_accounts_first(conn: Connection):
    conn.execute(insert(ack_versions), [{"entity": "contact", "user_id": "u1", "version": 3}])
    snapshot(conn, ("contact", "u1", "high_value", "true"), ("customer", "g1", "seats", "7"))
    fill_diff(conn)
    counts = fill_plan(conn, T0, None, custom_attributes=True)
    rows = conn.execute(select(workspace.plan).order_by(workspace.plan.c.seq)).all()
    assert [(r.seq, r.entity, r.user_id, r.version, r.status) for r in rows] == [
        (1, "customer", "g1", 0, "skipped"),  # no accounts row: no user_id, settled
        (2, "contact", "u1", 3, "pending"),
    ]
    assert rows[1].message_id == message_id("u1", 3, None, [("high_value", "true")])
    assert rows[0].message_id == message_id("g1", 0, None, [("seats", "7")], "customer")
    body = json.loads(rows[1].body)
    assert body["custom"] == [{"key": "high_value", "value": True}]
    assert "sent_at" not in body  # added per attempt
    assert (counts.users, counts.accounts, counts.entered, counts.skipped) == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "raw, profile",
    [
        ([("u1", '{"a": 1}'), ("u2", '{"a": 2}')], [("u1", '{"a": 1}'), ("u2", '{"a": 2}')]),
        (
            [("u1", '{"b": 1}'), ("u1", '{"a": 1}'), ("u2", "{}")],
            [("u1", '{"a": 1}'), ("u2", "{}")],
        ),
    ],
    ids=["one-row-per-user", "two-rows-the-first-in-json-order"],
)
def test_the_profile_has_one_row_per_user(conn: Connection, raw, profile):
    conn.execute(insert(workspace.profile_raw), [{"user_id": u, "data": d} for u, d in raw])
    _group_profile(conn)
    rows = conn.exec_driver_sql("SELECT user_id, data FROM profile ORDER BY user_id").all()
    assert [tuple(r) for r in rows] == profile
    workspace.create(conn)  # the next run on this connection finds both tables, empty
    for name in ("profile_raw", "profile"):
        assert conn.exec_driver_sql(f"SELECT COUNT(*) FROM {name}").scalar_one() == 0
