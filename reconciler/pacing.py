"""Client-side pacing shared by every sending thread (SPEC §3 `requests_per_second`).

Two rules, both enforced at admission:

- slots `SPACING`/rate apart on a fixed timeline. `rate` slots span `SPACING` = 1.008 s,
  which leaves 8 ms for what happens between admission and arrival at the receiver
  (a thread waiting for the GIL, either process waiting for a CPU) and achieves 99.2 %
  of the rate. A sender that wakes late (by up to `CATCH_UP`) does not push later
  slots back, so late wake-ups do not lower the rate; one that finds the pacer idle
  starts a new timeline (no burst after idle time);
- a sliding window, the hard bound: an admission comes at least `WINDOW` seconds after
  the one `rate` admissions before it, so no one-second window ever holds more than
  `rate` admissions, however late wake-ups and catching up bunch them.

The margins trade against each other: every millisecond of margin per second costs
0.1 % of the rate, and a slower pace than 99 % of the configured one would be felt.

A destination that says "slow down" (429, or any Retry-After) pauses every sender,
not just the one that heard it (`pause`).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable

# Sleep up to the given seconds; True when interrupted because the run is stopping.
Sleep = Callable[[float], bool]
Clock = Callable[[], float]

SPACING = 1.008
WINDOW = 1.002
CATCH_UP = 0.02


class Pacer:
    """Admits callers of `wait` at most `rate` a second, evenly spaced; 0 = unpaced."""

    def __init__(self, rate: float, sleep: Sleep, clock: Clock = time.monotonic) -> None:
        self.interval = SPACING / rate if rate > 0 else 0.0
        self._catch_up = max(self.interval, CATCH_UP)
        self._sleep = sleep
        self._clock = clock
        self._turn = threading.Lock()       # one caller at a time waits for its slot
        self._state = threading.Lock()      # guards _paused_until; never held while sleeping
        self._slot = -math.inf              # the next slot on the timeline
        # Admission times of the last floor(rate) callers (at least one).
        self._recent: collections.deque[float] = collections.deque(
            maxlen=max(1, math.floor(rate)) if rate > 0 else 1)
        self._paused_until = -math.inf

    def wait(self) -> bool:
        """Block until this caller may send; False if the run stopped meanwhile."""
        if not self.interval:
            return self._wait_for_pause()
        with self._turn:
            while True:
                now = self._clock()
                if now > self._slot + self._catch_up:
                    self._slot = now  # idle: a new timeline starts now, no catching up
                due = max(self._slot, self._window_opens(), self._pause_end())
                if now >= due:
                    self._recent.append(now)
                    self._slot += self.interval
                    return True
                if self._sleep(due - now):
                    return False

    def _window_opens(self) -> float:
        full = len(self._recent) == self._recent.maxlen
        return self._recent[0] + WINDOW if full else -math.inf

    def _pause_end(self) -> float:
        with self._state:
            return self._paused_until

    def _wait_for_pause(self) -> bool:
        while (left := self._pause_end() - self._clock()) > 0:
            if self._sleep(left):
                return False
        return True

    def pause(self, seconds: float) -> None:
        """Hold every sender back until `seconds` from now (an earlier pause may last longer)."""
        with self._state:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    @property
    def paused_until(self) -> float:
        """The clock reading before which nobody is admitted (-inf when never paused)."""
        with self._state:
            return self._paused_until
