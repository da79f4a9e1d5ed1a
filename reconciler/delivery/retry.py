"""What to do with each answer (SPEC §5 "Responses"): a frozen policy, a pure classifier.

    RetryPolicy.from_destination(destination)   the policy of one run
    policy.classify(answer, attempt, ...)        Acknowledged | Rejected | Retry | GiveUp
                                                 | Follow (a redirect to take)
    AttemptRecord                                one attempt as data, for `deliveries`

The status classes:

    2xx                                   acknowledged (it was delivered)
    307, 308 to https (or http on a       followed with the same method and body, at
      loopback host)                      most 3 hops; the final answer counts
    408, 423, 429, 503                    retried; certainly did nothing
    5xx except 501 and 503                retried; may have been delivered
    transport errors                      retried; may have been delivered, except a
                                          failed connect (nothing was sent)
    anything else (3xx, 4xx, 501, ...)    rejected; certainly did nothing (a refused
                                          redirect names its status and masked Location)

A retry waits with exponential backoff and full jitter, or as long as `Retry-After`
says (seconds or HTTP date, capped at 5 minutes). A 429 or any Retry-After pauses
every sender, not only the one that heard it. The policy never sleeps and keeps no
state: the run's retry budget (`RetryBudget`) and stopping are the sender's, which
turns a `Retry` it cannot afford or is told to drop into a `GiveUp` (`give_up`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Literal

import httpx

from reconciler.config import is_loopback_host
from reconciler.redact import mask_webhook

if TYPE_CHECKING:
    from reconciler.config import Destination

RETRYABLE = frozenset({408, 423, 429} | {s for s in range(500, 600) if s != 501})
# Retryable answers that say the request was turned away before any work was done.
NOT_PROCESSED = frozenset({408, 423, 429, 503})
RETRY_AFTER_CAP = 300.0
FOLLOWED = frozenset({307, 308})  # the redirects that keep the method and the body
MAX_REDIRECTS = 3
# Transport errors raised before any byte of the request left this process.
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_DELAY_SECONDS = re.compile(r"\d+(\.\d+)?")

# Why no further attempt is made this run (the update stays pending).
GiveUpReason = Literal["max_attempts", "budget", "stopping"]
Answer = httpx.Response | httpx.RequestError


@dataclass(frozen=True)
class Acknowledged:
    """A 2xx: the update is settled."""

    maybe_delivered: bool = True


@dataclass(frozen=True)
class Rejected:
    """A permanent refusal: not sent again until the user's state changes.

    `reason` says why when the status alone does not (a redirect not followed).
    """

    reason: str | None = None
    maybe_delivered: bool = False


@dataclass(frozen=True)
class Follow:
    """A redirect to take: send the same request to `url` (masked for records: `shown`)."""

    url: str
    shown: str


@dataclass(frozen=True)
class Retry:
    """Try again after `delay` seconds; `pause_everyone`: hold every sender that long."""

    delay: float
    pause_everyone: bool
    maybe_delivered: bool


@dataclass(frozen=True)
class GiveUp:
    """Worth retrying, but not this run: the update stays pending for the next one.

    `wanted` is the wait that was not taken (for `budget`, and when known).
    """

    reason: GiveUpReason
    maybe_delivered: bool
    wanted: float | None = None
    budget_left: float | None = None


Verdict = Acknowledged | Rejected | Retry | GiveUp


@dataclass(frozen=True)
class RetryPolicy:
    """How one run retries: attempts, the run's waiting budget, backoff bounds, caps."""

    max_attempts: int = 6
    budget_seconds: float = 300.0
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    retry_after_cap: float = RETRY_AFTER_CAP

    @classmethod
    def from_destination(
        cls, destination: Destination, *, backoff_initial: float = 0.5, backoff_max: float = 60.0
    ) -> RetryPolicy:
        """The policy of `[destination]` (SPEC §3); the backoff bounds are test seams."""
        return cls(
            max_attempts=destination.max_attempts,
            budget_seconds=destination.retry_budget_seconds,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        )

    def backoff(self, attempt: int, jitter: float) -> float:
        """Full jitter: `jitter` (0 to 1) of min(max, initial * 2^(attempt - 1))."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempt - 1, 64))
        return jitter * ceiling

    def classify(
        self, answer: Answer, attempt: int, *, now: datetime, jitter: float, hops: int = 0
    ) -> Verdict | Follow:
        """The verdict on attempt number `attempt`, whose answer was read at `now`.

        `jitter` is a uniform random number in [0, 1) for the backoff. Past
        `max_attempts`, what would be retried gives up instead. `hops`: redirects
        this attempt already followed.
        """
        if isinstance(answer, httpx.RequestError):
            maybe = not isinstance(answer, NEVER_SENT)
            return self._retry(attempt, maybe, self.backoff(attempt, jitter), False)
        status = answer.status_code
        if 200 <= status < 300:
            return Acknowledged()
        if 300 <= status < 400:
            return _redirect(answer, hops)
        if status not in RETRYABLE:
            return Rejected()
        after = retry_after_seconds(answer.headers.get("Retry-After"), now, self.retry_after_cap)
        delay = after if after is not None else self.backoff(attempt, jitter)
        return self._retry(
            attempt, status not in NOT_PROCESSED, delay, status == 429 or after is not None
        )

    def _retry(self, attempt: int, maybe: bool, delay: float, pause: bool) -> Retry | GiveUp:
        if attempt >= self.max_attempts:
            return GiveUp("max_attempts", maybe)
        return Retry(delay, pause, maybe)


def _redirect(answer: httpx.Response, hops: int) -> Follow | Rejected:
    """Follow a 307 or 308 to https or loopback http, 3 hops at most; refuse the rest."""
    status = answer.status_code
    location = answer.headers.get("Location", "").strip()
    if not location:
        return Rejected(f"redirect ({status}) without a Location")
    try:
        target = answer.request.url.join(location)
    except httpx.InvalidURL:
        target = None
    if target is None or not target.host:
        return Rejected(f"redirect ({status}) to an unreadable Location")
    shown = mask_webhook(str(target))
    if status not in FOLLOWED:
        why = "only 307 and 308 are"
    elif hops >= MAX_REDIRECTS:
        why = f"more than {MAX_REDIRECTS} redirects"
    elif not (
        target.scheme == "https" or (target.scheme == "http" and is_loopback_host(target.host))
    ):
        why = "only to https, or to http on a loopback host"
    else:
        return Follow(str(target), shown)
    return Rejected(f"redirect ({status}) to {shown}: not followed ({why})")


def give_up(retry: Retry, reason: GiveUpReason, budget_left: float | None = None) -> GiveUp:
    """The `GiveUp` that replaces `retry` when it cannot be afforded or the run stops."""
    return GiveUp(reason, retry.maybe_delivered, retry.delay, budget_left)


def retry_after_seconds(
    value: str | None, now: datetime | None = None, cap: float = RETRY_AFTER_CAP
) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), 0 to `cap`.

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
    return min(max(seconds, 0.0), cap)


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


Outcome = Literal["acknowledged", "retry", "rejected", "error"]
Decision = Literal["retry"] | GiveUpReason


@dataclass(frozen=True)
class AttemptRecord:
    """One HTTP attempt and what was decided after it, as it goes into `deliveries`.

    The decision is data (`decision`, `retry_in`, `retry_after`, ...); `error`, the
    text stored in `deliveries.error`, is composed from it here and nowhere else.
    """

    attempt: int
    sent_at: datetime
    latency_ms: float | None
    status_code: int | None
    outcome: Outcome
    # The response body's excerpt, or the transport error ("ReadTimeout: ..."); redacted.
    detail: str | None = None
    # False only when the request certainly did no work at the destination: it was
    # never sent, or was refused before processing (408, 423, 429, 503, 3xx, 4xx, 501).
    maybe_delivered: bool = True
    # After a retryable answer: "retry", or why not ("max_attempts", "budget",
    # "stopping"); None after an acknowledgement or a rejection.
    decision: Decision | None = None
    retry_in: float | None = None  # the wait taken, or the one that was not
    budget_left: float | None = None  # with decision "budget": what the run had left
    retry_after: str | None = None  # the Retry-After header as received (40 chars)
    reason: str | None = None  # why a rejection, when the status does not say
    redirects: int = 0  # redirects followed before the final answer
    redirected_to: str | None = None  # the last one's target, masked

    @property
    def error(self) -> str | None:
        """The text for `deliveries.error`: the decision, then what the answer said."""
        if self.outcome == "acknowledged":
            return None
        parts: list[str] = []
        if self.reason:
            parts.append(self.reason)
        if self.decision is not None:
            parts.append(_decision_text(self))
        if self.retry_after is not None:
            parts.append(f"Retry-After: {self.retry_after}")
        if self.detail:
            # A rejection's error is the response excerpt itself (SPEC §5).
            plain = self.status_code is None or (self.outcome == "rejected" and not self.reason)
            parts.append(self.detail if plain else f"response: {self.detail}")
        if self.redirects:
            parts.append(
                f"after {self.redirects} redirect{'s' * (self.redirects > 1)}, "
                f"the last to {self.redirected_to}"
            )
        return "; ".join(parts) or None


def _decision_text(record: AttemptRecord) -> str:
    if record.decision == "retry":
        return f"retry in {record.retry_in or 0.0:.2f} s"
    if record.decision == "max_attempts":
        why = f"max_attempts ({record.attempt}) reached"
    elif record.decision == "budget":
        why = (
            f"a {record.retry_in or 0.0:.2f} s wait exceeds the run's retry budget "
            f"({record.budget_left or 0.0:.2f} s left)"
        )
    else:
        why = "the run is stopping"
    return f"not retried: {why}; stays pending"
