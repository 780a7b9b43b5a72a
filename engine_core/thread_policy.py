"""How many CPU threads a step gets, chosen from the steps' own measured times.

On a small CPU the right intra-op thread count depends on what else runs: with every core free,
two threads make a 10-sequence step about 1.4x faster than one; with one core taken by another
process (or by kiln's own frontend streaming tokens), OpenMP's threads spin at barriers waiting
for a thread that is not scheduled and the same step gets 1.5-12x slower than with one thread.
No CPU flag or load average predicts which is better at a given moment, so the engine measures:
per step size (a power-of-two bucket of its token count) it keeps a moving average of the time per
step for each candidate thread count, runs the faster one, and every `explore_every` steps of that
size tries another candidate once, so a change in the machine's load is noticed within seconds.
A step size seen for the first time starts with the count the latest comparison preferred. When one
size's own verdict flips, the load changed: the other sizes' timings of the count that lost were taken
under the old load and are dropped, so those sizes start again from the new preference (prompt-chunk
sizes timed idle at two threads would otherwise keep stalling a second a step on a busy core). A step
that takes `STALLED` times its count's own average says the same at once: that count's timings go and
every size runs the other count until its own tries measure this one again.
A try that comes out far slower than the running choice (a busy core can stall a two-thread step
for a second and more) doubles that size's interval between tries, up to `MAX_EXPLORE_EVERY`
steps, so exploring never costs more than a few percent; a try that wins resets it.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger("kiln.engine")

SMOOTHING = 0.3  # weight of the newest step in the running choice's moving average
EXPLORE_SMOOTHING = 0.6  # an occasional sample of another count weighs more: it is all we know of it now
MAX_EXPLORE_EVERY = 1024
FAR_SLOWER = 1.5  # a try this many times slower than the running choice backs exploration off
STALLED = 4.0  # a step this many times its own count's average: the load changed under it


def candidate_thread_counts() -> list[int]:
    """1 and every usable core: the two ends are where the difference shows on small machines."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, max(1, usable)})


class ThreadTuner:
    def __init__(self, candidates: list[int] | None = None, explore_every: int = 32):
        self.candidates = candidates or candidate_thread_counts()
        self.explore_every = explore_every
        self.average: dict[tuple[int, int], float] = {}  # (bucket, threads) -> seconds per step
        self.steps: dict[int, int] = {}  # bucket -> steps since the last try of another count
        self.interval: dict[int, int] = {}  # bucket -> steps between tries, doubled while tries lose badly
        self.verdict: dict[int, int] = {}  # bucket -> the count its latest full comparison found fastest
        self.current = torch.get_num_threads()
        # what the latest comparison anywhere found: a new step size starts from it instead of paying
        # for a stalled try at once (the load that decides is the machine's, not the step size's)
        self.preferred = self.current if self.current in self.candidates else self.candidates[-1]
        self.preferred_interval = explore_every
        self.compared = False  # until one step size has tried every count, try each at once

    @staticmethod
    def bucket(tokens: int) -> int:
        return max(1, tokens).bit_length()

    def choose(self, tokens: int) -> int:
        """The thread count for a step of `tokens` tokens (sets torch's count if it changes)."""
        bucket = self.bucket(tokens)
        best = self._best(bucket)
        others = [n for n in self.candidates if n != best]
        untried = [n for n in others if (bucket, n) not in self.average]
        due = self.steps.get(bucket, 0) >= self.interval.get(bucket, self.preferred_interval) - 1
        if untried and not self.compared:
            threads = untried[0]
        elif others and due:
            threads = min(others, key=lambda n: self.average.get((bucket, n), 0.0))  # untried first
        else:
            threads = best
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads
        return threads

    def _best(self, bucket: int) -> int:
        measured = [n for n in self.candidates if (bucket, n) in self.average]
        if not measured:
            return self.preferred
        return min(measured, key=lambda n: self.average[(bucket, n)])

    def record(self, tokens: int, threads: int, seconds: float) -> None:
        bucket = self.bucket(tokens)
        key = (bucket, threads)
        best = self._best(bucket)
        running = self.average.get((bucket, best))
        if threads == best and running is not None and seconds > STALLED * running and len(self.candidates) > 1:
            self._stalled(threads, bucket, seconds)
            return
        if threads == best or running is None:
            self.steps[bucket] = self.steps.get(bucket, 0) + 1
            weight = SMOOTHING
        else:  # a try of another count: back off while such tries lose badly, else try as usual
            self.steps[bucket] = 0
            interval = self.interval.get(bucket, self.preferred_interval)
            lost_badly = seconds > FAR_SLOWER * running
            self.interval[bucket] = min(interval * 2, MAX_EXPLORE_EVERY) if lost_badly else self.explore_every
            self.preferred_interval = self.interval[bucket]
            weight = EXPLORE_SMOOTHING
        old = self.average.get(key)
        self.average[key] = seconds if old is None else (1 - weight) * old + weight * seconds
        if all((bucket, n) in self.average for n in self.candidates):
            best = self._best(bucket)
            lost = self.verdict.get(bucket, best)
            if lost != best:  # this size's own verdict flipped: the load changed, other sizes' timings of
                for stale in [k for k in self.average if k[1] == lost and k[0] != bucket]:  # the loser are stale
                    del self.average[stale]
            self.verdict[bucket] = best
            if best != self.preferred or not self.compared:
                log.info(
                    "CPU threads: %d preferred now; ms per step by size and thread count: %s", best, self.describe()
                )
            self.preferred = best
            self.compared = True

    def _stalled(self, threads: int, bucket: int, seconds: float) -> None:
        """A step far slower than its count's own average: a core was taken (or freed). Every size's timings
        at this count were taken under the old load, so they go, and the next steps of every size run the
        other count until their own tries measure this one again."""
        for stale in [k for k in self.average if k[1] == threads]:
            del self.average[stale]
        self.preferred = next(n for n in reversed(self.candidates) if n != threads)
        self.verdict.clear()
        log.info(
            "CPU threads: a %d-thread step of %d+ tokens took %.0f ms, far above its average: %d preferred now",
            threads,
            2 ** (bucket - 1),
            seconds * 1000,
            self.preferred,
        )

    def timed(self, tokens: int):
        """Context manager: run one step under the chosen thread count and record its time."""
        return _TimedStep(self, tokens)

    def describe(self) -> dict[str, dict[str, float]]:
        """Measured ms per step by bucket and thread count, for the log and /info."""
        table: dict[str, dict[str, float]] = {}
        for (bucket, threads), seconds in sorted(self.average.items()):
            table.setdefault(f"<={2**bucket - 1} tokens", {})[str(threads)] = round(seconds * 1000, 2)
        return table


class _TimedStep:
    def __init__(self, tuner: ThreadTuner, tokens: int):
        self.tuner, self.tokens = tuner, tokens

    def __enter__(self):
        self.threads = self.tuner.choose(self.tokens)
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.tuner.record(self.tokens, self.threads, time.perf_counter() - self.start)
        return False
