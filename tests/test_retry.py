"""The retry policy (SPEC §5 "Responses"): a pure verdict on each answer, and its record.

No server and no clock here: `classify` is given the answer, the attempt number, the
moment the answer was read and the jitter, and returns the same verdict every time.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from reconciler.config import Destination
from reconciler.delivery.retry import (
    Acknowledged,
    AttemptRecord,
    Follow,
    GiveUp,
    Rejected,
    Retry,
    RetryBudget,
    RetryPolicy,
    give_up,
)
from reconciler.secret import Secret

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=6, budget_seconds=300, backoff_initial=1.0, backoff_max=60.0)
REQUEST = httpx.Request("POST", "https://hooks.example.com/hook")


def answer(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=REQUEST)


def classify(
    what: httpx.Response | httpx.RequestError,
    attempt: int = 1,
    jitter: float = 0.5,
    policy: RetryPolicy = POLICY,
    hops: int = 0,
):
    return policy.classify(what, attempt, now=NOW, jitter=jitter, hops=hops)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_acknowledged(status):
    assert classify(answer(status)) == Acknowledged()


@pytest.mark.parametrize("status", [100, 400, 401, 403, 404, 409, 413, 422, 501, 600])
def test_other_statuses_are_rejected_and_certainly_did_nothing(status):
    verdict = classify(answer(status))
    assert verdict == Rejected() and not verdict.maybe_delivered


# --- Redirects ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize(
    "location, target",
    [
        ("https://new.example.com/hook/t0ken", "https://new.example.com/hook/t0ken"),
        ("/moved/t0ken", "https://hooks.example.com/moved/t0ken"),
        ("http://localhost:8080/x", "http://localhost:8080/x"),
        ("http://127.0.0.9/x", "http://127.0.0.9/x"),
        ("http://[::1]:81/x", "http://[::1]:81/x"),
    ],
)
def test_307_and_308_to_https_or_loopback_http_are_followed(status, location, target):
    verdict = classify(answer(status, Location=location))
    assert isinstance(verdict, Follow) and verdict.url == target
    assert "t0ken" not in verdict.shown and verdict.shown.endswith("/***")


@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 305, 399])
def test_other_redirects_are_rejected_naming_status_and_masked_location(status):
    verdict = classify(answer(status, Location="https://elsewhere.example.com/t0ken"))
    assert verdict == Rejected(
        f"redirect ({status}) to https://elsewhere.example.com/***: "
        "not followed (only 307 and 308 are)"
    )
    assert not verdict.maybe_delivered


@pytest.mark.parametrize(
    "location", ["http://hooks.example.com/t0ken", "http://10.0.0.1/x", "ftp://hooks.example.com/x"]
)
def test_a_redirect_to_plain_http_elsewhere_is_rejected(location):
    verdict = classify(answer(307, Location=location))
    assert isinstance(verdict, Rejected) and verdict.reason is not None
    assert verdict.reason.endswith("not followed (only to https, or to http on a loopback host)")
    assert "t0ken" not in verdict.reason


def test_a_fourth_redirect_is_rejected():
    location = {"Location": "https://hooks.example.com/next"}
    assert isinstance(classify(answer(308, **location), hops=2), Follow)
    assert classify(answer(308, **location), hops=3) == Rejected(
        "redirect (308) to https://hooks.example.com/***: not followed (more than 3 redirects)"
    )


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({}, "redirect (307) without a Location"),
        ({"Location": "  "}, "redirect (307) without a Location"),
        ({"Location": "http://host:port/x"}, "redirect (307) to an unreadable Location"),
        ({"Location": "http://"}, "redirect (307) to an unreadable Location"),
    ],
)
def test_a_redirect_without_a_usable_location_is_rejected(headers, reason):
    assert classify(answer(307, **headers)) == Rejected(reason)


@pytest.mark.parametrize("status", [408, 423, 429, 503])
def test_not_processed_statuses_are_retried_and_certainly_did_nothing(status):
    verdict = classify(answer(status))
    assert isinstance(verdict, Retry) and not verdict.maybe_delivered


@pytest.mark.parametrize("status", [500, 502, 504, 507, 599])
def test_other_5xx_are_retried_and_may_have_been_delivered(status):
    verdict = classify(answer(status))
    assert isinstance(verdict, Retry) and verdict.maybe_delivered


@pytest.mark.parametrize(
    "error, maybe",
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ConnectTimeout("slow connect"), False),
        (httpx.PoolTimeout("no connection free"), False),
        (httpx.ReadTimeout("slow answer"), True),
        (httpx.WriteTimeout("slow upload"), True),
        (httpx.ReadError("reset by peer"), True),
        (httpx.RemoteProtocolError("dropped after sending"), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_transport_errors_are_retried_and_only_a_failed_connect_certainly_did_nothing(error, maybe):
    verdict = classify(error)
    assert isinstance(verdict, Retry) and verdict.maybe_delivered is maybe
    assert not verdict.pause_everyone


@pytest.mark.parametrize(
    "attempt, jitter, expected",
    [
        (1, 1.0, 1.0),
        (2, 1.0, 2.0),
        (3, 1.0, 4.0),
        (3, 0.25, 1.0),
        (4, 0.0, 0.0),
        (7, 1.0, 60.0),
        (500, 1.0, 60.0),
    ],
)
def test_backoff_is_exponential_with_full_jitter_and_capped(attempt, jitter, expected):
    policy = dataclasses.replace(POLICY, max_attempts=1000)
    verdict = classify(answer(503), attempt, jitter, policy)
    assert isinstance(verdict, Retry) and verdict.delay == pytest.approx(expected)


@pytest.mark.parametrize("status", [429, 503, 500])
def test_retry_after_sets_the_wait_and_pauses_everyone(status):
    verdict = classify(answer(status, **{"Retry-After": "7"}), jitter=0.9)
    assert verdict == Retry(7.0, True, status == 500)


def test_retry_after_http_date_counts_from_the_moment_the_answer_was_read():
    when = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    verdict = classify(answer(503, **{"Retry-After": when}))
    assert isinstance(verdict, Retry) and verdict.delay == 30.0


@pytest.mark.parametrize("cap, expected", [(300.0, 300.0), (20.0, 20.0)])
def test_retry_after_is_capped(cap, expected):
    policy = dataclasses.replace(POLICY, retry_after_cap=cap)
    verdict = classify(answer(429, **{"Retry-After": "86400"}), policy=policy)
    assert isinstance(verdict, Retry) and verdict.delay == expected


def test_unreadable_retry_after_falls_back_to_the_backoff():
    verdict = classify(answer(503, **{"Retry-After": "soon"}), attempt=2, jitter=1.0)
    assert verdict == Retry(2.0, False, False)


def test_429_without_retry_after_pauses_everyone_for_the_backoff():
    assert classify(answer(429), attempt=1, jitter=0.5) == Retry(0.5, True, False)


def test_503_without_retry_after_pauses_nobody():
    assert classify(answer(503), attempt=1, jitter=0.5) == Retry(0.5, False, False)


@pytest.mark.parametrize(
    "what, maybe",
    [(answer(503), False), (answer(502), True), (httpx.ReadTimeout("slow"), True)],
    ids=["503", "502", "timeout"],
)
def test_the_last_attempt_gives_up_instead_of_retrying(what, maybe):
    assert classify(what, attempt=6) == GiveUp("max_attempts", maybe)
    assert isinstance(classify(what, attempt=5), Retry)


def test_the_last_attempt_still_acknowledges_or_rejects():
    assert classify(answer(200), attempt=6) == Acknowledged()
    assert classify(answer(400), attempt=6) == Rejected()


def test_giving_up_a_retry_keeps_what_it_knew():
    retry = Retry(12.5, True, True)
    assert give_up(retry, "budget", 3.0) == GiveUp("budget", True, 12.5, 3.0)
    assert give_up(retry, "stopping") == GiveUp("stopping", True, 12.5, None)


def test_policy_is_built_from_the_destination_and_frozen():
    destination = Destination(
        Secret("https://hooks.example.com/x"), max_attempts=3, retry_budget_seconds=42
    )
    policy = RetryPolicy.from_destination(destination, backoff_initial=0.01)
    assert (
        policy.max_attempts,
        policy.budget_seconds,
        policy.backoff_initial,
        policy.backoff_max,
        policy.retry_after_cap,
    ) == (3, 42, 0.01, 60.0, 300.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 9  # type: ignore[misc]


def test_budget_is_spent_only_when_the_whole_wait_fits():
    budget = RetryBudget(5)
    assert budget.take(3) and not budget.take(2.5) and budget.take(2)
    assert budget.left == 0 and not budget.take(0.01) and budget.take(0)


# --- The recorded error text, composed from the decision data -----------------------


def record(**fields) -> AttemptRecord:
    base = {"attempt": 2, "sent_at": NOW, "latency_ms": 1.5, "status_code": 503, "outcome": "retry"}
    return AttemptRecord(**{**base, **fields})


@pytest.mark.parametrize(
    "fields, text",
    [
        ({"outcome": "acknowledged", "status_code": 200}, None),
        ({"outcome": "rejected", "status_code": 400, "detail": "bad"}, "bad"),
        ({"outcome": "rejected", "status_code": 404}, None),
        (
            {
                "outcome": "rejected",
                "status_code": 302,
                "reason": "redirect (302) to x",
                "detail": "moved",
            },
            "redirect (302) to x; response: moved",
        ),
        (
            {
                "outcome": "rejected",
                "status_code": 401,
                "redirects": 2,
                "redirected_to": "https://h/***",
            },
            "after 2 redirects, the last to https://h/***",
        ),
        (
            {"decision": "retry", "retry_in": 2, "redirects": 1, "redirected_to": "https://h/***"},
            "retry in 2.00 s; after 1 redirect, the last to https://h/***",
        ),
        (
            {"decision": "retry", "retry_in": 7, "retry_after": "7", "detail": "busy"},
            "retry in 7.00 s; Retry-After: 7; response: busy",
        ),
        ({"decision": "retry", "retry_in": 0.1234}, "retry in 0.12 s"),
        (
            {
                "outcome": "error",
                "status_code": None,
                "decision": "retry",
                "retry_in": 1,
                "detail": "ReadTimeout: timed out",
            },
            "retry in 1.00 s; ReadTimeout: timed out",
        ),
        ({"decision": "max_attempts"}, "not retried: max_attempts (2) reached; stays pending"),
        (
            {"decision": "budget", "retry_in": 120, "budget_left": 60, "retry_after": "120"},
            "not retried: a 120.00 s wait exceeds the run's retry budget (60.00 s left); "
            "stays pending; Retry-After: 120",
        ),
        (
            {"decision": "stopping", "retry_in": 300, "detail": "later"},
            "not retried: the run is stopping; stays pending; response: later",
        ),
    ],
)
def test_error_text_is_composed_from_the_decision(fields, text):
    assert record(**fields).error == text
