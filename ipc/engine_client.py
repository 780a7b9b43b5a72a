"""The frontend's side of the engines: sockets, handshake, routing, per-request streams, liveness.

One ROUTER socket talks with each engine's DEALER (hello and welcome, then requests and aborts,
addressed by engine id); one PULL socket receives step outputs and heartbeats. Both live on the
frontend's event loop through zmq.asyncio, so the loop never blocks. Each request gets an
asyncio.Queue of `RequestOutput`s. An engine that exits, falls silent or stops making progress is
dropped: its requests that have no token yet go to another engine, the others end with an
explicit error, never a hang.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from ipc.security import CurveKeys
from ipc.messages import (
    Abort,
    Welcome,
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
LOADING_HEARTBEAT_TIMEOUT_S = 60.0  # a big checkpoint load can hold the GIL for a while
PROGRESS_TIMEOUT_S = 60.0  # an engine holding requests must finish a step within this (hung-engine check)
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
    last_progress: float = field(default_factory=time.monotonic)  # last time `steps` advanced

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
            "gpu_peak_bytes": self.stats.gpu_peak_bytes,
            "gpu_allocated_bytes": self.stats.gpu_allocated_bytes,
            "outstanding_requests": len(self.requests),
            "max_batch": self.hello.plan.max_batch,
            "max_context": self.hello.plan.max_context,
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


class EngineClient:
    def __init__(self, input_addresses: list[str], output_addresses: list[str], model_name: str,
                 secret: str | None = None):
        self.input_addresses = input_addresses  # e.g. ipc:// for local engines, tcp:// for other machines
        self.output_addresses = output_addresses
        self.model_name = model_name
        self.keys = CurveKeys(secret) if secret else None
        self.engines: dict[str, EngineHandle] = {}
        self.failures: deque[str] = deque(maxlen=20)  # why engines were refused or failed, newest last
        self.streams: dict[str, RequestStream] = {}
        self._context = zmq.asyncio.Context()
        self._encoder, _ = engine_input_codec()
        self._tasks: list[asyncio.Task] = []
        self._dropped: set[str] = set()  # engines dropped for silence; if they speak again, they are sent away
        self.engine_ready = asyncio.Event()

    async def start(self) -> None:
        if self.keys is not None:
            from zmq.auth.asyncio import AsyncioAuthenticator

            self._auth = AsyncioAuthenticator(self._context)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=self.keys)
        self._router = self._bind(zmq.ROUTER, self.input_addresses)
        self._pull = self._bind(zmq.PULL, self.output_addresses)
        self._tasks = [asyncio.create_task(loop()) for loop in (self._hello_loop, self._receive_loop,
                                                                   self._liveness_loop)]

    def _bind(self, kind: int, addresses: list[str]) -> zmq.asyncio.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished engine raises, never vanishes
        if self.keys is not None:
            self.keys.as_server(sock)
        for address in addresses:
            sock.bind(address)
        return sock

    async def close(self) -> None:
        for engine_id in list(self.engines):
            await self._send(engine_id, Shutdown())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._router.close()
        self._pull.close()
        if self.keys is not None:
            self._auth.stop()
        self._context.term()

    # ---- requests ------------------------------------------------------------------------

    def ready_engines(self) -> list[EngineHandle]:
        return [e for e in self.engines.values() if e.ready]

    def overloaded(self) -> bool:
        """Say no early (429) rather than queue without bound: TGI's `overloaded`, SGLang's queue-full."""
        capacity = sum(e.hello.plan.max_batch for e in self.ready_engines())
        return len(self.streams) >= capacity * (1 + QUEUE_PER_SLOT)

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

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     engine: EngineHandle | None = None) -> RequestStream:
        stream = RequestStream(Request(request_id, prompt_ids, params), "")
        self.streams[request_id] = stream
        if not await self._dispatch(stream, engine or self.pick_engine()):
            self._finish(stream)
            raise NoEngineAvailable("no engine is reachable")
        return stream

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
        try:
            await self._router.send_multipart([engine_id.encode(), self._encoder.encode(message)])
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the engine's socket is gone
            log.warning("cannot reach engine %s: %s", engine_id, exc)
            return False

    # ---- engine messages ------------------------------------------------------------------

    async def _hello_loop(self) -> None:
        """Engines say hello on the ROUTER; the answer goes straight back on the same route."""
        _, decoder = engine_output_codec()
        while True:
            identity, payload = await self._router.recv_multipart()
            try:
                hello = decoder.decode(payload)
            except Exception as exc:
                log.warning("dropping undecodable hello: %s", exc)
                continue
            if not isinstance(hello, EngineHello) or hello.engine_id.encode() != identity:
                log.warning("dropping an unexpected %s on the request socket", type(hello).__name__)
                continue
            reason = self._refusal(hello)
            if reason:
                log.error("refusing engine %s: %s", hello.engine_id, reason)
                self.failures.append(reason)
            else:
                log.info("engine %s (pid %d) on %s says hello; loading", hello.engine_id, hello.pid, hello.device)
                self.engines[hello.engine_id] = EngineHandle(hello)
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
                engine.ready, engine.last_seen = True, time.monotonic()
                log.info("engine %s ready (loaded in %.1f s)", message.engine_id, message.load_seconds)
                self.engine_ready.set()
        elif isinstance(message, EngineFailed):
            self.failures.append(message.message)
            self.engine_lost(message.engine_id, message.message)

    def _note_stats(self, engine_id: str, stats: EngineStats) -> None:
        engine = self.engines.get(engine_id)
        if engine is None:
            if engine_id in self._dropped:  # it was dropped but lives on: tell it to go, not to linger
                self._dropped.discard(engine_id)
                asyncio.ensure_future(self._send(engine_id, Welcome(
                    accepted=False, reason="the frontend dropped this engine after missed heartbeats; "
                                           "restart it to attach again")))
            return
        now = time.monotonic()
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
                asyncio.ensure_future(self._redispatch(stream, f"engine {engine_id} lost: {why}"))
            else:
                self._fail(stream, f"engine {engine_id} lost: {why}")

    async def _redispatch(self, stream: RequestStream, why: str) -> None:
        for engine in sorted(self.ready_engines(), key=self.outstanding_tokens):
            if await self._dispatch(stream, engine):
                log.info("request %s moved to engine %s", stream.request_id, engine.engine_id)
                return
        self._fail(stream, why)

    def _fail(self, stream: RequestStream, why: str) -> None:
        stream.queue.put_nowait(RequestOutput(stream.request_id, [], "error", why))
        self._finish(stream)

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for engine in list(self.engines.values()):
                timeout = HEARTBEAT_TIMEOUT_S if engine.ready else LOADING_HEARTBEAT_TIMEOUT_S
                if now - engine.last_seen > timeout:
                    self._dropped.add(engine.engine_id)
                    self.engine_lost(engine.engine_id, f"no heartbeat for {now - engine.last_seen:.1f} s")
                elif engine.requests and now - engine.last_progress > PROGRESS_TIMEOUT_S:
                    self.engine_lost(engine.engine_id, f"no step finished in {now - engine.last_progress:.0f} s "
                                                       "while it held requests (hung)")
                    await self._send(engine.engine_id, Shutdown())
