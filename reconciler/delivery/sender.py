"""Delivering planned bodies to the webhook (SPEC §5 "Responses").

Worker threads, at most `max_concurrency`, send the jobs the caller's thread hands
them through a queue and hand back each `Delivery` through another; `deliver` yields
them as they complete. How many work at once adapts to what helps (concurrency.py:
one or two on loopback, up to `max_concurrency` when answers are slow); one shared
`Pacer` spaces every request. What each answer means, and how long to wait before
trying again, is the `RetryPolicy`'s (retry.py); this module sends, waits, records:

- every attempt becomes an `AttemptRecord` carrying the policy's verdict as data;
- a wait is taken from the run's retry budget (`RetryBudget`, shared by every thread,
  so a run always ends); a wait that does not fit is not taken and the update stays
  pending for the next run, like one that ran out of attempts;
- a 429 or a Retry-After pauses every thread for the same wait (`Pacer.pause`);
- a stop (daemon shutdown, lost lock, the caller abandoning `deliver`) ends every wait
  at once and starts no new request.

Requests go straight to an httpx transport (one connection pool per worker, sharing
one TLS context), not through `httpx.Client`: the client's per-request work (merging
defaults, cookies, its redirect and auth machinery, none of which a webhook needs)
cost a third of the CPU of a request on loopback (bench/README.md). Redirects are
ours anyway (SPEC §5), and the transport is where httpx's timeouts, TLS verification
(`SSL_CERT_FILE` included) and connect retries live.

The retry loop is ours rather than tenacity's or stamina's: giving up for the budget
or a stop is decided between attempts from state shared by all threads, which those
libraries can only express by raising from their wait or sleep callbacks, and the
wait must end on any of several events. Nothing here touches the database.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import queue
import random
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from reconciler.config import Destination
from reconciler.delivery.concurrency import Concurrency, Gate, Handoff
from reconciler.delivery.pacing import Clock, Pacer, Sleep
from reconciler.delivery.retry import (
    Acknowledged,
    Answer,
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
from reconciler.pipeline.contact import with_sent_at
from reconciler.redact import Redactor

ERROR_EXCERPT = 500
RETRY_AFTER_EXCERPT = 40
# Python cannot wait on two events at once; the second is checked this often.
STOP_POLL = 0.1
# Jobs handed to the workers and not yet yielded back: enough that the workers keep
# going while the caller records a batch, little enough that a stop leaves few behind.
QUEUE_DEPTH = 128


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


class _Failed:
    """A worker's unexpected exception, carried to the caller's thread to be raised."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Sender:
    """Sends jobs concurrently, paced, retried; one instance per run.

    `stops`: events that end the sending (any one set is enough): no new request
    starts, waits end at once, requests in flight finish.
    `transport`: used by every worker instead of their own (tests inject one).
    `clock` and `sleep` drive the pacer and retry waits; tests inject both.
    `policy` defaults to the destination's (`RetryPolicy.from_destination`) with
    `backoff_initial` and `backoff_max`.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        stops: Sequence[threading.Event] = (),
        transport: httpx.BaseTransport | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 60.0,
        clock: Clock = time.monotonic,
        sleep: Sleep | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.destination = destination
        self.policy = policy or RetryPolicy.from_destination(
            destination, backoff_initial=backoff_initial, backoff_max=backoff_max
        )
        # Set when the caller abandons `deliver`: workers stop waiting and retrying.
        self._abandoned = threading.Event()
        self.stops = (*stops, self._abandoned)
        self.sleep = sleep or self._sleep_unless_stopped
        self.pacer = Pacer(destination.requests_per_second, self.sleep, clock)
        self.budget = RetryBudget(self.policy.budget_seconds)
        self.redact = Redactor(webhook_url=destination.webhook_url)
        self.concurrency = Concurrency(destination.max_concurrency, destination.requests_per_second)
        self._gate = Gate(self.concurrency.limit)
        self._transport = transport
        # The one place the webhook URL itself is used: as the requests' target (parsed
        # once: parsing it for every request cost 8 % of a request's CPU on loopback).
        self._webhook = httpx.URL(destination.webhook_url.reveal())
        self._tls: ssl.SSLContext | None = None
        self._headers = httpx.Headers(
            {"Content-Type": "application/json", "User-Agent": user_agent()}
        )
        self._extensions = {"timeout": httpx.Timeout(destination.timeout_seconds).as_dict()}
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._results: Handoff[Delivery | _Failed] = Handoff(self._jobs.empty)
        self._workers: list[threading.Thread] = []
        self._spawning = threading.Lock()
        self._hiring = False  # workers may be started (only while `deliver` runs)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

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
        caller abandons the iteration, queued jobs are dropped and retry waits end, so
        nothing is sent that the caller will not see. An unexpected error in a worker
        is raised here.
        """
        depth = max(QUEUE_DEPTH, 2 * self.destination.max_concurrency)
        outstanding = 0
        finished = False
        with self._spawning:
            self._hiring = True
        self._spawn()
        try:
            for job in jobs:
                if self.stopping():
                    break
                while outstanding >= depth:
                    for delivery in self._collect():
                        outstanding -= 1
                        yield delivery
                self._jobs.put(job)
                outstanding += 1
            while outstanding:
                for delivery in self._collect():
                    outstanding -= 1
                    yield delivery
            finished = True
        finally:
            if not finished:
                self._abandoned.set()
                self._drop_queued()
            self._stop_workers()

    def _collect(self) -> list[Delivery]:
        """Wait for results; raise a worker's unexpected error."""
        found = self._results.take()
        for item in found:
            if isinstance(item, _Failed):
                raise item.error
        return [item for item in found if isinstance(item, Delivery)]

    def _drop_queued(self) -> None:
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                return

    def _spawn(self) -> None:
        """Start workers until there are as many as can be busy (at most the ceiling)."""
        with self._spawning:
            wanted = min(self.destination.max_concurrency, self._gate.wanted)
            while self._hiring and len(self._workers) < wanted:
                worker = threading.Thread(
                    target=self._work, daemon=True, name=f"send-{len(self._workers)}"
                )
                self._workers.append(worker)
                worker.start()

    def _stop_workers(self) -> None:
        with self._spawning:
            self._hiring = False
            workers, self._workers = self._workers, []
            for _ in workers:
                self._jobs.put(None)
        for worker in workers:
            worker.join()

    def _work(self) -> None:
        """A worker: jobs from the queue, inside the gate, with its own connection pool."""
        transport = self._transport or self._own_transport()
        self._gate.enter()
        try:
            while (job := self._jobs.get()) is not None:
                try:
                    self._results.put(self._deliver_one(job, transport))
                except BaseException as exc:  # a bug: the caller raises it
                    self._results.put(_Failed(exc), urgent=True)
                if self._gate.crowded():  # the limit went down: let another have the turn
                    self._gate.leave()
                    self._gate.enter()
        finally:
            self._gate.leave()
            if transport is not self._transport:
                transport.close()

    def _own_transport(self) -> httpx.BaseTransport:
        with self._spawning:
            if self._tls is None:  # loading the CA bundle costs ~20 ms: once per run
                self._tls = httpx.create_ssl_context(verify=True, trust_env=True)
        # One request at a time per worker; a redirect elsewhere replaces the idle one.
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        # The transport retries failed connects once; every other retry is ours.
        return httpx.HTTPTransport(verify=self._tls, limits=limits, retries=1)

    def _deliver_one(self, job: Job, transport: httpx.BaseTransport) -> Delivery:
        """Attempt `job` until the policy settles it or says to leave it pending."""
        delivery = Delivery(job)
        while not self.stopping() and self.pacer.wait():
            record, verdict = self._attempt(job, len(delivery.attempts) + 1, transport)
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
            if self._wait(verdict.delay):
                break
        if delivery.attempts and delivery.attempts[-1].decision == "retry":
            # The retry that was decided will not happen: say so on the last attempt.
            delivery.attempts[-1] = dataclasses.replace(delivery.attempts[-1], decision="stopping")
        return delivery

    def _wait(self, seconds: float) -> bool:
        """A retry wait, out of the gate so that another worker can send meanwhile."""
        self._gate.step_out()
        try:
            self._spawn()
            return self.sleep(seconds)
        finally:
            self._gate.step_in()

    def _attempt(
        self, job: Job, number: int, transport: httpx.BaseTransport
    ) -> tuple[AttemptRecord, Verdict]:
        """One POST (and the redirects it is sent on), judged by the policy.

        A retry's wait is already taken from the budget; one that does not fit comes
        back as a `GiveUp`. Each redirect hop waits for its own pacing slot.
        """
        sent_at = datetime.now(UTC)
        content = with_sent_at(job.body, sent_at)
        url, hops, shown, latency = self._webhook, 0, None, 0.0
        while True:
            started = time.perf_counter()
            answer = self._post(transport, url, content)
            took = time.perf_counter() - started
            latency += took
            if (limit := self.concurrency.observe(took)) is not None:
                self._gate.resize(limit)
                self._spawn()
            verdict = self.policy.classify(
                answer, number, now=datetime.now(UTC), jitter=random.random(), hops=hops
            )
            if not isinstance(verdict, Follow):
                break
            url, shown, hops = httpx.URL(verdict.url), verdict.shown, hops + 1
            if self.stopping() or not self.pacer.wait():
                verdict = GiveUp("stopping", maybe_delivered=False)  # a redirect did nothing
                break
        budget_left = None
        if isinstance(verdict, Retry) and not self.budget.take(verdict.delay):
            budget_left = self.budget.left
            verdict = give_up(verdict, "budget", budget_left)
        record = self._record(number, sent_at, round(latency * 1000, 3), answer, verdict)
        if budget_left is not None or hops:
            record = dataclasses.replace(
                record, budget_left=budget_left, redirects=hops, redirected_to=shown
            )
        return record, verdict

    def _post(self, transport: httpx.BaseTransport, url: httpx.URL, content: bytes) -> Answer:
        """POST `content` to `url`: the response, read whole, or the transport's error."""
        request = httpx.Request(
            "POST", url, headers=self._headers, content=content, extensions=self._extensions
        )
        try:
            response = transport.handle_request(request)
            try:
                response.read()
            finally:
                response.close()
        except httpx.RequestError as exc:
            return exc
        response.request = request
        return response

    def _record(
        self,
        number: int,
        sent_at: datetime,
        latency: float,
        answer: httpx.Response | httpx.RequestError,
        verdict: Verdict,
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
        return AttemptRecord(
            number,
            sent_at,
            latency,
            status,
            outcome,
            detail or None,
            verdict.maybe_delivered,
            decision,
            retry_in,
            retry_after=retry_after,
            reason=reason,
        )

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


@functools.cache
def user_agent() -> str:
    """`reconciler/<version>`, the User-Agent of every request (SPEC §5)."""
    try:
        return f"reconciler/{importlib.metadata.version('reconciler')}"
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, uninstalled
        return "reconciler/unknown"
