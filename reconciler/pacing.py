"""Client-side pacing shared by every sending thread.

Requests are spaced evenly, 1/rate seconds apart, so no one-second window ever holds
more than `rate` sends. A destination that says "slow down" (429, 503 with
Retry-After) pauses every thread, not just the one that heard it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pacer:
    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._paused_until = 0.0

    def wait(self, stop: threading.Event) -> bool:
        """Block until this caller may send; False if `stop` was set meanwhile."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next, self._paused_until)
            self._next = slot + self.interval
        delay = slot - now
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()

    def pause(self, seconds: float) -> None:
        """Hold every sender back for `seconds` from now."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)
