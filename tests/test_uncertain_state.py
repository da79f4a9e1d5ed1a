"""Uncertain keys (SPEC §6) stage by stage, on both backends: the diff SQL, the ledger
moves that mark and clear them, the migration that carries old state over, retention.

Each test seeds the state tables directly (`acked`, `updates`, `changes`,
`uncertain_keys`, and the run's temp `snap`), runs one stage, and reads the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, Engine, insert, select, update

from reconciler.config import Entry
from reconciler.delivery.retry import AttemptRecord
from reconciler.pipeline.diff import fill_diff, fill_run_keys
from reconciler.pipeline.snapshot import create_temp_tables
from reconciler.state.db import alembic_config, migrate, migration_connection, state_engine
from reconciler.state.ledger import (
    acknowledge,
    mark_left_in_flight,
    record_deliveries,
    start_run,
)
from reconciler.state.retention import prune
from reconciler.state.schema import acked, changes, sync_runs, uncertain_keys, updates

A, B, LTV = "audience_a", "audience_b", "lifetime_value"
ENTRIES = {
    A: Entry("audience", "Audience A", A, "-"),
    B: Entry("audience", "Audience B", B, "-"),
    LTV: Entry("trait", "Lifetime Value", LTV, "-"),
}
T0 = datetime(2026, 11, 1, tzinfo=UTC)
TRUE, FALSE = "true", "false"


@pytest.fixture
def engine(state_url: str) -> Iterator[Engine]:
    engine = state_engine(state_url)
    migrate(engine)
    yield engine
    engine.dispose()


@dataclass
class Seed:
    """Writes state rows in one connection (the caller's transaction)."""

    conn: Connection
    run_id: int = 0

    def run(self) -> int:
        self.run_id = start_run(self.conn, "manual", T0)
        return self.run_id

    def ack(self, user: str, key: str, value: str) -> None:
        self.conn.execute(
            insert(acked).values(user_id=user, key=key, value=value, update_id=0, acked_at=T0)
        )

    def update(
        self,
        user: str,
        status: str,
        values: dict[str, str],
        *,
        in_flight: bool = False,
        maybe: bool = False,
        run_id: int | None = None,
    ) -> int:
        run_id = run_id or self.run_id or self.run()
        number = (
            self.conn.execute(select(updates.c.id).order_by(updates.c.id.desc())).scalars().first()
            or 0
        )
        result = self.conn.execute(
            insert(updates).values(
                message_id=f"m{number + 1}",
                user_id=user,
                version=0,
                run_id=run_id,
                observed_at=T0,
                status=status,
                body="{}",
                attempts=0,
                in_flight_since=T0 if in_flight else None,
                maybe_delivered=maybe,
            )
        )
        assert result.inserted_primary_key is not None
        update_id = int(result.inserted_primary_key[0])
        for key, value in values.items():
            self.conn.execute(
                insert(changes).values(
                    update_id=update_id,
                    run_id=run_id,
                    user_id=user,
                    key=key,
                    kind=ENTRIES[key].kind,
                    old_value=None,
                    new_value=value,
                )
            )
        return update_id

    def mark(self, user: str, key: str, update_id: int = 0) -> None:
        self.conn.execute(
            insert(uncertain_keys).values(user_id=user, key=key, update_id=update_id, since=T0)
        )


def marks(conn: Connection) -> list[tuple[str, str]]:
    return sorted((r.user_id, r.key) for r in conn.execute(select(uncertain_keys)))


# --- the diff ---------------------------------------------------------------------------


def diff(
    conn: Connection,
    snap: list[tuple[str, str, str]],
    *,
    keys: tuple[str, ...] = (A, B, LTV),
    failed: tuple[str, ...] = (),
    resync: tuple[str, ...] = (),
) -> tuple[list[tuple[Any, ...]], list[int]]:
    """Run the diff over `snap` rows; return its rows and the kept update ids."""
    create_temp_tables(conn)
    if snap:
        mark = "?" if conn.dialect.name == "sqlite" else "%s"
        conn.exec_driver_sql(
            f"INSERT INTO snap (user_id, key, value) VALUES ({mark}, {mark}, {mark})", snap
        )
    conn.exec_driver_sql("CREATE INDEX snap_user_key ON snap (user_id, key, value)")
    fill_run_keys(conn, [ENTRIES[k] for k in keys if k not in failed], failed, resync)
    fill_diff(conn)
    rows = conn.exec_driver_sql(
        "SELECT user_id, key, new_value, old_value, forced FROM diff ORDER BY user_id, key"
    ).all()
    kept = conn.exec_driver_sql("SELECT update_id FROM kept ORDER BY update_id").scalars().all()
    return [tuple(r) for r in rows], list(kept)


# (acked, uncertain keys, snapshot rows, expected diff rows (key, new, old)) for user u1
Case = tuple[dict[str, str], list[str], dict[str, str], list[tuple[str, str, str | None]]]
CASES: dict[str, Case] = {
    "trait back at the acknowledged value": (
        {LTV: "100"},
        [LTV],
        {LTV: "100"},
        [(LTV, "100", "100")],
    ),
    "trait at the acknowledged value, certain": ({LTV: "100"}, [], {LTV: "100"}, []),
    "trait changed and uncertain: one row": (
        {LTV: "100"},
        [LTV],
        {LTV: "300"},
        [(LTV, "300", "100")],
    ),
    "trait without a value sends nothing": ({LTV: "100"}, [LTV], {}, []),
    "trait never acknowledged, without a value": ({}, [LTV], {}, []),
    "member acknowledged as one": ({A: TRUE}, [A], {A: TRUE}, [(A, TRUE, TRUE)]),
    "member never acknowledged: one row": ({}, [A], {A: TRUE}, [(A, TRUE, None)]),
    "non-member never acknowledged": ({}, [A], {}, [(A, FALSE, None)]),
    "non-member acknowledged as one": ({A: FALSE}, [A], {}, [(A, FALSE, FALSE)]),
    "non-member acknowledged as a member: one row": ({A: TRUE}, [A], {}, [(A, FALSE, TRUE)]),
    "non-member acknowledged as one, certain": ({A: FALSE}, [], {}, []),
}


@pytest.mark.parametrize("case", CASES)
def test_diff_sends_each_uncertain_keys_current_value_whenever_it_has_one(engine, case):
    acked_values, uncertain, snap, expected = CASES[case]
    with engine.begin() as conn:
        seed = Seed(conn)
        for key, value in acked_values.items():
            seed.ack("u1", key, value)
        for key in uncertain:
            seed.mark("u1", key)
        seed.ack("u2", LTV, "100")  # another user, untouched: never in the diff
        rows, _ = diff(conn, [("u1", k, v) for k, v in snap.items()] + [("u2", LTV, "100")])
    assert rows == [("u1", key, new, old, 0) for key, new, old in expected]


@pytest.mark.parametrize("where", ["failed", "retired"])
def test_an_uncertain_key_whose_entry_failed_or_left_the_config_sends_nothing(engine, where):
    with engine.begin() as conn:
        seed = Seed(conn)
        seed.ack("u1", LTV, "100")
        seed.mark("u1", LTV)
        seed.mark("u1", A)
        snap = [("u1", LTV, "100")]
        if where == "failed":
            rows, _ = diff(conn, snap, failed=(LTV, A))
        else:
            rows, _ = diff(conn, snap, keys=(B,))
        assert rows == []
        assert marks(conn) == [("u1", A), ("u1", LTV)]  # the diff never clears a mark


def test_a_resync_sends_an_uncertain_keys_value_once_as_forced(engine):
    with engine.begin() as conn:
        seed = Seed(conn)
        seed.ack("u1", LTV, "100")
        seed.mark("u1", LTV)
        seed.mark("u1", A)
        rows, _ = diff(conn, [("u1", LTV, "100")], resync=(LTV, A))
    assert rows == [("u1", A, FALSE, None, 1), ("u1", LTV, "100", "100", 1)]


def test_a_pending_update_in_flight_makes_its_keys_uncertain_before_any_mark(engine):
    """What a dry run sees after a kill, before a real run marks the keys."""
    with engine.begin() as conn:
        seed = Seed(conn)
        seed.ack("u1", LTV, "100")
        stale = seed.update("u1", "pending", {LTV: "200"}, in_flight=True)
        rows, kept = diff(conn, [("u1", LTV, "100")])
    assert rows == [("u1", LTV, "100", "100", 0)] and stale not in kept


def test_a_live_update_carrying_the_uncertain_keys_current_value_is_kept(engine):
    with engine.begin() as conn:
        seed = Seed(conn)
        pending = seed.update("u1", "pending", {A: TRUE, LTV: "200"})
        seed.mark("u1", A, pending)
        rows, kept = diff(conn, [("u1", A, TRUE), ("u1", LTV, "200")])
    assert (rows, kept) == ([], [pending])


def test_a_live_update_without_an_uncertain_key_is_replanned_with_it(engine):
    """u1's A is uncertain and back at its acknowledged value; the pending update
    carries only the trait: the user is planned again with both."""
    with engine.begin() as conn:
        seed = Seed(conn)
        seed.ack("u1", A, TRUE)
        older = seed.update("u1", "superseded", {A: FALSE}, maybe=True)
        seed.mark("u1", A, older)
        pending = seed.update("u1", "pending", {LTV: "200"})
        rows, kept = diff(conn, [("u1", A, TRUE), ("u1", LTV, "200")])
    assert kept == [] and pending
    assert rows == [("u1", A, TRUE, TRUE, 0), ("u1", LTV, "200", None, 0)]


def test_a_rejected_update_of_the_uncertain_keys_current_value_keeps_blocking(engine):
    """Rejected for this very state: re-sending it would be rejected again (SPEC §5)."""
    with engine.begin() as conn:
        seed = Seed(conn)
        rejected = seed.update("u1", "rejected", {A: FALSE})
        seed.mark("u1", A)
        rows, kept = diff(conn, [])
        assert (rows, kept) == ([], [rejected])
        assert marks(conn) == [("u1", A)]


# --- the ledger ---------------------------------------------------------------------------


def attempt(status: int | None, outcome: str, maybe: bool) -> AttemptRecord:
    return AttemptRecord(
        1,
        T0,
        1.0,
        status,
        outcome,  # type: ignore[arg-type]
        None,
        maybe_delivered=maybe,
    )


TIMEOUT = attempt(None, "error", True)
REFUSED = attempt(None, "error", False)
OK = attempt(200, "acknowledged", True)


@pytest.mark.parametrize(
    "attempts, result, uncertain",
    [
        ([TIMEOUT], "pending", True),
        ([attempt(500, "retry", True)], "pending", True),
        ([attempt(503, "retry", False), REFUSED], "pending", False),
        ([attempt(429, "retry", False)], "pending", False),
        ([attempt(500, "retry", True), attempt(400, "rejected", False)], "rejected", True),
        ([attempt(422, "rejected", False)], "rejected", False),
        ([TIMEOUT, OK], "acknowledged", False),
    ],
    ids=["timeout", "500", "503-refused", "429", "500-then-400", "422", "timeout-then-200"],
)
def test_recording_an_attempt_marks_its_keys_when_it_may_have_been_delivered(
    engine, attempts, result, uncertain
):
    with engine.begin() as conn:
        seed = Seed(conn)
        sent = seed.update("u1", "pending", {A: TRUE, LTV: "5"})
        record_deliveries(conn, seed.run_id, [(sent, result, attempts)], T0)
        assert marks(conn) == ([("u1", A), ("u1", LTV)] if uncertain else [])


def test_an_acknowledgement_clears_only_the_keys_it_carries(engine):
    with engine.begin() as conn:
        seed = Seed(conn)
        older = seed.update("u1", "superseded", {A: TRUE, LTV: "5"}, maybe=True)
        seed.mark("u1", A, older)
        seed.mark("u1", LTV, older)
        seed.mark("u2", LTV, older)
        sent = seed.update("u1", "pending", {LTV: "7"})
        record_deliveries(conn, seed.run_id, [(sent, "acknowledged", [OK])], T0)
        assert marks(conn) == [("u1", A), ("u2", LTV)]
        assert conn.execute(
            select(acked.c.value).where(acked.c.user_id == "u1")
        ).scalars().all() == ["7"]


def test_a_skipped_settlement_clears_the_keys_it_carries(engine):
    """Settled as if sent (SPEC §5): a skip carries no custom attributes, so no later
    body could settle the key either; keeping the mark would re-plan it forever."""
    with engine.begin() as conn:
        seed = Seed(conn)
        skipped = seed.update("u1", "pending", {LTV: "7"})
        seed.mark("u1", LTV, skipped)
        acknowledge(conn, str(skipped), {}, "skipped", seed.run_id, T0)
        assert marks(conn) == []


def test_a_2xx_for_an_update_another_run_superseded_marks_its_keys(engine):
    """A run that lost its lock records a 200 it can no longer settle: ChartMogul holds
    values `acked` does not."""
    with engine.begin() as conn:
        seed = Seed(conn)
        gone = seed.update("u1", "superseded", {LTV: "7"})
        record_deliveries(conn, seed.run_id, [(gone, "acknowledged", [OK])], T0)
        assert marks(conn) == [("u1", LTV)]
        assert conn.execute(select(acked)).all() == []


def test_a_mark_keeps_its_since_and_names_the_newest_update(engine):
    with engine.begin() as conn:
        seed = Seed(conn)
        first = seed.update("u1", "superseded", {LTV: "5"})
        second = seed.update("u1", "pending", {LTV: "6"})
        record_deliveries(conn, seed.run_id, [(first, "pending", [TIMEOUT])], T0)
        record_deliveries(
            conn, seed.run_id, [(second, "pending", [TIMEOUT])], T0 + timedelta(hours=1)
        )
        (row,) = conn.execute(select(uncertain_keys)).all()
    assert (row.update_id, row.since) == (second, T0)


def test_updates_left_in_flight_are_marked_when_the_next_run_starts(engine):
    with engine.begin() as conn:
        seed = Seed(conn)
        left = seed.update("u1", "pending", {A: TRUE}, in_flight=True)
        idle = seed.update("u2", "pending", {A: TRUE})
        assert mark_left_in_flight(conn, T0) == 1
        assert marks(conn) == [("u1", A)]
        rows = {r.id: r for r in conn.execute(select(updates))}
        assert (rows[left].in_flight_since, rows[left].maybe_delivered) == (None, True)
        assert (rows[idle].in_flight_since, rows[idle].maybe_delivered) == (None, False)
        assert mark_left_in_flight(conn, T0) == 0


# --- the migration ------------------------------------------------------------------------


def test_the_migration_carries_in_flight_and_maybe_delivered_updates_over(state_url):
    engine = state_engine(state_url)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")  # the revision before uncertain_keys
    with engine.begin() as conn:
        seed = Seed(conn)
        seed.update("u1", "pending", {A: TRUE}, in_flight=True)  # killed in flight
        seed.update("u2", "superseded", {LTV: "200"}, maybe=True)  # then settled
        seed.update("u2", "sent", {LTV: "100"})
        seed.update("u3", "superseded", {LTV: "200", B: TRUE}, maybe=True)
        seed.update("u3", "sent", {B: FALSE})  # settles B only
        seed.update("u4", "rejected", {A: FALSE}, maybe=True)  # rejected later
        seed.update("u5", "sent", {A: TRUE}, maybe=True)  # timeout, then 200
        seed.update("u6", "pending", {A: TRUE})  # never attempted
        seed.update("u7", "sent", {LTV: "1"})  # an older ack
        seed.update("u7", "superseded", {LTV: "2"}, maybe=True)
        seed.update("u8", "superseded", {A: TRUE}, in_flight=True)  # superseded
    migrate(engine)
    with engine.connect() as conn:
        assert marks(conn) == [("u1", A), ("u3", LTV), ("u4", A), ("u7", LTV), ("u8", A)]
        left = conn.execute(
            select(updates.c.user_id, updates.c.maybe_delivered).where(
                updates.c.user_id.in_(("u1", "u8"))
            )
        ).all()
        assert sorted(left) == [("u1", True), ("u8", True)]
        assert (
            conn.execute(select(updates.c.id).where(updates.c.in_flight_since.is_not(None))).all()
            == []
        )
    with migration_connection(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
        command.upgrade(cfg, "head")
    engine.dispose()


# --- retention ------------------------------------------------------------------------------


def test_pruning_keeps_every_mark_and_the_update_it_names(engine):
    with engine.begin() as conn:
        seed = Seed(conn)
        old_run = seed.run()
        marked = seed.update("u1", "superseded", {LTV: "5"}, maybe=True, run_id=old_run)
        unmarked = seed.update("u2", "superseded", {LTV: "5"}, run_id=old_run)
        seed.mark("u1", LTV, marked)
        seed.mark("u3", A, 999_999)  # an update already gone: the mark stays anyway
        newest = seed.run()
        seed.update("u9", "sent", {LTV: "1"}, run_id=newest)
        conn.execute(
            update(sync_runs).values(status="succeeded", started_at=T0 - timedelta(days=400))
        )
    with engine.begin() as conn:
        pruned = prune(conn, datetime(2999, 1, 1, tzinfo=UTC))
        ids = set(conn.execute(select(updates.c.id)).scalars())
        assert pruned.updates == 1 and marked in ids and unmarked not in ids
        assert marks(conn) == [("u1", LTV), ("u3", A)]
        assert conn.execute(
            select(changes.c.update_id).where(changes.c.update_id == marked)
        ).all() == [(marked,)]
