"""Delivering planned bodies to the webhook (SPEC §5 "Responses").

One long-lived `httpx.Client` shared by `max_concurrency` threads (measured faster
than `AsyncClient` on loopback; see bench/), paced by one shared `Pacer`.

    2xx                                   acknowledged
    408, 423, 429, 5xx except 501,        retried with exponential backoff and full
    transport errors (connect, reset,     jitter, or after Retry-After (seconds or HTTP
    timeouts, protocol errors, dropped    date, at most 5 minutes) when given, up to
    connections)                          `max_attempts`; past those, or past the run's
                                          retry budget, the update stays pending
    anything else                         rejected: status and first 500 characters

The retry budget (`retry_budget_seconds`) is the total of every retry wait in one
run, summed over all updates and shared by all threads, so a run always ends: a wait
that does not fit in what is left is not taken and the update stays pending for the
next run. A 429 or a Retry-After pauses every thread for the same wait (`Pacer.pause`).

Retries use tenacity rather than stamina because tenacity's sleep is injectable: a
stop (daemon shutdown, lost lock) interrupts a backoff wait at once. Nothing here
touches the database: `deliver` yields `Delivery` results and the run records them,
each attempt with its status, latency and error (including the retry decision and
any Retry-After it honoured).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from .config import Destination
from .contact import with_sent_at
from .ledger import AttemptRecord
from .pacing import Clock, Pacer, Sleep
from .redact import Redactor

RETRY_STATUSES = frozenset({408, 423, 429} | {s for s in range(500, 600) if s != 501})
# Retryable answers that say the request was turned away before any work was done.
NOT_PROCESSED = frozenset({408, 423, 429, 503})
MAX_RETRY_AFTER = 300.0
ERROR_EXCERPT = 500
# Python cannot wait on two events at once; the second is checked this often.
STOP_POLL = 0.1
_DELAY_SECONDS = re.compile(r"\d+(\.\d+)?")


@dataclass(frozen=True)
class Job:
    update_id: int
    message_id: str
    body: str


@dataclass
class Delivery:
    """What became of one job: `acknowledged`, `rejected` or `pending`."""

    job: Job
    result: str = "pending"
    attempts: list[AttemptRecord] = field(default_factory=list)
    # The last attempt's error before a retry decision was prefixed to it.
    detail: str = field(default="", repr=False)

    def decide(self, decision: str) -> None:
        """Prefix the last attempt's error with what was decided after it."""
        last = self.attempts[-1]
        error = f"{decision}; {self.detail}" if self.detail else decision
        self.attempts[-1] = dataclasses.replace(last, error=error)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), 0 to 300.

    None when the header is absent or unreadable (the usual backoff applies then).
    """
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class RetryBudget:
    """Seconds of retry waiting this run may still spend, shared by every thread."""

    def __init__(self, seconds: float) -> None:
        self._left = seconds
        self._lock = threading.Lock()

    def take(self, seconds: float) -> bool:
        """Spend `seconds` if that much is left; False (and nothing spent) otherwise."""
        with self._lock:
            if seconds > self._left:
                return False
            self._left -= seconds
            return True

    @property
    def left(self) -> float:
        with self._lock:
            return self._left


class Sender:
    """Sends jobs concurrently, paced, retried; one instance per run.

    `stops`: events that end the sending (any one set is enough): no new request
    starts, waits end at once, requests in flight finish.
    `clock` and `sleep` drive the pacer and retry waits; tests inject both.
    """

    def __init__(self, destination: Destination, *, stops: Sequence[threading.Event] = (),
                 transport: httpx.BaseTransport | None = None,
                 backoff_initial: float = 0.5, backoff_max: float = 60.0,
                 clock: Clock = time.monotonic, sleep: Sleep | None = None) -> None:
        self.destination = destination
        # Set when the caller abandons `deliver`: workers stop waiting and retrying.
        self._abandoned = threading.Event()
        self.stops = (*stops, self._abandoned)
        self.sleep = sleep or self._sleep_unless_stopped
        self.pacer = Pacer(destination.requests_per_second, self.sleep, clock)
        self.budget = RetryBudget(destination.retry_budget_seconds)
        self.backoff = wait_random_exponential(multiplier=backoff_initial, max=backoff_max)
        self.redact = Redactor(webhook_url=destination.webhook_url)
        limits = httpx.Limits(max_connections=destination.max_concurrency,
                              max_keepalive_connections=destination.max_concurrency)
        # The transport retries failed connects once; every other retry is ours.
        self.client = httpx.Client(
            timeout=httpx.Timeout(destination.timeout_seconds), limits=limits,
            headers={"Content-Type": "application/json"},
            transport=transport or httpx.HTTPTransport(retries=1, limits=limits))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def stopping(self) -> bool:
        return any(event.is_set() for event in self.stops)

    def deliver(self, jobs: Iterable[Job]) -> Iterator[Delivery]:
        """Send every job; yield each result as it completes (not in job order).

        After a stop no request starts: queued jobs come back pending without attempts,
        and jobs not yet taken from `jobs` are not yielded (they stay pending). If the
        caller abandons the iteration, queued jobs are cancelled and retry waits end,
        so nothing is sent that the caller will not see.
        """
        concurrency = self.destination.max_concurrency
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="send")
        inflight: set[Future[Delivery]] = set()
        finished = False
        try:
            for job in jobs:
                if self.stopping():
                    break
                # A short queue: a stop leaves little behind, memory stays flat.
                while len(inflight) >= 2 * concurrency:
                    done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    yield from (future.result() for future in done)
                inflight.add(pool.submit(self._deliver_one, job))
            while inflight:
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
            finished = True
        finally:
            if not finished:
                self._abandoned.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _deliver_one(self, job: Job) -> Delivery:
        delivery = Delivery(job)
        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self.destination.max_attempts),
            wait=lambda state: self._wait(delivery, state),
            sleep=self._retry_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._attempt(delivery)
        except _Retryable:
            delivery.decide(f"not retried: max_attempts ({self.destination.max_attempts}) "
                            "reached; stays pending")
        except _GiveUp as give_up:
            if delivery.attempts:
                delivery.decide(f"not retried: {give_up}; stays pending")
        return delivery

    def _attempt(self, delivery: Delivery) -> None:
        """One POST; raises _Retryable when the response or error is worth retrying."""
        if self.stopping() or not self.pacer.wait():
            raise _GiveUp("the run is stopping")
        sent_at = datetime.now(UTC)
        started = time.perf_counter()
        number = len(delivery.attempts) + 1
        try:
            response = self.client.post(self.destination.webhook_url.reveal(),
                                        content=with_sent_at(delivery.job.body, sent_at))
        except httpx.RequestError as exc:
            # The request may or may not have reached the destination: retrying with the
            # same message id is safe either way.
            delivery.detail = self._excerpt(f"{type(exc).__name__}: {exc}")
            never_connected = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            delivery.attempts.append(AttemptRecord(
                number, sent_at, _ms(started), None, "error", delivery.detail,
                maybe_delivered=not never_connected))
            raise _Retryable(None, None) from None
        latency = _ms(started)
        status = response.status_code
        if 200 <= status < 300:
            delivery.attempts.append(AttemptRecord(number, sent_at, latency, status,
                                                   "acknowledged", None))
            delivery.result = "acknowledged"
            return
        excerpt = self._excerpt(response.text)
        if status in RETRY_STATUSES:
            header = response.headers.get("Retry-After")
            parts = [f"Retry-After: {header[:40]}" if header is not None else "",
                     f"response: {excerpt}" if excerpt else ""]
            delivery.detail = "; ".join(p for p in parts if p)
            delivery.attempts.append(AttemptRecord(
                number, sent_at, latency, status, "retry", delivery.detail or None,
                maybe_delivered=status not in NOT_PROCESSED))
            raise _Retryable(retry_after_seconds(header), status)
        delivery.attempts.append(AttemptRecord(number, sent_at, latency, status, "rejected",
                                               excerpt, maybe_delivered=False))
        delivery.result = "rejected"

    def _wait(self, delivery: Delivery, state: RetryCallState) -> float:
        """The wait before the next attempt, taken from the run's retry budget."""
        exc = state.outcome.exception() if state.outcome else None
        assert isinstance(exc, _Retryable)
        delay = exc.retry_after if exc.retry_after is not None else float(self.backoff(state))
        if not self.budget.take(delay):
            raise _GiveUp(f"a {delay:.2f} s wait exceeds the run's retry budget "
                          f"({self.budget.left:.2f} s left)")
        if exc.status == 429 or exc.retry_after is not None:
            self.pacer.pause(delay)  # the destination asked everyone to slow down
        delivery.decide(f"retry in {delay:.2f} s")
        return delay

    def _retry_sleep(self, seconds: float) -> None:
        if self.sleep(seconds):
            raise _GiveUp("the run is stopping")

    def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as any stop event is set."""
        first = self.stops[0]
        deadline = time.monotonic() + seconds
        while not self.stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            first.wait(min(left, STOP_POLL))
        return True

    def _excerpt(self, text: str) -> str:
        # Redact before cutting: a secret straddling the cut would otherwise half survive.
        room = ERROR_EXCERPT + len(self.destination.webhook_url.reveal())
        return self.redact(text[:room])[:ERROR_EXCERPT]


class _Retryable(Exception):
    """This attempt failed in a way worth retrying."""

    def __init__(self, retry_after: float | None, status: int | None) -> None:
        self.retry_after, self.status = retry_after, status


class _GiveUp(Exception):
    """No more attempts this run (stopping, or out of retry budget): stays pending."""


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
