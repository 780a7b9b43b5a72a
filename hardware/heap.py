"""Giving freed heap memory back to the OS.

glibc keeps what a process frees in its arenas (one per thread that allocated), to reuse it; after a
one-off peak (a model's float weights replaced by quantized ones, a warm-up's activations, a burst of
multi-MB request bodies tokenized on worker threads) the resident size stays at the peak although
nothing uses it. `malloc_trim(0)` hands every arena's free pages back. No-op without glibc.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util


def release_freed_memory() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TrimAfterBursts:
    """Trims once things are quiet again: each `note()` (a large body arrived) pushes the trim `delay_s`
    later, so a burst of large requests costs one trim, after its last body was freed; it runs on the
    default executor (a few ms for a few hundred MB), never on the event loop."""

    def __init__(self, delay_s: float = 1.0):
        self.delay_s = delay_s
        self._pending: asyncio.TimerHandle | None = None

    def note(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pending is not None:
            self._pending.cancel()
        self._pending = loop.call_later(self.delay_s, lambda: loop.run_in_executor(None, release_freed_memory))
