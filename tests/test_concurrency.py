"""How many requests the sender keeps in flight (concurrency.py): Little's law, bounded.

The controller is fed numbers (latencies, a fake clock, a fake CPU counter), never
real time; the gate is driven from threads that wait on events with generous bounds.
"""

from __future__ import annotations

import threading

import pytest

from reconciler.delivery.concurrency import (
    WINDOW_REQUESTS,
    WINDOW_SECONDS,
    Concurrency,
    Gate,
    Handoff,
    target,
)

LOOPBACK = 0.0003  # seconds: a request on loopback, about what it costs in CPU


@pytest.mark.parametrize(
    "ceiling, rate, fastest, mean, cpu, expected",
    [
        (20, 0, LOOPBACK, 0.0004, 0.00025, 2),  # unpaced, loopback: one or two suffice
        (20, 0, LOOPBACK, 0.004, 0.00025, 2),  # more threads inflate the mean, not the min
        (20, 0, 0.150, 0.160, 0.0003, 20),  # unpaced, slow answers: the ceiling
        (8, 40, 0.150, 0.150, 0.0003, 8),  # 40/s x 150 ms = 6 in flight, x 1.5 headroom
        (20, 40, 0.150, 0.150, 0.0003, 9),
        (20, 200, LOOPBACK, 0.0004, 0.00025, 1),  # paced on loopback: one is plenty
        (20, 100_000, LOOPBACK, 0.003, 0.0003, 2),  # a pace beyond the CPU: the CPU decides
        (20, 0, LOOPBACK, LOOPBACK, 0.0, 20),  # no CPU measured yet: nothing limits
        (1, 0, 0.150, 0.150, 0.0003, 1),
    ],
)
def test_target_is_littles_law_within_one_and_the_ceiling(
    ceiling, rate, fastest, mean, cpu, expected
):
    assert target(ceiling, rate, fastest, mean, cpu) == expected


class Meter:
    """A clock and a CPU counter that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu_used = 5.0

    def clock(self) -> float:
        return self.now

    def cpu(self) -> float:
        return self.cpu_used


def window(
    controller: Concurrency,
    meter: Meter,
    latency: float,
    cpu_each: float,
    count: int,
    seconds: float = 1.01 * WINDOW_SECONDS,
) -> list[int | None]:
    """`count` requests of `latency` each, costing `cpu_each`, spread over `seconds`."""
    changes = []
    for _ in range(count):
        meter.now += seconds / count
        meter.cpu_used += cpu_each
        changes.append(controller.observe(latency))
    return changes


def test_starts_at_the_ceiling_and_comes_down_on_loopback():
    meter = Meter()
    controller = Concurrency(20, 0, clock=meter.clock, cpu=meter.cpu)
    assert controller.limit == 20
    changes = window(controller, meter, LOOPBACK, 0.00025, 20)
    assert changes[:-1] == [None] * 19 and changes[-1] == 2 == controller.limit


def test_a_window_needs_both_its_requests_and_its_time():
    meter = Meter()
    controller = Concurrency(4, 0, clock=meter.clock, cpu=meter.cpu)
    # Many requests in a moment: no decision until WINDOW_SECONDS have passed.
    assert window(controller, meter, LOOPBACK, 0.00025, 50, WINDOW_SECONDS / 2) == [None] * 50
    meter.now += WINDOW_SECONDS
    assert controller.observe(LOOPBACK) == 2


def test_the_limit_rises_when_answers_slow_down():
    meter = Meter()
    controller = Concurrency(20, 0, clock=meter.clock, cpu=meter.cpu)
    window(controller, meter, LOOPBACK, 0.00025, 20)
    assert controller.limit == 2
    assert window(controller, meter, 0.150, 0.0003, WINDOW_REQUESTS, 0.3)[-1] == 20


def test_an_unchanged_limit_is_not_reported():
    meter = Meter()
    controller = Concurrency(8, 40, clock=meter.clock, cpu=meter.cpu)
    assert window(controller, meter, 0.150, 0.0003, 8, 0.2) == [None] * 8
    assert controller.limit == 8


def test_cpu_cost_is_smoothed_over_windows():
    """One window with a burst of other work (a database flush) does not halve the limit."""
    meter = Meter()
    controller = Concurrency(20, 0, clock=meter.clock, cpu=meter.cpu)
    window(controller, meter, 0.0004, 0.00011, 20)
    assert controller.limit == 6  # 0.4 / 0.11 x 1.5 = 5.5
    window(controller, meter, 0.0004, 0.00044, 6)  # 4x the CPU per request, once
    assert controller.limit == 3  # that window alone would say 2


# --- The gate ---------------------------------------------------------------------------


def enter_in_thread(gate: Gate) -> tuple[threading.Thread, threading.Event]:
    inside = threading.Event()

    def run() -> None:
        gate.enter()
        inside.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, inside


def test_growing_the_gate_lets_a_waiting_thread_in():
    gate = Gate(1)
    gate.enter()
    thread, inside = enter_in_thread(gate)
    gate.resize(2)
    assert inside.wait(30)
    thread.join(30)
    assert not gate.crowded()


def test_leaving_lets_a_waiting_thread_in():
    gate = Gate(1)
    gate.enter()
    thread, inside = enter_in_thread(gate)
    gate.leave()
    assert inside.wait(30)
    thread.join(30)


def test_a_retry_wait_makes_room_and_comes_back_in_even_when_full():
    gate = Gate(1)
    gate.enter()
    gate.step_out()  # this thread waits for a retry: another may work meanwhile
    assert gate.wanted == 2
    thread, inside = enter_in_thread(gate)
    assert inside.wait(30)
    gate.step_in()  # back from the wait without blocking, although the gate is full
    assert gate.wanted == 1 and gate.crowded()
    gate.leave()
    assert not gate.crowded()
    thread.join(30)


def test_shrinking_the_gate_makes_it_crowded():
    gate = Gate(3)
    for _ in range(3):
        gate.enter()
    gate.resize(1)
    assert gate.crowded()
    gate.leave()
    gate.leave()
    assert not gate.crowded()


# --- The handoff ------------------------------------------------------------------------


def test_handoff_delivers_every_item_once_in_each_threads_order():
    handoff: Handoff[tuple[int, int]] = Handoff(lambda: False)
    producers = [
        threading.Thread(target=lambda t=t: [handoff.put((t, n)) for n in range(500)])
        for t in range(4)
    ]
    for producer in producers:
        producer.start()
    taken: list[tuple[int, int]] = []
    while len(taken) < 2000:  # `take` waits (in TICK steps) until something is there
        taken += handoff.take()
    for producer in producers:
        producer.join(30)
    assert sorted(taken) == [(t, n) for t in range(4) for n in range(500)]
    for t in range(4):
        assert [n for who, n in taken if who == t] == list(range(500))
