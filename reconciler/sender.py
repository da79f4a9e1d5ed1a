"""Delivering planned bodies to the webhook (SPEC §5 "Responses").

One long-lived `httpx.Client` shared by `max_concurrency` threads (measured faster
than `AsyncClient` on loopback; see bench/). Each update is retried with exponential
backoff and full jitter on 408, 423, 429, 5xx other than 501 and transport errors,
honouring Retry-After (seconds or HTTP date, at most 5 minutes), within `max_attempts`
and the run's retry budget; past those it stays pending for the next run. Any other
status is a permanent rejection. Waits end early when the run is asked to stop.

Nothing here touches the database: `deliver` yields `Delivery` results and the run
records them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
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
from .pacing import Pacer
from .redact import Redactor

RETRY_STATUSES = frozenset({408, 423, 429} | {s for s in range(500, 600) if s != 501})
MAX_RETRY_AFTER = 300.0
ERROR_EXCERPT = 500


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


class _Retryable(Exception):
    def __init__(self, retry_after: float | None) -> None:
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class Sender:
    """Sends jobs concurrently, paced, retried; one instance per run."""

    def __init__(self, destination: Destination, *, stop: threading.Event | None = None,
                 transport: httpx.BaseTransport | None = None,
                 backoff_initial: float = 0.5, backoff_max: float = 60.0) -> None:
        self.destination = destination
        self.stop = stop or threading.Event()
        self.pacer = Pacer(destination.requests_per_second)
        self.deadline = time.monotonic() + destination.retry_budget_seconds
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.redact = Redactor(webhook_url=destination.webhook_url)
        limits = httpx.Limits(max_connections=destination.max_concurrency,
                              max_keepalive_connections=destination.max_concurrency)
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

    def deliver(self, jobs: Iterable[Job]) -> Iterator[Delivery]:
        """Send every job; yield each result as it completes (not in job order)."""
        concurrency = self.destination.max_concurrency
        with ThreadPoolExecutor(concurrency, thread_name_prefix="send") as pool:
            inflight: set[Future[Delivery]] = set()
            for job in jobs:
                if self.stop.is_set():
                    break
                while len(inflight) >= 2 * concurrency:
                    done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    yield from (future.result() for future in done)
                inflight.add(pool.submit(self._deliver_one, job))
            while inflight:
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)

    def _deliver_one(self, job: Job) -> Delivery:
        delivery = Delivery(job)
        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self.destination.max_attempts),
            wait=self._wait,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._attempt(delivery)
        except (_Retryable, _Stopped):
            delivery.result = "pending"
        return delivery

    def _attempt(self, delivery: Delivery) -> None:
        if not self.pacer.wait(self.stop):
            raise _Stopped
        sent_at = datetime.now(UTC)
        started = time.perf_counter()
        number = len(delivery.attempts) + 1
        try:
            response = self.client.post(self.destination.webhook_url,
                                        content=with_sent_at(delivery.job.body, sent_at))
        except httpx.TransportError as exc:
            error = self.redact(f"{type(exc).__name__}: {exc}")[:ERROR_EXCERPT]
            delivery.attempts.append(AttemptRecord(
                number, sent_at, _ms(started), None, "error", error))
            raise _Retryable(None) from None
        latency = _ms(started)
        status = response.status_code
        if 200 <= status < 300:
            delivery.attempts.append(AttemptRecord(number, sent_at, latency, status,
                                                   "acknowledged", None))
            delivery.result = "acknowledged"
            return
        excerpt = self.redact(response.text[:ERROR_EXCERPT])
        if status in RETRY_STATUSES:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if status == 429 or retry_after is not None:
                self.pacer.pause(retry_after if retry_after is not None else self.backoff_initial)
            delivery.attempts.append(AttemptRecord(number, sent_at, latency, status, "retry",
                                                   excerpt))
            raise _Retryable(retry_after)
        delivery.attempts.append(AttemptRecord(number, sent_at, latency, status, "rejected",
                                               excerpt))
        delivery.result = "rejected"

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        backoff = wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
        delay = float(backoff(state))
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            delay = exc.retry_after
        if time.monotonic() + delay > self.deadline:
            raise _Stopped  # past the run's retry budget: stays pending
        return delay

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Stopped


class _Stopped(Exception):
    """The run is stopping or out of retry budget; the update stays pending."""


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
