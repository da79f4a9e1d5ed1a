"""How many requests to keep in flight: as many as help, never more than `max_concurrency`.

Little's law: requests in flight = rate x latency. Two rates bound a run: the pace
(`requests_per_second`, when set) and what this process can do, one request per
`cpu` seconds of its own work (building, parsing, recording). So the limit is

    in flight = min(pace x latency, latency_min / cpu) x headroom,  1 .. max_concurrency

On loopback a request waits about as long as it costs: one or two in flight keep the
process busy, and more only add thread switching (measured: 20 threads over one pool
cost 25-50 % more CPU per request than two). At 150 ms of latency, 40/s needs 6 in
flight and an unpaced run all of `max_concurrency`. The CPU-bound term uses the
fastest latency of the window, which extra concurrency does not inflate, so it cannot
feed on itself; the paced term uses the mean, which is what the pace has to cover.

    Concurrency(ceiling, rate)   the controller: `observe` each request; `limit`
    Gate(limit)                  admits at most `limit` working threads; resizable
    Handoff(starving)            results from the workers to the caller, in batches
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

HEADROOM = 1.5
# A window ends after this many requests and this many seconds, whichever is later.
WINDOW_REQUESTS = 4
WINDOW_SECONDS = 0.05
# Weight of the newest window in the smoothed CPU cost per request.
SMOOTHING = 0.3


def target(ceiling: int, rate: float, fastest: float, mean: float, cpu: float) -> int:
    """The number of requests to keep in flight (pure; seconds throughout).

    `rate`: the pace (0 = unpaced); `fastest`, `mean`: latencies of the last window;
    `cpu`: this process's CPU seconds per request.
    """
    capacity = fastest / cpu if cpu > 0 else math.inf  # in flight that keeps the CPU busy
    paced = rate * mean if rate > 0 else math.inf
    needed = min(paced, capacity) * HEADROOM
    return max(1, min(ceiling, math.ceil(needed) if math.isfinite(needed) else ceiling))


class Concurrency:
    """Adapts the in-flight limit to observed latency and CPU cost, window by window."""

    def __init__(
        self,
        ceiling: int,
        rate: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.ceiling, self.rate = ceiling, rate
        # Start at the ceiling: a slow destination is served at once, and on loopback
        # the first window (50 ms) of too many threads costs next to nothing.
        self.limit = ceiling
        self._clock, self._cpu = clock, cpu
        self._lock = threading.Lock()
        self._cost: float | None = None
        self._start_window()

    def _start_window(self) -> None:
        self._count, self._total, self._fastest = 0, 0.0, math.inf
        self._since, self._cpu_since = self._clock(), self._cpu()

    def observe(self, latency: float) -> int | None:
        """Count one finished request (`latency` seconds); the new limit if it changed."""
        with self._lock:
            self._count += 1
            self._total += latency
            self._fastest = min(self._fastest, latency)
            if (
                self._count < max(WINDOW_REQUESTS, self.limit)
                or self._clock() - self._since < WINDOW_SECONDS
            ):
                return None
            cost = (self._cpu() - self._cpu_since) / self._count
            self._cost = (
                cost if self._cost is None else (SMOOTHING * cost + (1 - SMOOTHING) * self._cost)
            )
            limit = target(
                self.ceiling, self.rate, self._fastest, self._total / self._count, self._cost
            )
            self._start_window()
            if limit == self.limit:
                return None
            self.limit = limit
            return limit


class Gate:
    """At most `limit` threads inside at once; the limit may change while they are.

    A thread steps out for a retry wait (making room for another) and back in after
    it even when the gate is full; `crowded` then tells one of the others to leave.
    """

    def __init__(self, limit: int) -> None:
        self._changed = threading.Condition()
        self._limit = limit
        self._inside = 0
        self._waiting = 0  # threads stepped out for a retry wait

    @property
    def wanted(self) -> int:
        """Threads that can be busy now: the limit plus those in retry waits."""
        with self._changed:
            return self._limit + self._waiting

    def enter(self) -> None:
        with self._changed:
            while self._inside >= self._limit:
                self._changed.wait()
            self._inside += 1

    def leave(self) -> None:
        with self._changed:
            self._inside -= 1
            self._changed.notify()

    def step_out(self) -> None:
        """Leave for a retry wait."""
        with self._changed:
            self._inside -= 1
            self._waiting += 1
            self._changed.notify()

    def step_in(self) -> None:
        """Back from a retry wait: in at once, full or not."""
        with self._changed:
            self._waiting -= 1
            self._inside += 1

    def crowded(self) -> bool:
        """More threads inside than the limit (read without the lock: a hint)."""
        return self._inside > self._limit

    def resize(self, limit: int) -> None:
        with self._changed:
            self._limit = limit
            self._changed.notify_all()


class Handoff(Generic[T]):
    """Items from worker threads to one consumer thread, handed over in batches.

    Waking the consumer for every item cost about a tenth of a request's CPU on
    loopback (two threads trading the GIL for each result). It is woken when `BATCH`
    items are ready, when `starving()` says the workers are running out of work, or
    for an `urgent` item, and looks every `TICK` seconds anyway.
    """

    BATCH = 32
    TICK = 0.02

    def __init__(self, starving: Callable[[], bool]) -> None:
        self._ready = threading.Condition(threading.Lock())
        self._items: list[T] = []
        self._starving = starving
        self._waiting = False

    def put(self, item: T, urgent: bool = False) -> None:
        with self._ready:
            self._items.append(item)
            if self._waiting and (urgent or len(self._items) >= self.BATCH or self._starving()):
                self._ready.notify()

    def take(self) -> list[T]:
        """Every item so far; waits for at least one."""
        with self._ready:
            while not self._items:
                self._waiting = True
                self._ready.wait(self.TICK)
                self._waiting = False
            items, self._items = self._items, []
            return items
