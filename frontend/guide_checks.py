"""Structured-output checks off the event loop, in a process of their own: a guide's checks
(frontend/structured.py) can cost seconds of CPU for a large schema (measured: jsonschema's meta-schema
check of a 0.55 MB schema with 8,000 patterned properties takes 2.8 s, a 2.8 MB one 11.5 s), and on the
loop that time would stall every stream the frontend serves.

Why a process, not a thread: a thread shares the GIL with the loop, which then waits for the checking
thread at every handoff (measured on 2 cores, the check thread at nice +10: a stream's largest token
gap 1.0-2.6 s). The process runs on idle cores only (SCHED_IDLE, hardware/cpu_sharing.py): at nice +10
it still stalled the engine's step, 0.3-1.2 s; at SCHED_IDLE 0.11 s at most. So a check waits while
every core is busy; that delays its own request, never the others. The process starts with the first
guided request (about a third of a second); checks run there one or two at a time; one that dies (a
schema that exhausts its memory) is replaced, and its request retried once.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from frontend.api import ApiError
from hardware.cpu_sharing import idle_cores_only

T = TypeVar("T")
WORKERS = 2  # checks at once: a slow schema does not hold up a small one behind it


class GuideChecks:
    def __init__(self, workers: int = WORKERS):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None  # started by the first check that runs off the loop

    async def run(self, check: Callable[..., T], *args, off_loop: bool = True) -> T:
        """`check(*args)` in the check process (a module-level function: it is pickled there; its ApiError
        comes back as raised); inline when `off_loop` is false, for requests that carry no guide and whose
        check is then a no-op."""
        if not off_loop:
            return check(*args)
        loop = asyncio.get_running_loop()
        for _attempt in range(2):
            pool = self._started()
            try:
                return await loop.run_in_executor(pool, functools.partial(check, *args))
            except BrokenProcessPool:
                if self._pool is pool:  # the first request to see it replaces it
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
        raise ApiError(500, "the process that checks structured-output guides died twice on this request")

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: forking a process that runs an event loop and threads copies their locks mid-use
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=idle_cores_only
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
