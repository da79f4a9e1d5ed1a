"""Uncertain keys (SPEC §6, issue 9), through the real CLI, against a last-write-wins receiver.

An update that may have reached ChartMogul without being acknowledged (applied, then
the connection dropped; applied, then answered after the client's timeout; applied,
then the sync was SIGKILLed) leaves each of its keys uncertain: later runs send the
key's current value until an update carrying it is acknowledged, whatever becomes of
the update in between. Each test runs `reconciler sync --config FILE` as a subprocess
with `max_attempts = 1` and asserts that what the receiver finally holds (its `held`:
the applied bodies, last write wins per user and key) equals the source.

The four chains are those of issue 9, each of which lost a value before; the last
test is a randomized model of the same kind (slow).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from reconciler.state.schema import sync_runs, uncertain_keys, updates

from .conftest import Setup
from .helpers import clean_env
from .processes import PATIENCE, RECONCILER
from .receiver import Received, Reply

A, B, LTV = "audience_a", "audience_b", "lifetime_value"
AUDIENCES = {A: "Audience A", B: "Audience B"}
HASTY_TIMEOUT = 1.0  # a late answer comes only after a client with this timeout gave up

Respond = Callable[[int, dict[str, Any]], Reply]


@dataclass
class Model:
    """The source as the test sets it, written through to the warehouse."""

    setup: Setup
    users: list[str]
    members: dict[str, set[str]] = field(default_factory=lambda: {A: set(), B: set()})
    ltv: dict[str, int] = field(default_factory=dict)

    def write(self) -> None:
        for key, name in AUDIENCES.items():
            self.setup.warehouse.members(name, *sorted(self.members[key]))
        self.setup.warehouse.trait("Lifetime Value", self.ltv)

    def mismatches(self, held: dict[str, dict[str, Any]]) -> list[str]:
        """Every (user, key) with a value in the source that the receiver holds otherwise.

        An audience always has one (never sent counts as not a member); a trait only
        while its source row has a value.
        """
        wrong = []
        for user in self.users:
            seen = held.get(user, {})
            for key, members in self.members.items():
                if seen.get(key, False) is not (user in members):
                    wrong.append(f"{user} {key}: source {user in members}, held {seen.get(key)}")
            if user in self.ltv and seen.get(LTV) != self.ltv[user]:
                wrong.append(f"{user} {LTV}: source {self.ltv[user]}, held {seen.get(LTV)}")
        return wrong


class Syncs:
    """Runs `reconciler sync` as a subprocess, one at a time, against the receiver.

    Three configs: `normal` (a 30 s timeout, so a busy machine never makes an answer
    late), `hasty` (a 1 s timeout, for runs whose answers may come late on purpose)
    and `refusing` (its webhook is a port bound to nobody listening: refused).
    """

    def __init__(self, setup: Setup, max_concurrency: int = 1) -> None:
        self.setup = setup
        text = setup.config_text(
            audiences=tuple(AUDIENCES.values()), destination="max_attempts = 1"
        )
        text = text.replace("max_concurrency = 4", f"max_concurrency = {max_concurrency}")
        self.unheard = socket.socket()  # bound, never listening: connections are refused
        self.unheard.bind(("127.0.0.1", 0))
        port = self.unheard.getsockname()[1]
        self.configs = {}
        for name, timeout, url in (
            ("normal", PATIENCE / 2, setup.receiver.url),
            ("hasty", HASTY_TIMEOUT, setup.receiver.url),
            ("refusing", PATIENCE / 2, f"http://127.0.0.1:{port}/hook/s3cr3t-token"),
        ):
            path = setup.tmp_path / f"{name}.toml"
            path.write_text(
                text.replace("timeout_seconds = 5", f"timeout_seconds = {timeout}").replace(
                    setup.receiver.url, url
                )
            )
            self.configs[name] = path
        self.child: subprocess.Popen[bytes] | None = None
        self.given_up = threading.Event()  # set once the current sync has exited

    def close(self) -> None:
        self.unheard.close()

    def kill(self) -> bool:
        """SIGKILL the running sync and wait until it is gone; False if it already was."""
        assert self.child is not None
        alive = self.child.poll() is None
        if alive:
            os.kill(self.child.pid, signal.SIGKILL)
        self.child.wait(PATIENCE)
        return alive

    def late(self) -> None:
        """A `then` hook: answer only once the client has given up and exited."""
        assert self.given_up.wait(PATIENCE), "the client never gave up"

    def run(
        self,
        respond: Respond | None = None,
        config: str = "normal",
        after_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ) -> tuple[int, list[Received]]:
        """One sync with `config`; returns its exit status and the requests it made."""
        receiver = self.setup.receiver
        first = len(receiver.requests)
        receiver.respond = respond or (lambda _n, _b: Reply())
        self.given_up = threading.Event()
        self.child = subprocess.Popen(
            [RECONCILER, "sync", "--config", str(self.configs[config])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        try:
            if after_start is not None:
                after_start(self.child)
            _, stderr = self.child.communicate(timeout=PATIENCE)
        finally:
            if self.child.poll() is None:
                self.kill()
            self.given_up.set()
        code = self.child.returncode
        assert code in (0, 1, -signal.SIGKILL), stderr.decode(errors="replace")
        if code == 1:
            assert b"unexpected error" not in stderr, stderr.decode(errors="replace")
        return code, receiver.requests[first:]


def custom(request: Received) -> dict[str, Any]:
    return {item["key"]: item["value"] for item in request.body.get("custom", [])}


def ambiguous(kind: str, syncs: Syncs) -> Reply:
    """A reply whose body is applied but whose 200 the client never records."""
    if kind == "drop":
        return Reply(drop=True)
    if kind == "late":
        return Reply(then=syncs.late)
    assert kind == "500"
    return Reply(500, "internal error", apply=True)


def kinds(*fast: str) -> list[Any]:
    """Every ambiguous kind; those not in `fast` run with the slow tests only."""
    return [
        k if k in fast else pytest.param(k, marks=pytest.mark.slow) for k in ("drop", "late", "500")
    ]


def only(reply: Reply) -> Respond:
    return lambda _n, _b: reply


@pytest.fixture
def model(setup: Setup) -> Model:
    setup.warehouse.user("u1", email="u1@example.com")
    return Model(setup, ["u1"])


@pytest.fixture
def make_syncs() -> Iterator[Callable[..., Syncs]]:
    made: list[Syncs] = []

    def make(setup: Setup, max_concurrency: int = 1) -> Syncs:
        made.append(Syncs(setup, max_concurrency))
        return made[-1]

    yield make
    for syncs in made:
        syncs.close()


@pytest.mark.parametrize("kind", kinds("drop", "late"))
def test_chain1_entering_then_a_refused_update_then_leaving_everything(model, make_syncs, kind):
    """Enter A (applied, unacknowledged); enter B (503); leave both: A false is sent."""
    syncs = make_syncs(model.setup)
    model.members[A] = {"u1"}
    model.write()
    assert syncs.run(only(ambiguous(kind, syncs)), "hasty")[0] == 1
    model.members[B] = {"u1"}
    model.write()
    code, requests = syncs.run(only(Reply(503, "unavailable")))
    assert code == 1 and [custom(r) for r in requests] == [{A: True, B: True}]
    model.members = {A: set(), B: set()}
    model.write()
    code, requests = syncs.run()
    assert code == 0 and [custom(r) for r in requests] == [{A: False}]
    assert model.mismatches(model.setup.receiver.holds()) == []


def test_chain2_killed_before_the_200_then_a_refused_correction_then_a_trait(model, make_syncs):
    """Enter A (applied, then SIGKILL); leave A (503); a trait changes: A false goes too."""
    syncs = make_syncs(model.setup)
    model.members[A] = {"u1"}
    model.write()
    code, requests = syncs.run(only(Reply(drop=True, then=syncs.kill)))
    assert code == -signal.SIGKILL and requests[0].applied
    model.members[A] = set()
    model.write()
    code, requests = syncs.run(only(Reply(503, "unavailable")))
    assert code == 1 and [custom(r) for r in requests] == [{A: False}]
    model.ltv["u1"] = 42
    model.write()
    code, requests = syncs.run()
    assert code == 0 and [custom(r) for r in requests] == [{A: False, LTV: 42}]
    assert model.mismatches(model.setup.receiver.holds()) == []


@pytest.mark.parametrize("kind", kinds("drop"))
def test_chain3_a_trait_applied_then_its_row_deleted_then_back_to_acknowledged(
    model, make_syncs, kind
):
    """100 acknowledged; 200 applied, unacknowledged; row deleted; back at 100: 100 is sent."""
    syncs = make_syncs(model.setup)
    model.ltv["u1"] = 100
    model.write()
    assert syncs.run()[0] == 0
    model.ltv["u1"] = 200
    model.write()
    assert syncs.run(only(ambiguous(kind, syncs)), "hasty")[0] == 1
    del model.ltv["u1"]
    model.write()
    code, requests = syncs.run()
    assert (code, requests) == (0, [])  # a value that disappears sends nothing
    model.ltv["u1"] = 100
    model.write()
    code, requests = syncs.run()
    assert code == 0 and [custom(r) for r in requests] == [{LTV: 100}]
    assert model.mismatches(model.setup.receiver.holds()) == []


@pytest.mark.parametrize("kind", kinds("drop", "500"))
def test_chain4_a_trait_applied_then_a_refused_change_then_back_to_acknowledged(
    model, make_syncs, kind
):
    """100 acknowledged; 200 applied, unacknowledged; 300 gets 503; back at 100: 100 is sent."""
    syncs = make_syncs(model.setup)
    model.ltv["u1"] = 100
    model.write()
    assert syncs.run()[0] == 0
    model.ltv["u1"] = 200
    model.write()
    assert syncs.run(only(ambiguous(kind, syncs)), "hasty")[0] == 1
    model.ltv["u1"] = 300
    model.write()
    code, requests = syncs.run(only(Reply(503, "unavailable")))
    assert code == 1 and [custom(r) for r in requests] == [{LTV: 300}]
    model.ltv["u1"] = 100
    model.write()
    code, requests = syncs.run()
    assert code == 0 and [custom(r) for r in requests] == [{LTV: 100}]
    assert model.mismatches(model.setup.receiver.holds()) == []


def test_an_acknowledged_resend_clears_the_mark_and_nothing_more_is_sent(
    model, make_syncs, engine_of
):
    """The obligation ends with the acknowledgement: the next run sends nothing."""
    engine = engine_of(model.setup)
    syncs = make_syncs(model.setup)
    model.ltv["u1"] = 100
    model.write()
    syncs.run()
    model.ltv["u1"] = 200
    model.write()
    syncs.run(only(Reply(drop=True)))
    assert marks(engine) == [("u1", LTV)]
    model.ltv["u1"] = 100
    model.write()
    assert [custom(r) for r in syncs.run()[1]] == [{LTV: 100}]
    assert marks(engine) == []
    assert syncs.run() == (0, [])


def test_a_refused_connection_or_a_503_leaves_nothing_uncertain(model, make_syncs, engine_of):
    """Certainly not delivered: returning to the acknowledged state sends nothing."""
    engine = engine_of(model.setup)
    syncs = make_syncs(model.setup)
    model.ltv["u1"] = 100
    model.write()
    syncs.run()
    model.ltv["u1"] = 200
    model.write()
    assert syncs.run(config="refusing") == (1, [])
    model.ltv["u1"] = 300
    model.write()
    assert syncs.run(only(Reply(503, "unavailable")))[0] == 1
    assert marks(engine) == []
    model.ltv["u1"] = 100
    model.write()
    assert syncs.run() == (0, [])


def marks(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return sorted((r.user_id, r.key) for r in conn.execute(select(uncertain_keys)))


# --- the randomized model --------------------------------------------------------------

FAULTS = (  # (kind, weight) of each request's answer
    ("ok", 52),
    ("apply+drop", 8),
    ("apply+late", 5),
    ("503", 8),
    ("500 applied", 5),
    ("500 not applied", 4),
    ("429", 6),
    ("arrived, then killed", 2),
    ("applied, then killed", 3),
)
KILL_AFTER = 0.12  # share of rounds killed by a timer at a random moment
REFUSED = 0.06  # share of rounds whose webhook refuses connections
CHECK_EVERY = 10  # every so many rounds, a healthy run and a comparison


@dataclass
class Figures:
    rounds: int = 0
    checks: int = 0
    mismatches: int = 0  # at the latest comparison
    kills: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    exits: Counter[int] = field(default_factory=Counter)

    def line(self, backend: str, seed: int, bodies: list[Received]) -> str:
        ids = Counter(r.body["message_id"] for r in bodies)
        return (
            f"[{backend}] seed {seed}: rounds {self.rounds} (healthy checks "
            f"{self.checks}), kills {sum(self.kills.values())}"
            f" {dict(self.kills)}, faults {dict(self.faults)}, exits {dict(self.exits)},"
            f" bodies {len(bodies)}, duplicates sharing an id "
            f"{sum(n - 1 for n in ids.values())}, final mismatches {self.mismatches}"
        )


class Chaos:
    """Random answers for one round, counted; a kill answer kills the running sync."""

    def __init__(self, rng: random.Random, syncs: Syncs, figures: Figures) -> None:
        self.rng, self.syncs, self.figures = rng, syncs, figures
        self.kinds = [kind for kind, _ in FAULTS]
        self.weights = [weight for _, weight in FAULTS]

    def __call__(self, _n: int, _body: dict[str, Any]) -> Reply:
        kind = self.rng.choices(self.kinds, self.weights)[0]  # under the receiver's lock
        self.figures.faults[kind] += 1
        return {
            "ok": Reply(),
            "apply+drop": Reply(drop=True),
            "apply+late": Reply(then=self.syncs.late),
            "503": Reply(503, "unavailable"),
            "500 applied": Reply(500, "oops", apply=True),
            "500 not applied": Reply(500, "oops", apply=False),
            "429": Reply(429, "slow down", headers={"Retry-After": "0"}),
            "arrived, then killed": Reply(drop=True, apply=False, then=self.kill(kind)),
            "applied, then killed": Reply(drop=True, then=self.kill(kind)),
        }[kind]

    def kill(self, kind: str) -> Callable[[], None]:
        def hook() -> None:
            if self.syncs.kill():  # two requests in flight may both ask
                self.figures.kills["at a request: " + kind.split(",")[0]] += 1

        return hook


def change(model: Model, rng: random.Random) -> None:
    """One to three moves: a user in or out of an audience, a trait value from a small
    set (so it often returns to the acknowledged one), a trait row deleted or back.
    Few moves a round, so that a value lost by a chain stays lost long enough to see."""
    for _ in range(rng.randint(1, 3)):
        user, key = rng.choice(model.users), rng.choice((A, B, LTV))
        if key != LTV:
            model.members[key] ^= {user}
            continue
        value = rng.choice([v for v in (None, 1, 2, 3) if v != model.ltv.get(user)])
        if value is None:
            del model.ltv[user]
        else:
            model.ltv[user] = value
    model.write()


def chaos(setup: Setup, syncs: Syncs, engine: Engine, rounds: int, seed: int) -> None:
    users = [f"u{n}" for n in range(1, 7)]
    for user in users:
        setup.warehouse.user(user, email=f"{user}@example.com")
    model = Model(setup, users)
    figures = Figures()
    try:
        wrong = chaos_rounds(model, syncs, engine, figures, rounds, seed)
        figures.mismatches = len(wrong)
    finally:  # the figures, and the seed to replay, whatever happened
        print("\n" + figures.line(engine.dialect.name, seed, list(setup.receiver.requests)))
    assert wrong == [], f"seed {seed}: {wrong}"
    again = syncs.run()
    assert again == (0, []), f"seed {seed}: the run after the healthy one sent {again[1]}"
    same_id_same_body(list(setup.receiver.requests), seed)
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(func.count()).select_from(updates).where(updates.c.status == "pending")
            ).scalar_one()
            == 0
        )
    assert sum(figures.kills.values()) >= rounds // 20, f"seed {seed}: too few kills"


def chaos_rounds(
    model: Model, syncs: Syncs, engine: Engine, figures: Figures, rounds: int, seed: int
) -> list[str]:
    """The rounds, then a healthy run; returns the mismatches it leaves."""
    rng = random.Random(seed)
    for number in range(1, rounds + 1):
        change(model, rng)
        figures.rounds += 1
        if number % CHECK_EVERY == 0:
            code, _ = syncs.run()  # a healthy run, then the receiver must hold the source
            wrong = model.mismatches(model.setup.receiver.holds())
            figures.mismatches = len(wrong)
            assert (code, wrong) == (0, []), f"seed {seed}, round {number}: {wrong}"
            figures.checks += 1
            continue
        timer: Callable[[subprocess.Popen[bytes]], None] | None = None
        if rng.random() < KILL_AFTER:
            delay = rng.uniform(0.05, 1.5)

            def timer(child: subprocess.Popen[bytes], delay: float = delay) -> None:
                try:
                    child.wait(delay)
                except subprocess.TimeoutExpired:
                    if syncs.kill():
                        figures.kills["timer"] += 1

        refused = rng.random() < REFUSED
        if refused:
            figures.faults["refused (whole round)"] += 1
        code, _ = syncs.run(
            Chaos(rng, syncs, figures), "refusing" if refused else "hasty", after_start=timer
        )
        figures.exits[code] += 1
        if code != -signal.SIGKILL:
            with engine.connect() as conn:
                status = (
                    conn.execute(select(sync_runs.c.status).order_by(sync_runs.c.id.desc()))
                    .scalars()
                    .first()
                )
            assert status in ("succeeded", "partial"), f"seed {seed}: a run ended {status}"
    code, _ = syncs.run()
    assert code == 0, f"seed {seed}: the healthy run exited {code}"
    return model.mismatches(model.setup.receiver.holds())


def same_id_same_body(bodies: list[Received], seed: int) -> None:
    """A message id is only ever re-sent with the same body (sent_at aside)."""
    by_id: dict[str, dict[str, Any]] = {}
    for request in bodies:
        body = {k: v for k, v in request.body.items() if k != "sent_at"}
        first = by_id.setdefault(body["message_id"], body)
        assert first == body, f"seed {seed}: two bodies share {body['message_id']}"


@pytest.mark.slow
def test_random_faults_and_kills_lose_nothing(
    setup: Setup, make_syncs: Any, engine_of: Any
) -> None:
    """150 rounds; UNCERTAIN_SEED and UNCERTAIN_ROUNDS replay or stretch it."""
    chaos(
        setup,
        make_syncs(setup, 2),
        engine_of(setup),
        rounds=int(os.environ.get("UNCERTAIN_ROUNDS", "150")),
        seed=int(os.environ.get("UNCERTAIN_SEED", "9")),
    )


def test_a_few_random_rounds_lose_nothing(setup: Setup, make_syncs: Any, engine_of: Any) -> None:
    """The same model, short enough for every run of the suite."""
    chaos(setup, make_syncs(setup, 2), engine_of(setup), rounds=12, seed=3)
