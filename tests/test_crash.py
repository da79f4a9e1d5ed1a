"""Crash safety (SPEC §6, issue 3): SIGKILL `reconciler sync` at any moment, lose nothing.

Each trial changes the source, starts `.venv/bin/reconciler sync --config FILE` as a
subprocess against a receiver in this process, and kills it with SIGKILL at a random
moment: after a random delay, during the snapshot (the run row exists, the plan is not
committed), or when the receiver gets the k-th request (in flight, or while the
deliveries are being recorded). A clean sync follows the trials. Then:

    the receiver's view (the latest value per key per user over every body received,
    by arrival) equals the source state: nothing lost;
    every body that changed nothing in that view re-sent an earlier message id;
    no run is left `running`; no run ever found the lock held (exit 3).

Source changes between trials never return a user with an unacknowledged update to
its acknowledged state: that case (uncertain keys, SPEC §6) is
`test_reverting_after_an_unrecorded_delivery_is_corrected` here and tests/test_uncertain.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from reconciler.run import Seams, sync
from reconciler.state.schema import sync_runs, updates

from .conftest import Setup
from .helpers import clean_env
from .model import HV, Source, replay
from .processes import RECONCILER, poll_until
from .receiver import Reply

# An audience whose query takes a while (nobody is a member), so that kills land in
# the snapshot too, not only before it or while sending.
SLOW_AUDIENCE = """
[[audiences]]
name = "Slow"
query = '''WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000)
           SELECT m.user_id FROM (SELECT max(x) AS top FROM c) AS t
           JOIN members AS m ON m.audience = 'Slow' AND t.top > 0'''
"""
TRIAL_TIMEOUT = 60.0


@dataclass
class Figures:
    trials: int = 0
    kills: int = 0
    phases: Counter[str] = field(default_factory=Counter)
    exits: Counter[int] = field(default_factory=Counter)


def spawn(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(RECONCILER), "sync", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )


def last_run(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(sync_runs).order_by(sync_runs.c.id.desc()).limit(1)).first()


def kill_trial(
    setup: Setup, engine: Engine, config: Path, rng: random.Random, figures: Figures
) -> None:
    """One sync killed at a random moment (or left to finish if it is faster)."""
    before = last_run(engine)
    before_id = before.id if before else 0
    start_requests = len(setup.receiver.requests)
    how = ("timer", "snapshot", "request")[figures.trials % 3]
    child: subprocess.Popen[bytes] | None = None
    kill_at = rng.randint(1, 40)

    def respond(n: int, _body: dict[str, Any]) -> Reply:
        if how == "request" and child and n - start_requests == kill_at:
            os.kill(child.pid, signal.SIGKILL)  # this request arrived; its answer never will
        return Reply(delay=0.002)

    setup.receiver.respond = respond
    child = spawn(config)
    if how == "timer":  # process start, migration check, lock, or anything later
        time.sleep(rng.uniform(0.05, 1.0))
    elif how == "snapshot":
        poll_until(
            lambda: (
                child.poll() is not None
                or (
                    (run := last_run(engine)) is not None
                    and run.id > before_id
                    and run.snapshot_at is None
                )
            ),
            TRIAL_TIMEOUT,
        )
        time.sleep(rng.uniform(0, 0.1))
    else:
        poll_until(lambda: child.poll() is not None, TRIAL_TIMEOUT)
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate(timeout=TRIAL_TIMEOUT)
    figures.trials += 1
    figures.exits[child.returncode] += 1
    assert child.returncode != 3, stderr.decode()  # the lock never blocks the next run
    if child.returncode != -signal.SIGKILL:
        figures.phases["finished before the kill"] += 1
        return
    figures.kills += 1
    run = last_run(engine)
    if run is None or run.id == before_id:
        figures.phases["startup (before the run row)"] += 1
    elif run.snapshot_at is None:
        figures.phases["snapshot/diff/plan"] += 1
    elif len(setup.receiver.requests) == start_requests:
        figures.phases["plan committed, nothing sent yet"] += 1
    else:
        figures.phases["sending/recording"] += 1


def crash_trials(setup: Setup, engine: Engine, trials: int, seed: int) -> Figures:
    rng = random.Random(seed)
    source = Source(setup, rng)
    source.fill()
    config = setup.write(destination="max_attempts = 2", extra=SLOW_AUDIENCE)
    figures = Figures()
    for trial in range(trials):
        if trial:
            source.change(engine, rng.randint(5, 40))
        kill_trial(setup, engine, config, rng, figures)
    setup.receiver.respond = lambda n, b: Reply()
    clean = subprocess.run(
        [str(RECONCILER), "sync", "--config", str(config)],
        capture_output=True,
        env=clean_env(),
        timeout=TRIAL_TIMEOUT,
    )
    assert clean.returncode == 0, clean.stderr.decode()
    with engine.connect() as conn:
        running = conn.execute(
            select(func.count()).select_from(sync_runs).where(sync_runs.c.status == "running")
        ).scalar_one()
        pending = conn.execute(
            select(func.count()).select_from(updates).where(updates.c.status == "pending")
        ).scalar_one()
    assert (running, pending) == (0, 0)
    view, repeated, noop, noop_new_id = replay(setup.receiver.bodies())
    lost = source.lost(view)
    print(
        f"\n[{setup.state_url.split(':')[0]}] trials {figures.trials}, kills {figures.kills}, "
        f"phases {dict(figures.phases)}, exits {dict(figures.exits)}, bodies "
        f"{len(setup.receiver.requests)}, updates lost {len(lost)}, repeated ids "
        f"{repeated}, no-op bodies {noop} (with a new id: {noop_new_id})"
    )
    assert lost == []
    assert noop_new_id == 0
    return figures


def test_random_sigkills_lose_nothing(setup, engine_of):
    figures = crash_trials(setup, engine_of(setup), trials=12, seed=20240501)
    assert figures.kills >= 6


@pytest.mark.slow
def test_many_random_sigkills_lose_nothing(setup, engine_of):
    figures = crash_trials(setup, engine_of(setup), trials=50, seed=7)
    assert figures.kills >= 25


def test_killed_run_never_blocks_the_next_which_resends_with_the_same_id(setup, engine_of):
    """Killed with a request in flight: the next run starts at once and re-sends it."""
    engine = engine_of(setup)
    setup.warehouse.members("High Value Users", "u1", "u2", "u3")
    config = setup.write(destination="max_attempts = 1")
    arrived, release = threading.Event(), threading.Event()

    def respond(n: int, _body: dict[str, Any]) -> Reply:
        if n == 1:
            arrived.set()
            release.wait(TRIAL_TIMEOUT)
        return Reply()

    setup.receiver.respond = respond
    child = spawn(config)
    try:
        assert arrived.wait(TRIAL_TIMEOUT), "the child never sent anything"
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=TRIAL_TIMEOUT)
        release.set()
    (in_flight,) = [b for b in setup.receiver.bodies()][:1]
    result = sync(
        setup.config(destination="max_attempts = 1"), engine, seams=Seams(backoff_initial=0.01)
    )
    assert result.status == "succeeded"
    again = [b for b in setup.receiver.bodies()[1:] if b["user_id"] == in_flight["user_id"]]
    assert [(b["message_id"], b["timestamp"]) for b in again] == [
        (in_flight["message_id"], in_flight["timestamp"])
    ]
    with engine.connect() as conn:
        killed = conn.execute(select(sync_runs).order_by(sync_runs.c.id)).first()
    assert killed.status == "failed" and "interrupted" in killed.error


def test_reverting_after_an_unrecorded_delivery_is_corrected(setup, engine_of):
    engine = engine_of(setup)
    setup.warehouse.members("High Value Users", "u1")
    setup.receiver.respond = lambda n, b: Reply(drop=True)  # processed, answer lost
    sync(setup.config(destination="max_attempts = 1"), engine)
    setup.receiver.respond = lambda n, b: Reply()
    setup.warehouse.members("High Value Users")  # back to the acknowledged state
    sync(setup.config(), engine)
    view, *_ = replay(setup.receiver.bodies())
    assert view["u1"].get(HV, False) is False
