"""What a run is asked to do, how it is driven, and what it reports.

    RunRequest      what the user chose: trigger, resync keys, audiences let through
    Seams           how the run is driven: stop event, progress display, and the test
                    seams (HTTP transport, first backoff)
    RunResult       a finished run, as `sync` returns it and `sync_runs` records it
    DryRunReport    what `sync --dry-run` found

These are plain values, imported by the CLI, the daemon, the views and the metrics
without pulling in the pipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from reconciler.pipeline.guard import Verdict
    from reconciler.pipeline.plan import PlanCounts

# Accounts before contacts (SPEC §9): ChartMogul learns of a company before the contacts
# that name it. Every pending account update is settled before the first contact goes.
SEND_ORDER = ("customer", "contact")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RunRequest:
    """What to run; the defaults are a manual `reconciler sync`."""

    trigger: str = "manual"
    resync_keys: Collection[str] = ()
    resync_label: str | None = None  # `*` or the key of a resync, as `sync_runs` shows it
    # Audience keys the safety guard lets through this once (`--accept-exits`).
    accept_exits: Collection[str] = ()


@dataclass
class Seams:
    """How a run is driven from outside: a stop signal and a progress display, and for
    tests the HTTP transport and the first retry backoff."""

    stop: threading.Event = field(default_factory=threading.Event)
    stopped_by: str | None = None  # the signal that set `stop` (SIGTERM, SIGINT), if one did
    progress: Progress | None = None
    transport: httpx.BaseTransport | None = None
    backoff_initial: float = 0.5


def _by_kind() -> dict[str, dict[str, int]]:
    return {kind: dict.fromkeys(("sent", "failed", "skipped", "pending"), 0) for kind in SEND_ORDER}


@dataclass
class RunResult:
    run_id: int
    status: str
    users_seen: int = 0
    users_changed: int = 0
    entered: int = 0
    exited: int = 0
    traits_changed: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    pending: int = 0
    rows_ignored: int = 0
    resent: int = 0
    error: str | None = None
    guard: Verdict | None = None  # the safety guard's verdict, once the diff was judged
    emails_left_out: int = 0
    linked_in_left_out: int = 0
    accounts_seen: int = 0
    accounts_changed: int = 0
    # sent, failed, skipped and pending updates of each entity (`contact`, `customer`)
    by_kind: dict[str, dict[str, int]] = field(default_factory=_by_kind)

    @property
    def exit_status(self) -> int:
        return {"succeeded": 0, "halted": 4}.get(self.status, 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every count, and the guard's verdict as a dict."""
        return {**vars(self), "guard": self.guard.as_dict() if self.guard else None}


@dataclass(frozen=True)
class DryRunReport:
    users_seen: int
    counts: PlanCounts
    kept: int
    rows_ignored: int
    failed_entries: dict[str, str]
    sample: list[dict[str, Any]]
    guard: Verdict
    resent: int = 0
    accounts_seen: int = 0

    @property
    def exit_status(self) -> int:
        """4 when a real run would halt (SPEC §4), else 1 if an entry failed, else 0."""
        return 4 if self.guard.halted else 1 if self.failed_entries else 0
