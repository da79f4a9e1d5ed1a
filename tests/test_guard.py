"""The safety guard (SPEC §10): a run that would empty an audience halts before anything
is kept or sent. Through the command, against the loopback receiver, on both backends."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, inspect, select

import reconciler.cli
from reconciler.cli import main
from reconciler.config import Safety, load_config
from reconciler.errors import ConfigError
from reconciler.ops.daemon import run_once
from reconciler.ops.metrics import Metrics
from reconciler.pipeline.guard import Trip, Verdict
from reconciler.run import Seams
from reconciler.state.db import state_engine
from reconciler.state.schema import acked, sync_runs, updates

from .conftest import Setup
from .helpers import assert_one_clean_line
from .receiver import Reply

HV = "high_value_users"
OC = "order_completed_last_30_days"
LTV = "lifetime_value"
HV_USERS = [f"u{i:02}" for i in range(1, 11)]  # 10 members
OC_USERS = HV_USERS[:6]  # 6 members
SAFETY = "[safety]\nmin_members = 5\nmax_exit_share = 0.5\n"
HV_HALT = (
    "halted: high_value_users would lose 8 of 10 acknowledged members (80 %); "
    "check its query, or run reconciler sync --accept-exits high_value_users"
)
BOTH_HALT = (
    "halted: high_value_users would lose 8 of 10 acknowledged members (80 %), "
    "order_completed_last_30_days would lose 6 of 6 acknowledged members (100 %); "
    "check their queries, or run reconciler sync --accept-exits high_value_users "
    "--accept-exits order_completed_last_30_days"
)


def cli(setup: Setup, *args: str) -> Result:
    """The real command, in-process, with the engines it made disposed afterwards."""
    engines: list[Engine] = []

    def tracked(url: str) -> Engine:
        engines.append(state_engine(url))
        return engines[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconciler.cli, "state_engine", tracked)
        try:
            return CliRunner().invoke(
                main, [*args, "--config", str(setup.tmp_path / "reconciler.toml")]
            )
        finally:
            for engine in engines:
                engine.dispose()


def custom(body: dict[str, Any]) -> dict[str, Any]:
    return {item["key"]: item["value"] for item in body.get("custom", [])}


def sent_pairs(setup: Setup) -> set[tuple[str, str, Any]]:
    return {(b["user_id"], k, v) for b in setup.receiver.bodies() for k, v in custom(b).items()}


def runs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(sync_runs).order_by(sync_runs.c.id)).all()


def count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def members_acked(engine: Engine, key: str) -> int:
    return count(engine, acked, acked.c.key == key, acked.c.value == "true")


@pytest.fixture
def synced(setup: Setup, engine_of) -> Setup:
    """Both audiences synced and acknowledged; the receiver is cleared afterwards."""
    setup.warehouse.members("High Value Users", *HV_USERS)
    setup.warehouse.members("Order Completed Last 30 Days", *OC_USERS)
    setup.write(extra=SAFETY)
    setup.engine = engine_of(setup)  # type: ignore[method-assign]
    first = cli(setup, "sync")
    assert first.exit_code == 0, first.output
    setup.receiver.clear()
    return setup


def truncate_hv(setup: Setup) -> None:
    """The broken query: high_value_users keeps 2 of its 10 members."""
    setup.warehouse.members("High Value Users", *HV_USERS[:2])


# --- halting ------------------------------------------------------------------------


def test_mass_exit_halts_with_exit_4_and_nothing_reaches_the_receiver(synced):
    truncate_hv(synced)
    result = cli(synced, "sync")
    assert result.exit_code == 4, result.output
    assert HV_HALT in result.stdout
    assert synced.receiver.bodies() == []
    run = runs(synced.engine)[-1]
    assert (run.status, run.error) == ("halted", HV_HALT)
    assert (run.users_seen, run.sent, run.failed, run.exited) == (6, 0, 0, 0)  # u01..u06
    assert count(synced.engine, updates, updates.c.run_id == run.id) == 0
    assert members_acked(synced.engine, HV) == 10


def test_every_audience_that_trips_is_named_in_one_message(synced):
    truncate_hv(synced)
    synced.warehouse.members("Order Completed Last 30 Days")
    result = cli(synced, "sync")
    assert result.exit_code == 4
    assert runs(synced.engine)[-1].error == BOTH_HALT
    assert synced.receiver.bodies() == []


def test_halted_run_leaves_nothing_to_send_once_the_source_is_fixed(synced):
    truncate_hv(synced)
    assert cli(synced, "sync").exit_code == 4
    synced.warehouse.members("High Value Users", *HV_USERS)
    fixed = cli(synced, "sync")
    assert fixed.exit_code == 0, fixed.output
    assert synced.receiver.bodies() == []
    assert (runs(synced.engine)[-1].status, runs(synced.engine)[-1].users_changed) == (
        "succeeded",
        0,
    )


def test_a_halt_does_not_send_updates_left_pending_by_earlier_runs(setup, engine_of):
    setup.warehouse.members("High Value Users", *HV_USERS)
    setup.write(audiences=("High Value Users",), destination="max_attempts = 1", extra=SAFETY)
    engine = engine_of(setup)
    assert cli(setup, "sync").exit_code == 0
    setup.warehouse.members("High Value Users", *HV_USERS[1:])  # u01 leaves: fine
    setup.receiver.respond = lambda _n, _body: Reply(503, "busy")
    assert cli(setup, "sync").exit_code == 1
    (pending,) = _pending(engine)
    setup.receiver.respond = lambda _n, _body: Reply(200)
    setup.receiver.clear()
    setup.warehouse.members("High Value Users", HV_USERS[1])  # and 8 more: halt
    halted = cli(setup, "sync")
    assert halted.exit_code == 4, halted.output
    assert setup.receiver.bodies() == []
    assert _pending(engine) == [pending]
    assert runs(engine)[-1].pending == 1
    setup.warehouse.members("High Value Users", *HV_USERS[1:])  # the source is fixed
    assert cli(setup, "sync").exit_code == 0
    (body,) = setup.receiver.bodies()
    assert (body["message_id"], body["user_id"], custom(body)) == (pending, "u01", {HV: False})


def _pending(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(updates.c.message_id).where(updates.c.status == "pending")
            ).scalars()
        )


# --- dry run --------------------------------------------------------------------------


def test_dry_run_prints_the_verdict_exits_4_and_records_nothing(synced):
    truncate_hv(synced)
    before = (count(synced.engine, sync_runs), count(synced.engine, updates))
    result = cli(synced, "sync", "--dry-run")
    assert result.exit_code == 4, result.output
    assert (
        "a real run would halt and send nothing: " + HV_HALT.removeprefix("halted: ")
        in result.stdout
    )
    as_json = cli(synced, "sync", "--dry-run", "--json")
    assert as_json.exit_code == 4
    guard = json.loads(as_json.stdout)["guard"]
    assert guard == {
        "halted": True,
        "max_exit_share": 0.5,
        "min_members": 5,
        "tripped": [{"key": HV, "exits": 8, "members": 10, "percent": 80}],
        "accepted": [],
        "message": HV_HALT,
    }
    assert (count(synced.engine, sync_runs), count(synced.engine, updates)) == before
    assert synced.receiver.bodies() == []
    assert members_acked(synced.engine, HV) == 10


def test_dry_run_with_accepted_exits_exits_0_and_names_them(synced):
    truncate_hv(synced)
    result = cli(synced, "sync", "--dry-run", "--accept-exits", HV)
    assert result.exit_code == 0, result.output
    assert (
        "accepted by --accept-exits: high_value_users would lose 8 of 10 acknowledged "
        "members (80 %)"
    ) in result.stdout
    assert "would halt" not in result.stdout


# --- accepting ------------------------------------------------------------------------


def test_accept_exits_sends_exactly_the_exits_of_that_audience(synced):
    truncate_hv(synced)
    result = cli(synced, "sync", "--accept-exits", HV)
    assert result.exit_code == 0, result.output
    assert sent_pairs(synced) == {(u, HV, False) for u in HV_USERS[2:]}
    assert len(synced.receiver.bodies()) == 8
    assert members_acked(synced.engine, HV) == 2
    synced.receiver.clear()
    again = cli(synced, "sync")  # acceptance was for that run only,
    assert again.exit_code == 0  # and nothing is left to accept
    assert synced.receiver.bodies() == []


def test_accepting_one_audience_still_holds_the_others(synced):
    truncate_hv(synced)
    synced.warehouse.members("Order Completed Last 30 Days")
    result = cli(synced, "sync", "--accept-exits", OC)
    assert result.exit_code == 4
    assert runs(synced.engine)[-1].error == HV_HALT
    assert synced.receiver.bodies() == []
    assert members_acked(synced.engine, OC) == 6


@pytest.mark.parametrize(
    "args",
    [("--accept-exits", "all"), ("--accept-exits", HV, "--accept-exits", OC)],
    ids=["all", "each"],
)
def test_accepting_every_tripped_audience_sends_every_exit(synced, args):
    truncate_hv(synced)
    synced.warehouse.members("Order Completed Last 30 Days")
    result = cli(synced, "sync", *args)
    assert result.exit_code == 0, result.output
    assert sent_pairs(synced) == (
        {(u, HV, False) for u in HV_USERS[2:]} | {(u, OC, False) for u in OC_USERS}
    )


@pytest.mark.parametrize("trait_changes", [False, True], ids=["kept", "replanned"])
def test_accepted_exits_left_pending_are_not_held_again(synced, trait_changes):
    """Exits accepted once and not delivered are sent by the next plain sync, whether
    their updates are kept as they are or re-planned with a new trait value."""
    truncate_hv(synced)
    synced.receiver.respond = lambda _n, _body: Reply(503, "busy")
    synced.write(destination="max_attempts = 1", extra=SAFETY)
    assert cli(synced, "sync", "--accept-exits", HV).exit_code == 1
    assert len(_pending(synced.engine)) == 8
    synced.receiver.respond = lambda _n, _body: Reply(200)
    synced.receiver.clear()
    if trait_changes:
        synced.warehouse.trait("Lifetime Value", dict.fromkeys(HV_USERS[2:], 7))
    result = cli(synced, "sync")
    assert result.exit_code == 0, result.output
    expected: set[tuple[str, str, object]] = {(u, HV, False) for u in HV_USERS[2:]}
    if trait_changes:
        expected |= {(u, LTV, 7) for u in HV_USERS[2:]}
    assert sent_pairs(synced) == expected


def test_unknown_accept_exits_key_is_a_usage_error_listing_audience_keys(synced):
    before = count(synced.engine, sync_runs)
    for command in ("sync", "resync"):
        result = cli(synced, command, "--accept-exits", LTV)  # a trait, not an audience
        line = assert_one_clean_line(result, 2)
        assert line == (
            f'reconciler: --accept-exits: unknown audience key "{LTV}"; '
            f"audience keys: {OC}, {HV} (or all)"
        )
    assert count(synced.engine, sync_runs) == before


# --- what is guarded -----------------------------------------------------------------


@pytest.mark.parametrize("min_members, halts", [(10, True), (11, False)])
def test_audiences_below_min_members_are_not_guarded(synced, min_members, halts):
    synced.write(extra=f"[safety]\nmin_members = {min_members}\n")
    truncate_hv(synced)
    result = cli(synced, "sync")
    assert result.exit_code == (4 if halts else 0), result.output
    assert len(synced.receiver.bodies()) == (0 if halts else 8)


@pytest.mark.parametrize(
    "share, left, halts",
    [
        (0.8, 2, False),  # 8 of 10 is not more than 80 %
        (0.79, 2, True),
        (0.5, 5, False),  # 5 of 10: exactly half
        (0.5, 4, True),
        (1, 0, False),  # 1 turns the guard off: even all 10 may leave
    ],
)
def test_the_share_is_configurable_and_1_turns_the_guard_off(synced, share, left, halts):
    synced.write(extra=f"[safety]\nmin_members = 5\nmax_exit_share = {share}\n")
    synced.warehouse.members("High Value Users", *HV_USERS[:left])
    result = cli(synced, "sync")
    assert result.exit_code == (4 if halts else 0), result.output
    assert len(synced.receiver.bodies()) == (0 if halts else 10 - left)


def test_entries_and_traits_do_not_count_as_exits(synced):
    """Users entering and trait changes never trip the guard; only exits do."""
    synced.warehouse.members("High Value Users", *HV_USERS, *(f"n{i}" for i in range(30)))
    synced.warehouse.trait("Lifetime Value", dict.fromkeys(HV_USERS, 1))
    assert cli(synced, "sync").exit_code == 0
    assert len(synced.receiver.bodies()) == 40


# --- resync ---------------------------------------------------------------------------


def test_resync_is_guarded_and_takes_accept_exits(synced):
    truncate_hv(synced)
    halted = cli(synced, "resync")
    assert halted.exit_code == 4, halted.output
    assert runs(synced.engine)[-1].error == HV_HALT.replace("reconciler sync", "reconciler resync")
    one_key = cli(synced, "resync", "--audience", LTV)
    assert one_key.exit_code == 4
    assert runs(synced.engine)[-1].error.endswith(
        f"or run reconciler resync --audience {LTV} --accept-exits {HV}"
    )
    assert synced.receiver.bodies() == []
    accepted = cli(synced, "resync", "--accept-exits", HV)
    assert accepted.exit_code == 0, accepted.output
    assert {(u, k, v) for u, k, v in sent_pairs(synced) if v is False} == {
        (u, HV, False) for u in HV_USERS[2:]
    }
    assert runs(synced.engine)[-1].status == "succeeded"


# --- history --------------------------------------------------------------------------


def test_history_and_show_display_the_halted_run(synced):
    truncate_hv(synced)
    assert cli(synced, "sync").exit_code == 4
    (newest, *_) = json.loads(cli(synced, "history", "--json").stdout)
    assert (newest["status"], newest["error"]) == ("halted", HV_HALT)
    assert " halted " in cli(synced, "history").stdout
    shown = cli(synced, "show", str(newest["id"]))
    assert "halted" in shown.stdout and "would lose 8 of 10" in shown.stdout
    as_json = json.loads(cli(synced, "show", str(newest["id"]), "--json").stdout)
    assert (as_json["status"], as_json["changes"], as_json["deliveries"]) == ("halted", [], [])


def test_sync_json_carries_the_verdict(synced):
    truncate_hv(synced)
    result = cli(synced, "sync", "--json")
    assert result.exit_code == 4
    data = json.loads(result.stdout)
    assert (data["status"], data["error"]) == ("halted", HV_HALT)
    assert data["guard"]["tripped"] == [{"key": HV, "exits": 8, "members": 10, "percent": 80}]


# --- the daemon -----------------------------------------------------------------------


def test_daemon_job_halts_on_every_tick_and_the_metric_shows_it(synced, caplog):
    caplog.set_level(logging.INFO, logger="reconciler.ops.daemon")
    config, metrics = load_config(synced.tmp_path / "reconciler.toml", env={}), Metrics()
    sample = metrics.registry.get_sample_value
    truncate_hv(synced)
    synced.warehouse.members("Order Completed Last 30 Days")
    for tick in (1, 2):
        caplog.clear()
        result = run_once(config, synced.engine, Seams(), metrics)
        assert result is not None and result.status == "halted"
        (line,) = [r for r in caplog.records if r.name == "reconciler.ops.daemon"]
        assert line.levelno == logging.ERROR and line.getMessage().endswith(BOTH_HALT)
        assert line.fields["status"] == "halted"
        assert sample("reconciler_runs_total", {"status": "halted"}) == tick
        assert sample("reconciler_halted_audiences") == 2
    assert synced.receiver.bodies() == []
    assert [r.status for r in runs(synced.engine)][-2:] == ["halted", "halted"]
    synced.warehouse.members("High Value Users", *HV_USERS)
    synced.warehouse.members("Order Completed Last 30 Days", *OC_USERS)
    fixed = run_once(config, synced.engine, Seams(), metrics)
    assert fixed is not None and fixed.status == "succeeded"
    assert sample("reconciler_halted_audiences") == 0


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, entry, fix",
    [
        ("max_exit_share = 0", "[safety] max_exit_share: is 0", "use a share above 0"),
        ("max_exit_share = -0.5", "[safety] max_exit_share: is -0.5", "use a share above 0"),
        ("max_exit_share = 1.5", "[safety] max_exit_share: is 1.5", "at most 1"),
        ("max_exit_share = nan", "[safety] max_exit_share: is nan", "use a share above 0"),
        (
            'max_exit_share = "0.5"',
            "[safety] max_exit_share: must be a number, got a string",
            "write it like max_exit_share = 0.5",
        ),
        (
            "max_exit_share = true",
            "[safety] max_exit_share: must be a number, got true",
            "write it like max_exit_share = 0.5",
        ),
        ("min_members = 0", "[safety] min_members: is 0", "use a value >= 1"),
        (
            "min_members = 2.5",
            "[safety] min_members: must be a whole number, got the number 2.5",
            "write it like min_members = 5",
        ),
        (
            'min_members = "100"',
            "[safety] min_members: must be a whole number, got a string",
            "write it like min_members = 5",
        ),
        ("max_exit = 0.5", '[safety]: unknown key "max_exit"', 'did you mean "max_exit_share"?'),
    ],
)
def test_invalid_safety_settings_are_config_errors(setup, settings, entry, fix):
    path = setup.write(extra=f"[safety]\n{settings}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}: {entry}; ")
    assert fix in str(caught.value)
    line = assert_one_clean_line(cli(setup, "sync"), 2)
    assert line == f"reconciler: {caught.value}"
    engine = state_engine(setup.state_url)
    try:
        assert inspect(engine).get_table_names() == []  # nothing was written
    finally:
        engine.dispose()


def test_safety_defaults_and_values_are_read(setup):
    assert setup.config().safety == Safety(max_exit_share=0.5, min_members=100)
    assert setup.config(extra="[safety]\nmax_exit_share = 1\nmin_members = 3\n").safety == Safety(
        max_exit_share=1.0, min_members=3
    )


# --- the verdict's message ------------------------------------------------------------


def test_percent_is_rounded_down_and_never_zero_when_someone_leaves():
    assert Trip("a", 812, 1000).percent == 81
    assert Trip("a", 999, 1000).percent == 99
    assert Trip("a", 1000, 1000).percent == 100
    assert Trip("a", 1, 1000).percent == 1


def test_the_message_has_the_form_of_the_spec():
    verdict = Verdict(0.5, 100, tripped=(Trip(HV, 812, 1000),))
    assert verdict.message() == (
        "halted: high_value_users would lose 812 of 1000 acknowledged members (81 %); "
        "check its query, or run reconciler sync --accept-exits high_value_users"
    )
