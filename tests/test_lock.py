"""The run lock (SPEC §6) on both state backends: refusal, takeover, lease, loss."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, insert, select, update

from reconciler import run as run_module
from reconciler.cli import main
from reconciler.errors import LockHeld
from reconciler.run import Seams, sync
from reconciler.state.db import migrate, state_engine
from reconciler.state.lock import RunLock, process_start
from reconciler.state.schema import run_lock

from .helpers import CLI_ENV
from .receiver import Reply


@pytest.fixture
def engine(state_url: str) -> Any:
    engine = state_engine(state_url)
    migrate(engine)
    yield engine
    engine.dispose()


def plant(
    engine: Engine,
    *,
    host: str | None = None,
    pid: int | None = None,
    pid_started: str | None = None,
    lease: timedelta = timedelta(seconds=60),
) -> None:
    """Write a lock row as some other holder would have."""
    now = datetime.now(UTC)
    pid = pid if pid is not None else os.getpid()
    with engine.begin() as conn:
        conn.execute(
            insert(run_lock).values(
                id=1,
                token="someone-else",
                host=host or socket.gethostname(),
                pid=pid,
                pid_started=pid_started if pid_started is not None else process_start(pid) or "",
                run_id=None,
                acquired_at=now - timedelta(minutes=5),
                lease_until=now + lease,
            )
        )


def holder(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(run_lock)).one_or_none()


def test_second_run_is_refused_naming_host_pid_and_since(engine):
    with RunLock(engine), pytest.raises(LockHeld) as refused:
        RunLock(engine).acquire()
    message = str(refused.value)
    assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message
    assert f"since {datetime.now(UTC).year}-" in message
    assert refused.value.exit_status == 3


def test_sync_command_exits_3_while_another_run_holds_the_lock(setup, engine_of):
    engine = engine_of(setup)
    setup.warehouse.members("High Value Users", "u1")
    path = setup.write()
    with RunLock(engine) as held:
        held.set_run(41)
        outcome = CliRunner().invoke(main, ["sync", "--config", str(path)], env=CLI_ENV)
    assert outcome.exit_code == 3
    assert f"pid {os.getpid()}, run 41, since" in outcome.output
    assert setup.receiver.bodies() == []


def test_lock_released_after_a_run_lets_the_next_one_in(engine):
    RunLock(engine).__enter__().release()
    with RunLock(engine):
        pass
    assert holder(engine) is None


def test_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(engine, state_url):
    code = (
        "import sys, time; from reconciler.state.db import state_engine; "
        "from reconciler.state.lock import RunLock; "
        f"RunLock(state_engine({state_url!r})).acquire(); print('held', flush=True); "
        "time.sleep(120)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        assert holder(engine).pid == child.pid
        with pytest.raises(LockHeld):
            RunLock(engine).acquire()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    lease_left = holder(engine).lease_until - datetime.now(UTC)
    assert lease_left > timedelta(seconds=30)  # the lease alone would still hold
    with RunLock(engine):
        assert holder(engine).pid == os.getpid()


def test_reused_pid_with_another_start_time_is_not_the_holder(engine):
    plant(engine, pid=os.getpid(), pid_started="1")  # our pid, but not our start time
    with RunLock(engine):
        assert holder(engine).pid_started == process_start(os.getpid())


def test_holder_on_another_host_keeps_the_lock_while_its_lease_lasts(engine):
    plant(engine, host="another-host.internal", pid=1, pid_started="1")
    with pytest.raises(LockHeld, match=r"host another-host\.internal, pid 1"):
        RunLock(engine).acquire()


def test_expired_lease_is_taken_over(engine):
    plant(engine, host="another-host.internal", pid=1, lease=timedelta(seconds=-1))
    with RunLock(engine):
        assert holder(engine).host == socket.gethostname()


def test_racing_starters_take_a_dead_lock_only_once(engine):
    plant(engine, host="another-host.internal", lease=timedelta(seconds=-1))
    locks = [RunLock(engine) for _ in range(6)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(locks))

    def start(lock: RunLock) -> None:
        barrier.wait()
        try:
            lock.acquire()
            outcomes.append("won")
        except LockHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=start, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]
    (winner,) = [lock for lock in locks if holder(engine).token == lock.token]
    winner.release()


def test_renewal_extends_the_lease(engine):
    with RunLock(engine) as lock:
        before = holder(engine).lease_until
        assert lock.renew()
        assert holder(engine).lease_until > before


def test_renewal_thread_keeps_the_lease_fresh(engine):
    with RunLock(engine, renew_every=0.01) as lock:
        before = holder(engine).lease_until
        for _ in range(500):  # at most ~5 s
            if holder(engine).lease_until > before:
                break
            lock._stop.wait(0.01)
        assert holder(engine).lease_until > before and not lock.lost.is_set()


def test_renewal_notices_that_the_lock_was_taken_over(engine):
    lock = RunLock(engine)
    lock.acquire()
    with engine.begin() as conn:
        conn.execute(update(run_lock).values(token="thief"))
    assert lock.renew() is False and lock.lost.is_set()
    lock.release()
    assert holder(engine).token == "thief"  # release leaves the new holder's row alone


def test_run_stops_sending_when_its_lock_is_lost(setup, engine_of, monkeypatch):
    """Another run takes the lock over mid-run: no new request starts after that."""
    engine = engine_of(setup)
    setup.warehouse.members("High Value Users", *(f"u{n}" for n in range(10)))
    made: list[RunLock] = []

    def fast_renewing(engine: Engine) -> RunLock:
        made.append(RunLock(engine, renew_every=0.01))
        return made[-1]

    monkeypatch.setattr(run_module, "RunLock", fast_renewing)

    def respond(n: int, _body: dict[str, Any]) -> Reply:
        if n == 1:
            with engine.begin() as conn:
                conn.execute(update(run_lock).values(token="thief"))
            made[0].lost.wait(10)  # the renewal notices within a few renewals
        return Reply()

    setup.receiver.respond = respond
    config = setup.config()
    config = replace(config, destination=replace(config.destination, max_concurrency=1))
    result = sync(config, engine, seams=Seams(backoff_initial=0.01))
    assert len(setup.receiver.requests) == 1
    assert (result.status, result.sent, result.pending) == ("partial", 1, 9)
    assert result.error and "lock was lost" in result.error
    assert holder(engine).token == "thief"


def test_lease_renewals_during_a_long_snapshot_do_not_lock_the_run_out(
    setup, engine_of, monkeypatch
):
    """The run writes its plan after other connections renewed the lease meanwhile."""
    import functools

    monkeypatch.setattr(run_module, "RunLock", functools.partial(RunLock, renew_every=0.005))
    setup.warehouse.members("High Value Users", *(f"u{i}" for i in range(3_000)))
    result = sync(setup.config(), engine_of(setup))
    assert result.status == "succeeded" and result.sent == 3_000
