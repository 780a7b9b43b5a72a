"""The frontend's side of the engines: sockets, routing, per-request streams, liveness.

One ROUTER socket sends requests to engines (addressed by engine id); one PULL socket receives
everything engines say. Both live on the frontend's event loop through zmq.asyncio, so the loop
never blocks. Each request gets an asyncio.Queue of `RequestOutput`s; an engine that dies or falls
silent turns every request it held into an explicit error, never a hang.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from ipc.messages import (
    Abort,
    EngineFailed,
    EngineHello,
    EngineReady,
    EngineStats,
    Heartbeat,
    Request,
    RequestOutput,
    SamplingParams,
    Shutdown,
    StepOutputs,
    engine_input_codec,
    engine_output_codec,
)

log = logging.getLogger("kiln.frontend")

HEARTBEAT_TIMEOUT_S = 5.0
QUEUE_PER_SLOT = 8  # waiting requests allowed per KV slot before new ones get a 429


class NoEngineAvailable(Exception):
    pass


@dataclass(eq=False)
class EngineHandle:
    hello: EngineHello
    ready: bool = False
    stats: EngineStats = field(default_factory=EngineStats)
    last_seen: float = field(default_factory=time.monotonic)
    requests: set[str] = field(default_factory=set)
    pending_tokens: int = 0  # prompt + budget of requests sent but not finished: the routing load

    @property
    def engine_id(self) -> str:
        return self.hello.engine_id

    def describe(self) -> dict:
        return {
            "id": self.engine_id,
            "pid": self.hello.pid,
            "device": self.hello.device,
            "ready": self.ready,
            "running": self.stats.running,
            "waiting": self.stats.waiting,
            "kv_slots_used": self.stats.kv_slots_used,
            "max_running_seen": self.stats.max_running_seen,
            "served": self.stats.served,
            "steps": self.stats.steps,
            "outstanding": len(self.requests),
            "max_batch": self.hello.plan.max_batch,
            "max_context": self.hello.plan.max_context,
        }


@dataclass(eq=False)
class RequestStream:
    request_id: str
    engine_id: str
    cost: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class EngineClient:
    def __init__(self, input_address: str, output_address: str, model_name: str):
        self.input_address = input_address
        self.output_address = output_address
        self.model_name = model_name
        self.engines: dict[str, EngineHandle] = {}
        self.failures: list[str] = []  # why engines refused or died, for /health and the launcher
        self.streams: dict[str, RequestStream] = {}
        self._context = zmq.asyncio.Context()
        self._encoder, _ = engine_input_codec()
        self._tasks: list[asyncio.Task] = []
        self.engine_ready = asyncio.Event()

    async def start(self) -> None:
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.input_address)
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self.output_address)
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._liveness_loop())]

    async def close(self) -> None:
        for engine_id in list(self.engines):
            await self._send(engine_id, Shutdown())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._router.close()
        self._pull.close()
        self._context.term()

    # ---- requests ------------------------------------------------------------------------

    def ready_engines(self) -> list[EngineHandle]:
        return [e for e in self.engines.values() if e.ready]

    def overloaded(self) -> bool:
        """Say no early (429) rather than queue without bound: TGI's `overloaded`, SGLang's queue-full."""
        capacity = sum(e.hello.plan.max_batch for e in self.ready_engines())
        return len(self.streams) >= capacity * (1 + QUEUE_PER_SLOT)

    def pick_engine(self) -> EngineHandle:
        """Least outstanding work: tokens still to be processed by requests it holds."""
        ready = self.ready_engines()
        if not ready:
            raise NoEngineAvailable("no engine is ready")
        return min(ready, key=lambda e: (e.pending_tokens, len(e.requests)))

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     engine: EngineHandle | None = None) -> RequestStream:
        engine = engine or self.pick_engine()
        stream = RequestStream(request_id, engine.engine_id, len(prompt_ids) + params.max_new_tokens)
        self.streams[request_id] = stream
        engine.requests.add(request_id)
        engine.pending_tokens += stream.cost
        if not await self._send(engine.engine_id, Request(request_id, prompt_ids, params)):
            self._finish(stream)
            raise NoEngineAvailable(f"engine {engine.engine_id} is unreachable")
        return stream

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
        if engine is not None and stream.request_id in engine.requests:
            engine.requests.discard(stream.request_id)
            engine.pending_tokens -= stream.cost

    async def _send(self, engine_id: str, message) -> bool:
        try:
            await self._router.send_multipart([engine_id.encode(), self._encoder.encode(message)])
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the engine's socket is gone
            log.warning("cannot reach engine %s: %s", engine_id, exc)
            return False

    # ---- engine messages ------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        _, decoder = engine_output_codec()
        while True:
            frame = await self._pull.recv(copy=False)
            try:
                message = decoder.decode(frame.buffer)
            except Exception as exc:
                log.warning("dropping undecodable engine message: %s", exc)
                continue
            self._handle(message)

    def _handle(self, message) -> None:
        if isinstance(message, StepOutputs):
            engine = self.engines.get(message.engine_id)
            if engine is not None:
                engine.stats, engine.last_seen = message.stats, time.monotonic()
            for output in message.outputs:
                stream = self.streams.get(output.request_id)
                if stream is None:
                    continue  # aborted here already; the engine's abort is in flight
                stream.queue.put_nowait(output)
                if output.finish_reason is not None:
                    self._finish(stream)
        elif isinstance(message, Heartbeat):
            engine = self.engines.get(message.engine_id)
            if engine is not None:
                engine.stats, engine.last_seen = message.stats, time.monotonic()
        elif isinstance(message, EngineHello):
            if message.model != self.model_name:
                why = f"engine {message.engine_id} serves {message.model!r}, this frontend serves {self.model_name!r}"
                log.error("refusing %s", why)
                self.failures.append(why)
                asyncio.ensure_future(self._send(message.engine_id, Shutdown()))
                return
            log.info("engine %s (pid %d) on %s says hello; loading", message.engine_id, message.pid, message.device)
            self.engines[message.engine_id] = EngineHandle(message)
        elif isinstance(message, EngineReady):
            engine = self.engines.get(message.engine_id)
            if engine is not None:
                engine.ready, engine.last_seen = True, time.monotonic()
                log.info("engine %s ready (loaded in %.1f s)", message.engine_id, message.load_seconds)
                self.engine_ready.set()
        elif isinstance(message, EngineFailed):
            self.failures.append(message.message)
            self.engine_lost(message.engine_id, message.message)

    def engine_lost(self, engine_id: str, why: str) -> None:
        """Forget an engine and end every request it held with an explicit error."""
        engine = self.engines.pop(engine_id, None)
        if engine is None:
            return
        log.error("engine %s lost: %s", engine_id, why)
        for request_id in list(engine.requests):
            stream = self.streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(RequestOutput(request_id, [], "error", f"engine {engine_id} lost: {why}"))
                self._finish(stream)
        if not self.ready_engines():
            self.engine_ready.clear()

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for engine in list(self.engines.values()):
                if engine.ready and now - engine.last_seen > HEARTBEAT_TIMEOUT_S:
                    self.engine_lost(engine.engine_id, f"no heartbeat for {now - engine.last_seen:.1f} s")
