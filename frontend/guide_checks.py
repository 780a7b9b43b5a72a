"""Structured-output checks off the event loop: a guide's checks (frontend/structured.py) can cost seconds
of CPU for a large schema (measured: jsonschema's meta-schema check of a 0.55 MB schema with 8,000
patterned properties takes 2.8 s, a 2.8 MB one 11.5 s), and on the loop that time would stall every
stream the frontend serves. They run on a small pool of their own, so a hostile schema neither stalls
the loop nor takes the threads that tokenize other requests' prompts (asyncio's default executor).
Python threads share the GIL, but the loop gets it back every switch interval (5 ms): other streams slow
down while a large schema is checked, they do not stop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
WORKERS = 2  # checks at once; more would only share the GIL with the loop more ways


class GuideChecks:
    def __init__(self, workers: int = WORKERS):
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-guide-check")

    async def run(self, check: Callable[..., T], *args, off_loop: bool = True) -> T:
        """`check(*args)` on the pool (its ApiError propagates as raised); inline when `off_loop` is false,
        for requests that carry no guide and whose check is then a no-op."""
        if not off_loop:
            return check(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(check, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
