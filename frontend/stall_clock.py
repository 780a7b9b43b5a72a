"""A clock for liveness checks that stops while the event loop itself is stalled.

Heartbeats are read on the frontend's event loop. When the loop is stuck (a long piece of work
on it, a GC pause, a machine swapping), they wait unread in ZeroMQ, and on the ordinary clock
every engine would look silent the moment the loop wakes. On this clock the stall does not
count, so only an engine's own silence can get it dropped.
"""

from __future__ import annotations

import time


class StallFreeClock:
    def __init__(self, tick_s: float, tolerance_s: float = 0.5):
        self.tick_s = tick_s  # how often `tick` is called
        self.tolerance_s = tolerance_s  # lateness below this is ordinary scheduling jitter
        self._stalled_total = 0.0
        self._last_tick = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._stalled_total

    def tick(self) -> float:
        """Call every `tick_s` from the loop; returns how long the loop was stalled since the last call
        (0 when it was on time), which the clock then leaves out."""
        now = time.monotonic()
        late = now - self._last_tick - self.tick_s
        self._last_tick = now
        if late <= self.tolerance_s:
            return 0.0
        self._stalled_total += late
        return late
