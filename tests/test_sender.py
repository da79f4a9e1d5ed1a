"""Delivery (SPEC §5 "Responses"): retries, Retry-After, retry budget, pacing, recording.

Sender-level tests talk to a real server on 127.0.0.1 and inject a fake clock and
sleep, so waits are observed as numbers, never as elapsed time. Recording tests run
whole syncs on both state backends.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from reconciler.cli import main
from reconciler.config import Destination, load_config
from reconciler.delivery.pacing import SPACING, WINDOW, Pacer
from reconciler.delivery.retry import retry_after_seconds
from reconciler.delivery.sender import Delivery, Job, Sender
from reconciler.run import Seams, sync
from reconciler.secret import Secret
from reconciler.state.schema import deliveries, sync_runs, updates

from .conftest import Setup
from .helpers import CLI_ENV
from .receiver import Reply


class FakeClock:
    """Monotonic time that only moves when someone sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.stop = threading.Event()
        self.during_sleep: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def clock(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> bool:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds
        if self.during_sleep:
            self.during_sleep()
        return self.stop.is_set()


def destination(url: str, **overrides: Any) -> Destination:
    values: dict[str, Any] = {
        "webhook_url": Secret(url),
        "requests_per_second": 0,
        "max_concurrency": 1,
        "timeout_seconds": 5,
        "max_attempts": 4,
        "retry_budget_seconds": 300,
    }
    return Destination(**{**values, **overrides})


def job(n: int = 1) -> Job:
    body = (
        f'{{"type":"Send Contact","message_id":"m{n}","timestamp":'
        f'"2024-01-01T00:00:00.000Z","user_id":"u{n}"}}'
    )
    return Job(n, f"m{n}", body)


def deliver(
    url: str, jobs: list[Job], fake: FakeClock | None = None, **overrides: Any
) -> list[Delivery]:
    fake = fake or FakeClock()
    with Sender(
        destination(url, **overrides),
        stops=(fake.stop,),
        backoff_initial=1.0,
        clock=fake.clock,
        sleep=fake.sleep,
    ) as sender:
        return list(sender.deliver(jobs))


def error(delivery: Delivery, number: int = 1) -> str:
    """The recorded error of attempt `number` (-1: the last)."""
    text = delivery.attempts[number - 1 if number > 0 else number].error
    assert text is not None
    return text


def script(*replies: Reply) -> Callable[[int, dict[str, Any]], Reply]:
    """Answer the n-th request with the n-th reply, then 200."""
    return lambda n, _body: replies[n - 1] if n <= len(replies) else Reply()


# --- Retry policy -----------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 423, 429, 500, 502, 503, 504, 599])
def test_retryable_status_is_retried_until_acknowledged(receiver, status):
    receiver.respond = script(Reply(status, "busy"))
    (delivery,) = deliver(receiver.url, [job()])
    assert delivery.result == "acknowledged"
    assert [(a.status_code, a.outcome) for a in delivery.attempts] == [
        (status, "retry"),
        (200, "acknowledged"),
    ]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 501])
def test_other_status_is_a_permanent_rejection_with_body_excerpt(receiver, status):
    receiver.respond = script(Reply(status, "no: " + "y" * 700))
    (delivery,) = deliver(receiver.url, [job()])
    assert delivery.result == "rejected" and len(receiver.requests) == 1
    (attempt,) = delivery.attempts
    assert (attempt.status_code, attempt.outcome) == (status, "rejected")
    assert attempt.error == ("no: " + "y" * 700)[:500]


def test_retries_stop_at_max_attempts_and_the_update_stays_pending(receiver):
    receiver.respond = lambda n, b: Reply(503)
    (delivery,) = deliver(receiver.url, [job()], max_attempts=3)
    assert delivery.result == "pending" and len(delivery.attempts) == 3
    assert [a.decision for a in delivery.attempts] == ["retry", "retry", "max_attempts"]
    assert error(delivery, -1).startswith("not retried: max_attempts (3) reached")


def test_backoff_is_exponential_with_full_jitter(receiver):
    receiver.respond = lambda n, b: Reply(503)
    fake = FakeClock()
    deliver(receiver.url, [job()], fake, max_attempts=6)
    assert len(fake.sleeps) == 5
    for number, slept in enumerate(fake.sleeps, 1):
        assert 0 <= slept <= 1.0 * 2 ** (number - 1)


def test_every_attempt_resends_the_same_body_with_its_own_sent_at(receiver):
    receiver.respond = script(Reply(503), Reply(500))
    deliver(receiver.url, [job()])
    bodies = receiver.bodies()
    assert len(bodies) == 3
    assert {b["message_id"] for b in bodies} == {"m1"}
    assert {b["timestamp"] for b in bodies} == {"2024-01-01T00:00:00.000Z"}
    assert all("sent_at" in b for b in bodies)


# --- Redirects and headers (SPEC §5) ---------------------------------------------------


def header(request: Any, name: str) -> str | None:
    return {k.lower(): v for k, v in request.headers.items()}.get(name.lower())


def test_every_request_carries_the_user_agent_and_content_type(receiver):
    deliver(receiver.url, [job(1), job(2)])
    expected = f"reconciler/{importlib.metadata.version('reconciler')}"
    assert [header(r, "User-Agent") for r in receiver.requests] == [expected, expected]
    assert {header(r, "Content-Type") for r in receiver.requests} == {"application/json"}


@pytest.mark.parametrize("status", [307, 308])
def test_307_and_308_are_followed_with_the_same_method_and_body(receiver, status):
    receiver.respond = script(Reply(status, headers={"Location": "/moved/elsewhere"}))
    (delivery,) = deliver(receiver.url, [job()])
    assert delivery.result == "acknowledged"
    first, second = receiver.requests  # only POSTs are recorded: the method was kept
    assert (first.path, second.path) == ("/hook/s3cr3t-token", "/moved/elsewhere")
    assert first.body == second.body  # the same bytes, sent_at included
    assert header(second, "User-Agent") == header(first, "User-Agent")
    (attempt,) = delivery.attempts
    assert (attempt.status_code, attempt.redirects, attempt.error) == (200, 1, None)


@pytest.mark.parametrize("redirects, result", [(3, "acknowledged"), (4, "rejected")])
def test_at_most_three_redirects_are_followed(receiver, redirects, result):
    receiver.respond = script(
        *[Reply(308, headers={"Location": f"/hop{n}"}) for n in range(1, redirects + 1)]
    )
    (delivery,) = deliver(receiver.url, [job()])
    assert delivery.result == result
    # Three hops then the final answer; or three hops and a fourth redirect, refused.
    assert len(receiver.requests) == 4
    if result == "rejected":
        host = receiver.url.split("/hook")[0]
        assert error(delivery).startswith(
            f"redirect (308) to {host}/***: not followed (more than 3 redirects)"
        )


@pytest.mark.parametrize("status", [300, 301, 302, 303])
def test_other_redirects_are_rejected_naming_status_and_masked_location(receiver, status):
    host = receiver.url.split("/hook")[0]
    receiver.respond = script(
        Reply(status, "moved", headers={"Location": f"{host}/new/t0ken-s3cret"})
    )
    (delivery,) = deliver(receiver.url, [job()])
    assert delivery.result == "rejected" and len(receiver.requests) == 1
    (attempt,) = delivery.attempts
    assert (attempt.status_code, attempt.outcome, attempt.maybe_delivered) == (
        status,
        "rejected",
        False,
    )
    assert attempt.error == (
        f"redirect ({status}) to {host}/***: not followed (only 307 and 308 are); response: moved"
    )


def test_a_redirect_to_plain_http_off_this_machine_is_not_followed(receiver):
    receiver.respond = script(Reply(307, headers={"Location": "http://hooks.example.com/t"}))
    (delivery,) = deliver(receiver.url, [job()])
    assert delivery.result == "rejected" and len(receiver.requests) == 1
    assert error(delivery).startswith(
        "redirect (307) to http://hooks.example.com/***: "
        "not followed (only to https, or to http on a "
        "loopback host)"
    )


def test_a_redirect_to_localhost_by_name_is_followed(receiver):
    port = receiver.server.server_port
    receiver.respond = script(Reply(307, headers={"Location": f"http://localhost:{port}/x"}))
    (delivery,) = deliver(receiver.url, [job()])
    assert delivery.result == "acknowledged"
    assert [r.path for r in receiver.requests] == ["/hook/s3cr3t-token", "/x"]


def test_each_attempt_starts_again_at_the_webhook_url(receiver):
    """A redirect followed by a retryable answer: the retry goes to the configured URL."""
    receiver.respond = script(
        Reply(307, headers={"Location": "/moved"}),
        Reply(503, "busy"),
        Reply(307, headers={"Location": "/moved"}),
    )
    (delivery,) = deliver(receiver.url, [job()])
    assert delivery.result == "acknowledged"
    assert [r.path for r in receiver.requests] == ["/hook/s3cr3t-token", "/moved"] * 2
    first, second = delivery.attempts
    host = receiver.url.split("/hook")[0]
    assert (first.status_code, first.redirects, first.decision) == (503, 1, "retry")
    assert first.error is not None and first.error.endswith(
        f"response: busy; after 1 redirect, the last to {host}/***"
    )
    assert (second.status_code, second.redirects) == (200, 1)


def test_a_redirect_hop_waits_for_its_own_pacing_slot(receiver):
    receiver.respond = script(Reply(307, headers={"Location": "/moved"}))
    fake = FakeClock()
    (delivery,) = deliver(receiver.url, [job()], fake, requests_per_second=1)
    assert delivery.result == "acknowledged"
    assert fake.sleeps == [pytest.approx(SPACING)]


def test_a_stop_before_a_redirect_hop_leaves_the_update_pending(receiver):
    fake = FakeClock()

    def redirect_and_stop(_n: int, _body: dict[str, Any]) -> Reply:
        fake.stop.set()
        return Reply(307, headers={"Location": "/moved"})

    receiver.respond = redirect_and_stop
    (delivery,) = deliver(receiver.url, [job()], fake)
    assert delivery.result == "pending" and len(receiver.requests) == 1
    (attempt,) = delivery.attempts
    assert (attempt.status_code, attempt.decision, attempt.maybe_delivered) == (
        307,
        "stopping",
        False,
    )


# --- Transport errors ---------------------------------------------------------------


class RawServer:
    """A TCP server on 127.0.0.1 that misbehaves on cue: one action per connection.

    `garbage`: a reply that is not HTTP; `reset`: close with RST; `cut`: a 200 status
    line then a body cut short; anything else: a proper 200 (then close).
    """

    def __init__(self, actions: list[str]) -> None:
        self.actions = actions
        self.seen = 0
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                while len(body) < length:
                    body += self.request.recv(65536)
                action = server.actions[server.seen] if server.seen < len(server.actions) else "ok"
                server.seen += 1
                if action == "garbage":
                    self.request.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                elif action == "reset":
                    self.request.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                elif action == "cut":
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nok")
                else:
                    self.request.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook/s3cr3t"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[list[str]], RawServer]]:
    servers: list[RawServer] = []

    def make(actions: list[str]) -> RawServer:
        servers.append(RawServer(actions))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    "action",
    ["garbage", "reset", "cut"],
    ids=["protocol-error", "connection-reset", "dropped-mid-response"],
)
def test_transport_error_is_retried_and_recorded_without_status(raw_server, action):
    server = raw_server([action])
    (delivery,) = deliver(server.url, [job()])
    assert delivery.result == "acknowledged"
    first, second = delivery.attempts
    assert (first.status_code, first.outcome) == (None, "error")
    assert error(delivery).startswith("retry in ") and "Error" in error(delivery)
    assert (second.status_code, second.outcome) == (200, "acknowledged")


def test_dropped_connection_without_answer_is_retried(receiver):
    receiver.respond = script(Reply(drop=True))
    (delivery,) = deliver(receiver.url, [job()])
    assert [a.outcome for a in delivery.attempts] == ["error", "acknowledged"]
    assert delivery.attempts[0].maybe_delivered  # the request had gone out


def test_answer_slower_than_the_timeout_is_retried(receiver):
    """The first answer is held until the retry arrives, so it always times out."""
    retried = threading.Event()

    def respond(n: int, _body: dict[str, Any]) -> Reply:
        if n == 1:
            return Reply(hold=retried)
        retried.set()
        return Reply()

    receiver.respond = respond
    (delivery,) = deliver(receiver.url, [job()], timeout_seconds=0.5, max_attempts=10)
    *timed_out, last = delivery.attempts
    # On a loaded machine a later answer may miss 0.5 s too; each such one is retried.
    assert timed_out and last.outcome == "acknowledged"
    assert all(a.outcome == "error" and "ReadTimeout" in (a.error or "") for a in timed_out)
    assert all(a.maybe_delivered for a in timed_out)


def test_refused_connection_is_retried_then_left_pending():
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (delivery,) = deliver(f"http://127.0.0.1:{port}/hook", [job()], max_attempts=2)
    assert delivery.result == "pending"
    assert [a.outcome for a in delivery.attempts] == ["error", "error"]
    assert not any(a.maybe_delivered for a in delivery.attempts)
    assert "ConnectError" in error(delivery)


# --- Retry-After and the retry budget ---------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("7", 7.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("86400", 300.0),
        ("-5", None),
        ("nan", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_seconds_form(value, expected):
    assert retry_after_seconds(value) == expected


def test_retry_after_http_date_form_counts_from_now_and_is_capped():
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("Wed, 01 May 2024 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Wed, 01 May 2024 11:00:00 GMT", now) == 0.0
    assert retry_after_seconds("Thu, 02 May 2024 12:00:00 GMT", now) == 300.0


def test_retry_after_seconds_is_honoured_and_recorded(receiver):
    receiver.respond = script(Reply(503, headers={"Retry-After": "7"}))
    fake = FakeClock()
    (delivery,) = deliver(receiver.url, [job()], fake)
    assert fake.sleeps[-1] == 7.0
    first = delivery.attempts[0]
    assert (first.decision, first.retry_in, first.retry_after, first.maybe_delivered) == (
        "retry",
        7.0,
        "7",
        False,
    )
    assert error(delivery) == "retry in 7.00 s; Retry-After: 7; response: ok"


def test_retry_after_http_date_is_honoured(receiver):
    before = datetime.now(UTC)
    moment = (before + timedelta(seconds=40)).replace(microsecond=0)
    when = format_datetime(moment, usegmt=True)
    receiver.respond = script(Reply(429, headers={"Retry-After": when}))
    fake = FakeClock()
    (delivery,) = deliver(receiver.url, [job()], fake)
    after = datetime.now(UTC)
    # Counted from when the answer was read, some moment between `before` and `after`.
    (waited,) = fake.sleeps
    assert (moment - after).total_seconds() <= waited <= (moment - before).total_seconds()
    assert f"Retry-After: {when}" in error(delivery)


def test_retry_after_beyond_the_retry_budget_leaves_the_update_pending(receiver):
    receiver.respond = script(Reply(503, headers={"Retry-After": "120"}))
    fake = FakeClock()
    (delivery,) = deliver(receiver.url, [job()], fake, retry_budget_seconds=60)
    assert delivery.result == "pending" and len(delivery.attempts) == 1
    assert fake.sleeps == []
    (attempt,) = delivery.attempts
    assert (attempt.decision, attempt.retry_in, attempt.budget_left) == ("budget", 120, 60)
    assert error(delivery).startswith(
        "not retried: a 120.00 s wait exceeds the run's retry budget (60.00 s left)"
    )


def test_retry_budget_is_shared_by_every_update_of_the_run(receiver):
    receiver.respond = lambda n, b: Reply(503, headers={"Retry-After": "2"}) if n % 2 else Reply()
    results = deliver(receiver.url, [job(1), job(2), job(3)], retry_budget_seconds=5)
    assert [d.result for d in results] == ["acknowledged", "acknowledged", "pending"]


def test_429_pauses_every_sender_for_its_retry_after(receiver):
    receiver.respond = script(Reply(429, headers={"Retry-After": "5"}))
    fake = FakeClock()
    paused: list[float] = []
    with Sender(
        destination(receiver.url), stops=(fake.stop,), clock=fake.clock, sleep=fake.sleep
    ) as sender:
        fake.during_sleep = lambda: paused.append(sender.pacer.paused_until)
        start = fake.clock()
        list(sender.deliver([job()]))
    assert paused == [start + 5]


def test_429_without_retry_after_pauses_for_the_backoff_wait(receiver):
    receiver.respond = script(Reply(429))
    fake = FakeClock()
    with Sender(
        destination(receiver.url), stops=(fake.stop,), clock=fake.clock, sleep=fake.sleep
    ) as sender:
        start = fake.clock()
        list(sender.deliver([job()]))
        assert sender.pacer.paused_until == start + fake.sleeps[0]


def test_503_without_retry_after_does_not_pause_others(receiver):
    receiver.respond = script(Reply(503))
    fake = FakeClock()
    with Sender(
        destination(receiver.url), stops=(fake.stop,), clock=fake.clock, sleep=fake.sleep
    ) as sender:
        list(sender.deliver([job()]))
        assert sender.pacer.paused_until == float("-inf")


# --- Stopping ------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `limit` seconds."""
    gate = threading.Event()
    for _ in range(int(limit / 0.01)):
        if condition():
            return
        gate.wait(0.01)
    pytest.fail(f"gave up after {limit:.0f} s waiting for {what}")


def test_stop_interrupts_a_retry_wait_and_leaves_the_update_pending(receiver):
    """A stop during a 300 s Retry-After wait ends the delivery at once (real sleep)."""
    stop, lost = threading.Event(), threading.Event()
    receiver.respond = lambda n, b: Reply(503, headers={"Retry-After": "300"})
    results: list[Delivery] = []
    senders: list[Sender] = []

    def run() -> None:
        with Sender(destination(receiver.url), stops=(stop, lost)) as sender:
            senders.append(sender)
            results.extend(sender.deliver([job()]))

    worker = threading.Thread(target=run)
    worker.start()
    # The pause is set just before the 300 s wait begins.
    wait_until(
        lambda: bool(senders) and senders[0].pacer.paused_until > float("-inf"),
        "the 503 to start a retry wait",
    )
    lost.set()  # the second event: the run's lock was lost
    worker.join(timeout=60)
    assert not worker.is_alive()
    (delivery,) = results
    assert delivery.result == "pending" and len(receiver.requests) == 1
    assert (delivery.attempts[0].decision, delivery.attempts[0].retry_in) == ("stopping", 300)
    assert error(delivery).startswith("not retried: the run is stopping")


def test_abandoned_delivery_interrupts_waits_and_starts_nothing_new(receiver):
    """The run stops reading results (a database error): workers stop retrying.

    u1 is acknowledged and handed to the caller; u2's 503 starts a 300 s wait; only
    then does the caller close the iteration. Nothing depends on thread timing: the
    caller waits for the wait to begin, and one sender thread keeps the order fixed.
    """
    receiver.respond = lambda n, b: (
        Reply(503, headers={"Retry-After": "300"}) if b["user_id"] == "u2" else Reply()
    )
    first: list[Delivery] = []

    def run() -> None:
        with Sender(destination(receiver.url, max_concurrency=1)) as sender:
            results = sender.deliver([job(n) for n in range(1, 7)])
            first.append(next(results))
            wait_until(
                lambda: sender.pacer.paused_until > float("-inf"), "u2's 503 to start a retry wait"
            )
            results.close()  # type: ignore[attr-defined]  # a generator

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert first[0].job.message_id == "m1"
    assert [r.body["user_id"] for r in receiver.requests] == ["u1", "u2"]


def test_no_request_starts_after_a_stop(receiver):
    fake = FakeClock()

    def stop_after_answering(_n: int, _body: dict[str, Any]) -> Reply:
        fake.stop.set()
        return Reply()

    receiver.respond = stop_after_answering
    results = deliver(receiver.url, [job(n) for n in range(1, 6)], fake)
    assert len(receiver.requests) == 1
    assert [d.result for d in results if d.attempts] == ["acknowledged"]
    assert all(d.result == "pending" for d in results if not d.attempts)


def test_error_excerpt_never_shows_the_webhook_url(receiver):
    receiver.respond = script(Reply(400, f"bad request to {receiver.url}"))
    (delivery,) = deliver(receiver.url, [job()])
    assert "s3cr3t-token" not in error(delivery)
    assert "http://127.0.0.1:" in error(delivery)


def test_at_most_max_concurrency_requests_are_in_flight(receiver):
    receiver.respond = lambda n, b: Reply(delay=0.05)
    deliver(receiver.url, [job(n) for n in range(1, 13)], max_concurrency=3)
    starts = sorted(r.at for r in receiver.requests)
    # A request can only arrive once an earlier one has been answered (>= 0.05 s later).
    overlapping = max(sum(1 for s in starts if t <= s < t + 0.05) for t in starts)
    assert len(starts) == 12 and overlapping <= 3


# --- Pacer (fake clock) ----------------------------------------------------------------


def admissions(pacer: Pacer, fake: FakeClock, count: int) -> list[float]:
    times = []
    for _ in range(count):
        assert pacer.wait()
        times.append(fake.clock())
    return times


def max_in_one_second(times: list[float]) -> int:
    return max(sum(1 for s in times if t <= s < t + 1.0) for t in times)


def test_unpaced_admits_everyone_without_waiting():
    fake = FakeClock()
    pacer = Pacer(0, fake.sleep, fake.clock)
    assert admissions(pacer, fake, 50) == [1000.0] * 50
    assert fake.sleeps == []


@pytest.mark.parametrize("rate", [1, 5, 20, 40])
def test_paced_admissions_are_evenly_spaced_and_never_above_rate(rate):
    fake = FakeClock()
    pacer = Pacer(rate, fake.sleep, fake.clock)
    times = admissions(pacer, fake, 5 * rate + 1)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap == pytest.approx(SPACING / rate) for gap in gaps)
    assert max_in_one_second(times) <= rate
    achieved = (len(times) - 1) / (times[-1] - times[0])
    assert achieved >= 0.99 * rate


@pytest.mark.parametrize("rate", [5, 40, 200])
def test_late_wake_ups_neither_lower_the_rate_nor_break_the_window(rate):
    """Sleeps that overshoot by up to 2 ms (timer slack): slots catch up, capped."""
    fake = FakeClock()
    sleep, overshoot = fake.sleep, itertools.cycle([0.0, 0.002, 0.0005, 0.0, 0.001])

    def late_sleep(seconds: float) -> bool:
        return sleep(seconds + next(overshoot))

    pacer = Pacer(rate, late_sleep, fake.clock)
    times = admissions(pacer, fake, 5 * rate + 1)
    assert max_in_one_second(times) <= rate
    assert (len(times) - 1) / (times[-1] - times[0]) >= 0.99 * rate


@pytest.mark.parametrize("rate", [40, 200])
def test_a_stall_is_caught_up_without_breaking_the_window(rate):
    """One wake-up 15 ms late: the next slots come sooner, the rate holds, the bound too."""
    fake = FakeClock()
    sleep, calls = fake.sleep, itertools.count()

    def one_late_sleep(seconds: float) -> bool:
        return sleep(seconds + (0.015 if next(calls) == rate else 0.0))

    pacer = Pacer(rate, one_late_sleep, fake.clock)
    times = admissions(pacer, fake, 4 * rate + 1)
    assert max_in_one_second(times) <= rate
    assert (len(times) - 1) / (times[-1] - times[0]) >= 0.99 * rate
    assert times[-1] - times[0] == pytest.approx(4 * SPACING)  # back on the timeline


def test_the_window_holds_even_when_a_late_first_admission_is_caught_up():
    """Admissions bunched by catching up never put more than `rate` into one second."""
    fake = FakeClock()
    late = iter([0.0] * 39 + [0.018])  # the 40th wait overshoots by 18 ms
    sleep = fake.sleep

    def late_sleep(seconds: float) -> bool:
        return sleep(seconds + next(late, 0.0))

    pacer = Pacer(40, late_sleep, fake.clock)
    times = admissions(pacer, fake, 200)
    assert max_in_one_second(times) <= 40
    gaps_of_40 = [b - a for a, b in zip(times, times[40:], strict=False)]
    assert min(gaps_of_40) >= WINDOW - 1e-9


def test_concurrent_callers_share_one_pace():
    fake = FakeClock()
    # The admission time is the caller's own last clock reading inside `wait`: reading
    # the shared clock after `wait` returns could see another caller's later sleep.
    seen = threading.local()

    def clock() -> float:
        seen.now = fake.clock()
        return float(seen.now)

    pacer = Pacer(20, fake.sleep, clock)
    times: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(10):
            assert pacer.wait()
            with lock:
                times.append(seen.now)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(times) == 80 and max_in_one_second(sorted(times)) <= 20


def test_idle_time_does_not_allow_a_burst():
    fake = FakeClock()
    pacer = Pacer(10, fake.sleep, fake.clock)
    pacer.wait()
    fake.now += 30
    first, second = admissions(pacer, fake, 2)
    assert second - first == pytest.approx(SPACING / 10)


def test_pause_holds_every_caller_back_until_it_ends():
    fake = FakeClock()
    pacer = Pacer(0, fake.sleep, fake.clock)
    pacer.pause(5)
    assert admissions(pacer, fake, 3) == [1005.0] * 3


def test_pause_during_a_wait_extends_it_and_a_shorter_pause_does_not_shorten_it():
    fake = FakeClock()
    pacer = Pacer(1, fake.sleep, fake.clock)
    pacer.wait()

    def two_pauses_once() -> None:
        fake.during_sleep = None
        pacer.pause(10)
        pacer.pause(1)

    fake.during_sleep = two_pauses_once
    assert pacer.wait()  # woken at its slot, it finds the pause and waits on
    assert fake.clock() == pytest.approx(1000 + SPACING + 10)


def test_after_a_pause_the_pace_starts_again_without_a_burst():
    fake = FakeClock()
    pacer = Pacer(10, fake.sleep, fake.clock)
    admissions(pacer, fake, 3)
    paused_at = fake.clock()
    pacer.pause(5)
    times = admissions(pacer, fake, 3)
    assert times[0] == pytest.approx(paused_at + 5)
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([SPACING / 10] * 2)


def test_stop_during_a_pacing_wait_refuses_admission():
    fake = FakeClock()
    pacer = Pacer(1, fake.sleep, fake.clock)
    pacer.wait()
    fake.during_sleep = fake.stop.set
    assert pacer.wait() is False


# --- Recording (both state backends) -------------------------------------------------


def run(setup: Setup, engine: Any, **config: Any) -> Any:
    return sync(setup.config(**config), engine, seams=Seams(backoff_initial=0.01))


@pytest.fixture
def three(setup: Setup) -> Setup:
    setup.warehouse.members("High Value Users", "u1", "u2", "u3")
    return setup


def attempts_of(engine: Any, user: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(deliveries)
                .join(updates, updates.c.id == deliveries.c.update_id)
                .where(updates.c.user_id == user)
                .order_by(deliveries.c.id)
            )
        )


def test_each_attempt_is_recorded_with_status_latency_and_error(three, engine_of):
    engine = engine_of(three)
    three.receiver.respond = _first_for("u2", Reply(503, "later", headers={"Retry-After": "0"}))
    result = run(three, engine)
    first, second = attempts_of(engine, "u2")
    assert (first.attempt, first.status_code, first.outcome) == (1, 503, "retry")
    assert first.error == "retry in 0.00 s; Retry-After: 0; response: later"
    assert (second.attempt, second.status_code, second.outcome) == (2, 200, "acknowledged")
    assert first.latency_ms > 0 and second.latency_ms > 0 and second.error is None
    assert first.run_id == result.run_id
    assert (result.sent, result.failed, result.status) == (3, 0, "succeeded")


def test_transport_error_is_recorded_without_a_status(three, engine_of):
    engine = engine_of(three)
    three.receiver.respond = _first_for("u1", Reply(drop=True))
    run(three, engine)
    first, second = attempts_of(engine, "u1")
    assert (first.status_code, first.outcome) == (None, "error")
    assert "RemoteProtocolError" in first.error and second.outcome == "acknowledged"


def test_run_is_partial_and_counts_failures_when_updates_remain_pending(three, engine_of):
    engine = engine_of(three)
    three.receiver.respond = lambda n, b: (
        Reply(503)
        if b["user_id"] == "u3"
        else Reply(422, "invalid")
        if b["user_id"] == "u2"
        else Reply()
    )
    result = run(three, engine, destination="max_attempts = 2")
    assert (result.status, result.sent, result.failed, result.pending) == ("partial", 1, 2, 1)
    assert result.exit_status == 1
    with engine.connect() as conn:
        row = conn.execute(select(sync_runs).where(sync_runs.c.id == result.run_id)).one()
        statuses = dict(conn.execute(select(updates.c.user_id, updates.c.status)).all())
    assert (row.status, row.sent, row.failed, row.pending) == ("partial", 1, 2, 1)
    assert statuses == {"u1": "sent", "u2": "rejected", "u3": "pending"}


def test_update_past_the_retry_budget_stays_pending_and_goes_next_run(three, engine_of):
    engine = engine_of(three)
    three.receiver.respond = _first_for("u3", Reply(429, headers={"Retry-After": "200"}))
    first = run(three, engine, destination="retry_budget_seconds = 100")
    assert (first.status, first.pending) == ("partial", 1)
    (attempt,) = attempts_of(engine, "u3")
    assert "exceeds the run's retry budget" in attempt.error
    assert "Retry-After: 200" in attempt.error
    second = run(three, engine)
    assert (second.status, second.sent) == ("succeeded", 1)
    u3 = [b for b in three.receiver.bodies() if b["user_id"] == "u3"]
    assert len(u3) == 2 and u3[0]["message_id"] == u3[1]["message_id"]


def test_pending_updates_are_sent_first_by_the_next_run(three, engine_of):
    engine = engine_of(three)
    one_at_a_time = load_config(three.write(destination="max_attempts = 1"), env={})
    one_at_a_time = replace(
        one_at_a_time, destination=replace(one_at_a_time.destination, max_concurrency=1)
    )
    three.receiver.respond = lambda n, b: Reply(503) if b["user_id"] == "u3" else Reply()
    sync(one_at_a_time, engine, seams=Seams(backoff_initial=0.01))
    earlier = [b for b in three.receiver.bodies() if b["user_id"] == "u3"]
    three.receiver.respond = lambda n, b: Reply()
    three.receiver.clear()
    three.warehouse.members("High Value Users", "u1", "u2", "u3", "u0")
    sync(one_at_a_time, engine, seams=Seams(backoff_initial=0.01))
    bodies = three.receiver.bodies()
    assert [b["user_id"] for b in bodies] == ["u3", "u0"]
    assert bodies[0]["message_id"] == earlier[0]["message_id"]
    assert bodies[0]["timestamp"] == earlier[0]["timestamp"]


@pytest.mark.parametrize(
    "reply, exit_status",
    [(Reply(), 0), (Reply(503), 1), (Reply(400), 1)],
    ids=["acknowledged", "pending", "rejected"],
)
def test_sync_command_exit_status(three, engine_of, reply, exit_status):
    engine_of(three)
    three.receiver.respond = lambda n, b: reply
    path = three.write(destination="max_attempts = 1")
    outcome = CliRunner().invoke(main, ["sync", "--config", str(path)], env=CLI_ENV)
    assert outcome.exit_code == exit_status, outcome.output


def _first_for(user: str, reply: Reply) -> Callable[[int, dict[str, Any]], Reply]:
    """Answer `user`'s first request with `reply`, everything else with 200."""
    seen: set[str] = set()

    def respond(_n: int, body: dict[str, Any]) -> Reply:
        if body["user_id"] == user and user not in seen:
            seen.add(user)
            return reply
        return Reply()

    return respond
