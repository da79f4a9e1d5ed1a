"""Client-side pacing shared by every sending thread (SPEC §3 `requests_per_second`).

Two rules, both enforced at admission:

- slots `SPACING`/rate apart on a fixed timeline. `rate` slots span `SPACING` = 1.008 s,
  which leaves 8 ms for what happens between admission and arrival at the receiver
  (a thread waiting for the GIL, either process waiting for a CPU) and achieves 99.2 %
  of the rate. While callers keep coming (one waited for its turn or its slot, or
  comes within a slot of the last admission), a late one does not push later slots
  back: the next ones come sooner, catching up at most `CATCH_UP` seconds, so a
  stalled process does not lower the rate. A caller that finds the pacer idle, and
  the first after a pause, start a new timeline (no burst after idle time);
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
CATCH_UP = 0.1


class Pacer:
    """Admits callers of `wait` at most `rate` a second, evenly spaced; 0 = unpaced."""

    def __init__(self, rate: float, sleep: Sleep, clock: Clock = time.monotonic) -> None:
        self.interval = SPACING / rate if rate > 0 else 0.0
        self._sleep = sleep
        self._clock = clock
        self._turn = threading.Lock()  # one caller at a time waits for its slot
        self._state = threading.Lock()  # guards _paused_until; never held while sleeping
        self._slot = -math.inf  # the next slot on the timeline
        self._last = -math.inf  # the last admission
        # Admission times of the last floor(rate) callers (at least one).
        self._recent: collections.deque[float] = collections.deque(
            maxlen=max(1, math.floor(rate)) if rate > 0 else 1
        )
        self._paused_until = -math.inf

    def wait(self) -> bool:
        """Block until this caller may send; False if the run stopped meanwhile."""
        if not self.interval:
            return self._wait_for_pause()
        waited = not self._turn.acquire(blocking=False)
        if waited:
            self._turn.acquire()
        try:
            while True:
                now = self._clock()
                if not waited and now > self._last + self.interval:
                    self._slot = now  # idle: a new timeline starts now, no catching up
                else:  # demand never stopped: catch up on late slots, a little
                    self._slot = max(self._slot, now - CATCH_UP)
                # After a pause the timeline starts again where it ends.
                self._slot = max(self._slot, self._pause_end())
                due = max(self._slot, self._window_opens())
                if now >= due:
                    self._recent.append(now)
                    self._last = now
                    self._slot += self.interval
                    return True
                if self._sleep(due - now):
                    return False
                waited = True
        finally:
            self._turn.release()

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
