"""The frontend's engine management: which engines there are, which one gets a request, and what
happens to requests when one is lost.

`EngineClient` keeps an `EngineHandle` per attached engine (its hello, latest stats, the requests
it holds) and a `RequestStream` per open request (an asyncio.Queue of `RequestOutput`s). It
welcomes or refuses engines, routes each request to the engine with the least outstanding work,
says no early when every engine is full (429), and shapes each engine's `/info` entry.

An engine that exits, falls silent, stops making progress or fails step after step is dropped:
its requests that have no token yet go to another engine, the others end with an explicit error,
never a hang. Silence is measured on a clock that leaves out the time the event loop itself was
stalled, so a busy frontend never drops a healthy engine. The timeouts are constructor arguments
(today's values below are the defaults) so tests can use short ones.

The sockets and codecs underneath are ipc/engine_link.py's; this module holds the policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from frontend.stall_clock import StallFreeClock
from ipc.engine_link import EngineLink
from ipc.messages import (
    Abort,
    EngineFailed,
    EngineHello,
    EngineReady,
    EngineStats,
    FinishReason,
    Heartbeat,
    Request,
    RequestOutput,
    SamplingParams,
    Shutdown,
    StepOutputs,
    Welcome,
)

log = logging.getLogger("kiln.frontend")

HEARTBEAT_TIMEOUT_S = 5.0
LOADING_HEARTBEAT_TIMEOUT_S = 60.0  # a big checkpoint load can hold the GIL for a while
PROGRESS_TIMEOUT_S = 60.0  # an engine holding requests must finish a step within this (hung-engine check)
QUEUE_PER_SLOT = 8  # requests allowed to wait per place in the running batch (max_batch) before a 429
QUEUED_TOKENS_PER_KV_TOKEN = 2  # and tokens of work (prompts + budgets) queued beyond what the KV pool holds
MAX_FAILED_STEPS = 5  # an engine whose steps fail this many times in a row is dropped (and restarted if ours)
LIVENESS_TICK_S = 0.5


class NoEngineAvailable(Exception):
    pass


@dataclass(eq=False)
class EngineHandle:
    hello: EngineHello
    last_seen: float  # on the client's stall-free clock, as is last_progress
    ready: bool = False
    stats: EngineStats = field(default_factory=EngineStats)
    requests: set[str] = field(default_factory=set)
    last_progress: float = 0.0  # last time `steps` advanced
    failed_steps: int = 0  # step outputs in a row that were all errors, with no step completed

    @property
    def engine_id(self) -> str:
        return self.hello.engine_id

    def describe(self) -> dict:
        stats, plan = self.stats, self.hello.plan
        return {
            "id": self.engine_id,
            "pid": self.hello.pid,
            "device": self.hello.device,
            "node": self.hello.node,
            "ready": self.ready,
            "running": self.stats.running,
            "waiting": self.stats.waiting,
            "kv_slots_used": self.stats.kv_slots_used,  # sequences holding KV blocks
            "kv_blocks_total": stats.kv_blocks_total,
            "kv_blocks_used": stats.kv_blocks_used,
            "kv_blocks_cached": stats.kv_blocks_cached,
            "kv_blocks_free": stats.kv_blocks_total - stats.kv_blocks_used,
            "kv_block_size": plan.kv_block_size,
            "prefix_caching": plan.prefix_caching,
            "prefix_cache_queries": stats.prefix_cache_queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
            "preemptions": stats.preemptions,
            "max_running_seen": self.stats.max_running_seen,
            "served": self.stats.served,
            "steps": self.stats.steps,
            "gpu_peak_bytes": self.stats.gpu_peak_bytes,
            "gpu_allocated_bytes": self.stats.gpu_allocated_bytes,
            "outstanding_requests": len(self.requests),
            "failed_steps": self.failed_steps,
            "max_batch": plan.max_batch,
            "max_context": plan.max_context,
        }


@dataclass(eq=False)
class RequestStream:
    request: Request
    engine_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens_received: int = 0
    finished: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def remaining(self) -> int:
        if self.tokens_received:
            return self.request.params.max_new_tokens - self.tokens_received
        return len(self.request.prompt_token_ids) + self.request.params.max_new_tokens

    def work(self, budget_cap: int) -> int:
        """`remaining`, with the budget counted up to `budget_cap` tokens (admission's measure)."""
        budget = min(self.request.params.max_new_tokens - self.tokens_received, budget_cap)
        return budget if self.tokens_received else len(self.request.prompt_token_ids) + budget


class EngineClient:
    def __init__(
        self,
        input_addresses: list[str],
        output_addresses: list[str],
        model_name: str,
        secret: str | None = None,
        on_engine_lost: Callable[[str, str, bool], None] | None = None,
        *,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        loading_heartbeat_timeout_s: float = LOADING_HEARTBEAT_TIMEOUT_S,
        progress_timeout_s: float = PROGRESS_TIMEOUT_S,
        liveness_tick_s: float = LIVENESS_TICK_S,
    ):
        self.link = EngineLink(input_addresses, output_addresses, secret)
        self.model_name = model_name
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.loading_heartbeat_timeout_s = loading_heartbeat_timeout_s
        self.progress_timeout_s = progress_timeout_s
        self.liveness_tick_s = liveness_tick_s
        self.engines: dict[str, EngineHandle] = {}
        self.failures: deque[str] = deque(maxlen=20)  # why engines were refused or failed, newest last
        self.streams: dict[str, RequestStream] = {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()  # fire-and-forget sends, referenced until done
        self._dropped: set[str] = set()  # engines dropped for silence; if they speak again, they are sent away
        self.engine_ready = asyncio.Event()
        self.on_engine_lost = on_engine_lost  # (engine id, why, was ready): the supervisor restarts its engines
        self.clock = StallFreeClock(liveness_tick_s)

    async def start(self) -> None:
        await self.link.start()
        self._tasks = [
            asyncio.create_task(loop()) for loop in (self._hello_loop, self._receive_loop, self._liveness_loop)
        ]

    async def close(self) -> None:
        for engine_id in list(self.engines):
            await self._send(engine_id, Shutdown())
        tasks = self._tasks + list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.link.close()

    # ---- requests ------------------------------------------------------------------------

    def ready_engines(self) -> list[EngineHandle]:
        return [e for e in self.engines.values() if e.ready]

    def overloaded(self) -> bool:
        """Say no early (429) rather than queue without bound: TGI's `overloaded`, SGLang's queue-full.
        Requests: the running batches full (every engine's max_batch) and QUEUE_PER_SLOT more waiting per
        place in them. Tokens: the open requests' work (unprocessed prompt + remaining budget) reaching
        3× the KV pools, so a queue of long requests is as full as a longer one of short ones. A budget
        counts up to one sequence's share of the pool (pool / max_batch): it is a bound, not a forecast,
        and one that names no limit (up to the context window, which can be the whole pool) must not
        count as the whole pool."""
        ready = self.ready_engines()
        places = sum(e.hello.plan.max_batch for e in ready)
        if len(self.streams) >= places * (1 + QUEUE_PER_SLOT):
            return True
        pool = sum(e.hello.plan.kv_cache_tokens for e in ready)
        budget_cap = max(pool // max(places, 1), 1)
        queued_tokens = sum(stream.work(budget_cap) for stream in self.streams.values())
        return queued_tokens >= pool * (1 + QUEUED_TOKENS_PER_KV_TOKEN)

    def pick_engine(self) -> EngineHandle:
        """Least outstanding work; ties go to the engine that has served least, so sequential
        requests alternate."""
        ready = self.ready_engines()
        if not ready:
            raise NoEngineAvailable("no engine is ready")
        return min(ready, key=lambda e: (self.outstanding_tokens(e), e.stats.served))

    def outstanding_tokens(self, engine: EngineHandle) -> int:
        """Tokens its requests still have to go through: unprocessed prompt + remaining budget.
        A better measure than request counts when prompts and budgets differ a lot."""
        return sum(self.streams[r].remaining for r in engine.requests if r in self.streams)

    async def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        engine: EngineHandle | None = None,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Register a stream and send its request (`cache_salt`: its prefix-cache blocks are shared only
        with requests of the same salt). Whatever goes wrong in here (no engine, a message that cannot be
        encoded, the caller cancelled mid-send), nothing stays registered."""
        stream = RequestStream(Request(request_id, prompt_ids, params, cache_salt), "")
        self.streams[request_id] = stream
        try:
            reached = await self._dispatch(stream, engine or self.pick_engine())
        except BaseException:
            self._finish(stream)
            if stream.engine_id:  # it may have left before the failure: make sure the engine drops it
                self._spawn(self._send(stream.engine_id, Abort([request_id])))
            raise
        if not reached:
            self._finish(stream)
            raise NoEngineAvailable("no engine is reachable")
        return stream

    async def end_all(self, why: str) -> None:
        """End every open stream with an explicit error and abort it in its engine (shutdown)."""
        for stream in list(self.streams.values()):
            self._fail(stream, why)
            await self._send(stream.engine_id, Abort([stream.request_id]))

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _dispatch(self, stream: RequestStream, engine: EngineHandle) -> bool:
        stream.engine_id = engine.engine_id
        engine.requests.add(stream.request_id)
        if await self._send(engine.engine_id, stream.request):
            return True
        engine.requests.discard(stream.request_id)
        return False

    async def abort(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is None:
            return
        self._finish(stream)
        await self._send(stream.engine_id, Abort([request_id]))

    def _finish(self, stream: RequestStream) -> None:
        if stream.finished:
            return
        stream.finished = True
        self.streams.pop(stream.request_id, None)
        engine = self.engines.get(stream.engine_id)
        if engine is not None:
            engine.requests.discard(stream.request_id)

    async def _send(self, engine_id: str, message) -> bool:
        return await self.link.send(engine_id, message)

    # ---- engine messages ------------------------------------------------------------------

    async def _hello_loop(self) -> None:
        """Engines say hello on the ROUTER; the answer goes straight back on the same route."""
        while True:
            hello = await self.link.next_hello()
            reason = self._refusal(hello)
            if reason:
                log.error("refusing engine %s: %s", hello.engine_id, reason)
                self.failures.append(reason)
            else:
                log.info("engine %s (pid %d) on %s says hello; loading", hello.engine_id, hello.pid, hello.device)
                now = self.clock.now()
                self.engines[hello.engine_id] = EngineHandle(hello, last_seen=now, last_progress=now)
                self._dropped.discard(hello.engine_id)
            await self._send(hello.engine_id, Welcome(accepted=not reason, reason=reason))

    def _refusal(self, hello: EngineHello) -> str:
        if hello.model != self.model_name:
            return f"engine {hello.engine_id} loads {hello.model!r} but this frontend serves {self.model_name!r}"
        existing = self.engines.get(hello.engine_id)
        if existing is not None:
            if existing.hello.pid == hello.pid:
                return f"an engine named {hello.engine_id} is already attached"
            # a restarted engine under the same name: the old process is gone even if its heartbeat
            # timeout has not run out yet
            self.engine_lost(hello.engine_id, f"replaced by a new process (pid {hello.pid})")
        return ""

    async def _receive_loop(self) -> None:
        while True:
            self._handle(await self.link.next_message())

    def _handle(self, message) -> None:
        if isinstance(message, StepOutputs):
            if self._count_failed_step(message):
                return
            self._note_stats(message.engine_id, message.stats)
            for output in message.outputs:
                stream = self.streams.get(output.request_id)
                if stream is None or stream.engine_id != message.engine_id:
                    continue  # aborted here already (the engine's abort is in flight), or moved
                stream.tokens_received += len(output.new_token_ids)
                stream.queue.put_nowait(output)
                if output.finish_reason is not None:
                    self._finish(stream)
        elif isinstance(message, Heartbeat):
            self._note_stats(message.engine_id, message.stats)
        elif isinstance(message, EngineReady):
            engine = self.engines.get(message.engine_id)
            if engine is not None:
                engine.ready, engine.last_seen = True, self.clock.now()
                log.info("engine %s ready (loaded in %.1f s)", message.engine_id, message.load_seconds)
                self.engine_ready.set()
        elif isinstance(message, EngineFailed):
            self.failures.append(message.message)
            self.engine_lost(message.engine_id, message.message)

    def _count_failed_step(self, message: StepOutputs) -> bool:
        """An engine whose steps all fail (a broken device, a corrupted model) must stop being picked:
        after MAX_FAILED_STEPS failed outputs in a row with no completed step, it is dropped and told
        to stop. True when that happened (its outputs were already turned into errors)."""
        engine = self.engines.get(message.engine_id)
        if engine is None:
            return False
        if message.stats.steps != engine.stats.steps:
            engine.failed_steps = 0
        elif message.outputs and all(o.finish_reason == FinishReason.ERROR for o in message.outputs):
            engine.failed_steps += 1
            if engine.failed_steps >= MAX_FAILED_STEPS:
                why = f"{engine.failed_steps} steps in a row failed (last: {message.outputs[-1].error})"
                self.failures.append(f"engine {engine.engine_id}: {why}")
                self.engine_lost(engine.engine_id, why)
                self._spawn(self._send(engine.engine_id, Shutdown()))
                return True
        return False

    def _note_stats(self, engine_id: str, stats: EngineStats) -> None:
        engine = self.engines.get(engine_id)
        if engine is None:
            if engine_id in self._dropped:  # it was dropped but lives on: tell it to go, not to linger
                self._dropped.discard(engine_id)
                self._spawn(
                    self._send(
                        engine_id,
                        Welcome(
                            accepted=False,
                            reason="the frontend dropped this engine after missed heartbeats; "
                            "restart it to attach again",
                        ),
                    )
                )
            return
        now = self.clock.now()
        if stats.steps != engine.stats.steps or not engine.requests:
            engine.last_progress = now
        engine.stats, engine.last_seen = stats, now

    def engine_lost(self, engine_id: str, why: str) -> None:
        """Forget an engine. Its requests with no token yet move to another engine; the rest end
        with an explicit error (their text so far was already sent, so they cannot restart)."""
        engine = self.engines.pop(engine_id, None)
        if engine is None:
            return
        log.error("engine %s lost: %s", engine_id, why)
        if not self.ready_engines():
            self.engine_ready.clear()
        for request_id in list(engine.requests):
            stream = self.streams.get(request_id)
            if stream is None:
                continue
            if stream.tokens_received == 0 and self.ready_engines():
                self._spawn(self._redispatch(stream, f"engine {engine_id} lost: {why}"))
            else:
                self._fail(stream, f"engine {engine_id} lost: {why}")
        if self.on_engine_lost is not None:
            self.on_engine_lost(engine_id, why, engine.ready)

    async def _redispatch(self, stream: RequestStream, why: str) -> None:
        for engine in sorted(self.ready_engines(), key=self.outstanding_tokens):
            if await self._dispatch(stream, engine):
                log.info("request %s moved to engine %s", stream.request_id, engine.engine_id)
                return
        self._fail(stream, why)

    def _fail(self, stream: RequestStream, why: str) -> None:
        stream.queue.put_nowait(RequestOutput(stream.request_id, [], FinishReason.ERROR, why))
        self._finish(stream)

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.liveness_tick_s)
            stalled = self.clock.tick()
            if stalled:
                log.warning("the event loop was stalled for %.1f s; not counted against engines' heartbeats", stalled)
            now = self.clock.now()
            for engine in list(self.engines.values()):
                timeout = self.heartbeat_timeout_s if engine.ready else self.loading_heartbeat_timeout_s
                if now - engine.last_seen > timeout:
                    self._dropped.add(engine.engine_id)
                    self.engine_lost(engine.engine_id, f"no heartbeat for {now - engine.last_seen:.1f} s")
                elif engine.requests and now - engine.last_progress > self.progress_timeout_s:
                    self.engine_lost(
                        engine.engine_id,
                        f"no step finished in {now - engine.last_progress:.0f} s while it held requests (hung)",
                    )
                    await self._send(engine.engine_id, Shutdown())
