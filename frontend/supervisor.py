"""Keeps the engines that `serve` started alive: a lost one is restarted with backoff, up to a cap.

The engine client notices a loss (process exit, silence, a hang, steps that keep failing) and ends
or moves the requests it held. This module makes sure the old process is really gone (SIGTERM,
then SIGKILL after a grace period: a hung engine does not exit on its own, and its successor needs
its name), then starts a new one under the same name after 1, 2, 4 ... 30 s. An engine lost more
than `max_restarts` times in a row (a life of STABLE_AFTER_S resets the count) makes the frontend
give up and exit non-zero, so the supervisor around it (systemd, Kubernetes) acts.

Only engines that have been ready once are restarted: one that cannot even start (wrong model, no
memory) is a configuration error, reported at once rather than retried.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from frontend.router import EngineClient

log = logging.getLogger("kiln.frontend")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 120.0  # an engine that lived this long before it was lost starts a fresh count
KILL_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
POLL_S = 0.2


@dataclass(eq=False)
class ChildEngine:
    engine_id: str
    device: int | None
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    ever_ready: bool = False
    restarts: int = 0  # in a row
    restart_at: float | None = None  # a restart is due then
    kill_at: float | None = None  # told to stop; SIGKILL if still alive then
    last_loss: str = ""


class EngineSupervisor:
    def __init__(self, client: EngineClient, launch: Callable[[str, int | None], subprocess.Popen], max_restarts: int):
        self.client = client
        self.launch = launch
        self.max_restarts = max_restarts
        self.children: dict[str, ChildEngine] = {}
        self.gave_up: str | None = None  # why the frontend should exit, once it should
        self.changed = asyncio.Event()  # set when giving up, or when no engine could start

    def start(self, engine_id: str, device: int | None) -> None:
        child = ChildEngine(engine_id, device)
        self.children[engine_id] = child
        self._launch(child)

    def _launch(self, child: ChildEngine) -> None:
        child.process = self.launch(child.engine_id, child.device)
        child.started_at, child.kill_at = time.monotonic(), None

    def on_engine_lost(self, engine_id: str, why: str, was_ready: bool = False) -> None:
        """The client dropped an engine. If it is ours and still running, make it go. `was_ready` counts
        even when the engine was lost before a poll saw it ready (a few fast failed steps)."""
        child = self.children.get(engine_id)
        if child is None or child.process is None:
            return
        child.ever_ready = child.ever_ready or was_ready
        child.last_loss = why
        if child.process.poll() is None and child.kill_at is None:
            child.process.terminate()
            child.kill_at = time.monotonic() + KILL_GRACE_S

    def never_started(self) -> bool:
        """Every engine exited before any was ready: a configuration error, nothing to restart."""
        return all(c.process is None and not c.ever_ready for c in self.children.values())

    async def watch(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(POLL_S)

    def poll(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            engine = self.client.engines.get(child.engine_id)
            if engine is not None and engine.ready:
                child.ever_ready, child.last_loss = True, ""
            if child.process is not None:
                code = child.process.poll()
                if code is None:
                    if child.kill_at is not None and now >= child.kill_at:
                        log.warning("engine %s did not stop within %.0f s; killing it", child.engine_id, KILL_GRACE_S)
                        child.process.kill()
                    continue
                why = f"process {child.process.pid} exited with code {code}"
                child.process = None
                child.last_loss = child.last_loss or why
                self.client.engine_lost(child.engine_id, why)  # a no-op when the client dropped it already
                if child.ever_ready:
                    self._schedule_restart(child, now)
            elif child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                log.info(
                    "restarting engine %s (restart %d of at most %d in a row)",
                    child.engine_id,
                    child.restarts,
                    self.max_restarts,
                )
                self._launch(child)
        if self.never_started() and not self.client.engine_ready.is_set():
            self.changed.set()

    def _schedule_restart(self, child: ChildEngine, now: float) -> None:
        if now - child.started_at >= STABLE_AFTER_S:
            child.restarts = 0
        if child.restarts >= self.max_restarts:
            self.gave_up = (
                f"engine {child.engine_id} was lost {child.restarts + 1} times in a row "
                f"(last: {child.last_loss}); --max-restarts is {self.max_restarts}"
            )
            log.error("giving up: %s", self.gave_up)
            self.changed.set()
            return
        delay = min(BACKOFF_FIRST_S * 2**child.restarts, BACKOFF_MAX_S)
        child.restarts += 1
        child.restart_at = now + delay
        log.warning("engine %s lost (%s); restarting it in %.0f s", child.engine_id, child.last_loss, delay)

    def restarting(self) -> dict[str, dict]:
        """Engines on their way back, for /health: why they were lost and how far the restarts went."""
        status = {}
        for child in self.children.values():
            engine = self.client.engines.get(child.engine_id)
            if child.ever_ready and child.last_loss and not (engine is not None and engine.ready):
                status[child.engine_id] = {
                    "reason": child.last_loss,
                    "restarts": child.restarts,
                    "max_restarts": self.max_restarts,
                }
        return status

    def stop_all(self, timeout: float) -> None:
        processes = [c.process for c in self.children.values() if c.process is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for child in self.children.values():
            child.process, child.restart_at = None, None
