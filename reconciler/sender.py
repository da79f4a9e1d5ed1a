"""Delivering planned bodies to the webhook (SPEC §5 "Responses").

One long-lived `httpx.Client` shared by `max_concurrency` threads, paced by one
shared `Pacer`. What each answer means, and how long to wait before trying again,
is the `RetryPolicy`'s (retry.py); this module sends, waits and records:

- every attempt becomes an `AttemptRecord` carrying the policy's verdict as data;
- a wait is taken from the run's retry budget (`RetryBudget`, shared by every thread,
  so a run always ends); a wait that does not fit is not taken and the update stays
  pending for the next run, like one that ran out of attempts;
- a 429 or a Retry-After pauses every thread for the same wait (`Pacer.pause`);
- a stop (daemon shutdown, lost lock, the caller abandoning `deliver`) ends every wait
  at once and starts no new request.

The retry loop is ours rather than tenacity's or stamina's: giving up for the budget
or a stop is decided between attempts from state shared by all threads, which those
libraries can only express by raising from their wait or sleep callbacks, and the
wait must end on any of several events. Nothing here touches the database: `deliver`
yields `Delivery` results and the run records them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from .config import Destination
from .contact import with_sent_at
from .pacing import Clock, Pacer, Sleep
from .redact import Redactor
from .retry import (
    Acknowledged,
    AttemptRecord,
    Decision,
    Follow,
    GiveUp,
    Outcome,
    Rejected,
    Retry,
    RetryBudget,
    RetryPolicy,
    Verdict,
    give_up,
)

ERROR_EXCERPT = 500
RETRY_AFTER_EXCERPT = 40
# Python cannot wait on two events at once; the second is checked this often.
STOP_POLL = 0.1


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


class Sender:
    """Sends jobs concurrently, paced, retried; one instance per run.

    `stops`: events that end the sending (any one set is enough): no new request
    starts, waits end at once, requests in flight finish.
    `clock` and `sleep` drive the pacer and retry waits; tests inject both.
    `policy` defaults to the destination's (`RetryPolicy.from_destination`) with
    `backoff_initial` and `backoff_max`.
    """

    def __init__(self, destination: Destination, *, stops: Sequence[threading.Event] = (),
                 transport: httpx.BaseTransport | None = None,
                 backoff_initial: float = 0.5, backoff_max: float = 60.0,
                 clock: Clock = time.monotonic, sleep: Sleep | None = None,
                 policy: RetryPolicy | None = None) -> None:
        self.destination = destination
        self.policy = policy or RetryPolicy.from_destination(
            destination, backoff_initial=backoff_initial, backoff_max=backoff_max)
        # Set when the caller abandons `deliver`: workers stop waiting and retrying.
        self._abandoned = threading.Event()
        self.stops = (*stops, self._abandoned)
        self.sleep = sleep or self._sleep_unless_stopped
        self.pacer = Pacer(destination.requests_per_second, self.sleep, clock)
        self.budget = RetryBudget(self.policy.budget_seconds)
        self.redact = Redactor(webhook_url=destination.webhook_url)
        limits = httpx.Limits(max_connections=destination.max_concurrency,
                              max_keepalive_connections=destination.max_concurrency)
        # The transport retries failed connects once; every other retry is ours.
        self.client = httpx.Client(
            timeout=httpx.Timeout(destination.timeout_seconds), limits=limits,
            headers={"Content-Type": "application/json", "User-Agent": user_agent()},
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
        """Attempt `job` until the policy settles it or says to leave it pending."""
        delivery = Delivery(job)
        while not self.stopping() and self.pacer.wait():
            record, verdict = self._attempt(job, len(delivery.attempts) + 1)
            delivery.attempts.append(record)
            if isinstance(verdict, Acknowledged):
                delivery.result = "acknowledged"
                return delivery
            if isinstance(verdict, Rejected):
                delivery.result = "rejected"
                return delivery
            if isinstance(verdict, GiveUp):
                return delivery
            if verdict.pause_everyone:
                self.pacer.pause(verdict.delay)  # the destination asked everyone to slow down
            if self.sleep(verdict.delay):
                break
        if delivery.attempts and delivery.attempts[-1].decision == "retry":
            # The retry that was decided will not happen: say so on the last attempt.
            delivery.attempts[-1] = dataclasses.replace(delivery.attempts[-1],
                                                        decision="stopping")
        return delivery

    def _attempt(self, job: Job, number: int) -> tuple[AttemptRecord, Verdict]:
        """One POST (and the redirects it is sent on), judged by the policy.

        A retry's wait is already taken from the budget; one that does not fit comes
        back as a `GiveUp`. Each redirect hop waits for its own pacing slot.
        """
        sent_at = datetime.now(UTC)
        content = with_sent_at(job.body, sent_at)
        # The one place the webhook URL itself is used: as the request's target.
        url = self.destination.webhook_url
        hops, shown, latency = 0, None, 0.0
        while True:
            started = time.perf_counter()
            answer: httpx.Response | httpx.RequestError
            try:
                answer = self.client.post(url, content=content)
            except httpx.RequestError as exc:
                answer = exc
            latency += time.perf_counter() - started
            verdict = self.policy.classify(answer, number, now=datetime.now(UTC),
                                           jitter=random.random(), hops=hops)
            if not isinstance(verdict, Follow):
                break
            url, shown, hops = verdict.url, verdict.shown, hops + 1
            if self.stopping() or not self.pacer.wait():
                verdict = GiveUp("stopping", maybe_delivered=False)  # a redirect did nothing
                break
        budget_left = None
        if isinstance(verdict, Retry) and not self.budget.take(verdict.delay):
            budget_left = self.budget.left
            verdict = give_up(verdict, "budget", budget_left)
        record = self._record(number, sent_at, round(latency * 1000, 3), answer, verdict)
        return dataclasses.replace(record, budget_left=budget_left, redirects=hops,
                                   redirected_to=shown), verdict

    def _record(self, number: int, sent_at: datetime, latency: float,
                answer: httpx.Response | httpx.RequestError, verdict: Verdict
                ) -> AttemptRecord:
        """The attempt as data: what came back, and the verdict on it."""
        status: int | None = None
        retry_after: str | None = None
        reason: str | None = None
        if isinstance(answer, httpx.RequestError):
            detail: str | None = self._excerpt(f"{type(answer).__name__}: {answer}")
        else:
            status, header = answer.status_code, answer.headers.get("Retry-After")
            if header is not None:
                retry_after = header[:RETRY_AFTER_EXCERPT]
            detail = None if isinstance(verdict, Acknowledged) else self._excerpt(answer.text)
        outcome: Outcome = "error" if status is None else "retry"
        decision: Decision | None = None
        retry_in: float | None = None
        if isinstance(verdict, Acknowledged):
            outcome = "acknowledged"
        elif isinstance(verdict, Rejected):
            outcome, reason = "rejected", verdict.reason
        elif isinstance(verdict, Retry):
            decision, retry_in = "retry", verdict.delay
        else:
            decision, retry_in = verdict.reason, verdict.wanted
        return AttemptRecord(number, sent_at, latency, status, outcome, detail or None,
                             verdict.maybe_delivered, decision, retry_in,
                             retry_after=retry_after, reason=reason)

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
        room = ERROR_EXCERPT + len(self.destination.webhook_url)
        return self.redact(text[:room])[:ERROR_EXCERPT]


@functools.cache
def user_agent() -> str:
    """`reconciler/<version>`, the User-Agent of every request (SPEC §5)."""
    try:
        return f"reconciler/{importlib.metadata.version('reconciler')}"
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, uninstalled
        return "reconciler/unknown"
