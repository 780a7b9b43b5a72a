"""Reliability (issue 10): no input, client or fault wedges the server, and a lost engine comes back.

The first tests drive the frontend's EngineClient over real ZeroMQ sockets with a scripted engine
(no model), to reach failure points a client cannot reach on purpose. The rest run real servers.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from hardware.plan import ServingPlan
from ipc.engine_client import MAX_FAILED_STEPS, EngineClient, NoEngineAvailable
from ipc.messages import (
    EngineHello,
    EngineReady,
    EngineStats,
    Heartbeat,
    RequestOutput,
    SamplingParams,
    StepOutputs,
    engine_input_codec,
    engine_output_codec,
)
from ipc.stall_clock import StallFreeClock
from tests.conftest import ServerProcess, get_json, pid_alive, running_server
from tests.http_client import post_json, run, stream_events

PLAN = ServingPlan(device="cpu", dtype="float32", quantization=None, double_quant=False, offload=False,
                   device_map=None, max_batch=2, max_context=64, kv_cache_tokens=128, weights_bytes=0)
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)
POST_ROUTES = ["/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---- the engine client with a scripted engine ---------------------------------------------------


class ScriptedEngine:
    """The engine's side of the protocol, by hand: hello on a DEALER, outputs on a PUSH."""

    def __init__(self, context: zmq.asyncio.Context, folder: str, engine_id: str = "scripted"):
        self.engine_id = engine_id
        self.encoder, _ = engine_output_codec()
        _, self.decoder = engine_input_codec()
        self.dealer = context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.ROUTING_ID, engine_id.encode())
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(f"ipc://{folder}/input")
        self.output_address = f"ipc://{folder}/output"
        self.push = context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(self.output_address)
        self.stats = EngineStats()

    async def attach(self, client: EngineClient) -> None:
        await self.dealer.send(self.encoder.encode(EngineHello(engine_id=self.engine_id, pid=os.getpid(),
                                                               device="cpu", model="m", plan=PLAN)))
        await self.dealer.recv()  # the welcome
        await self.send(EngineReady(engine_id=self.engine_id, load_seconds=0.0))
        await asyncio.wait_for(client.engine_ready.wait(), 10)

    async def send(self, message) -> None:
        await self.push.send(self.encoder.encode(message))

    async def next_input(self):
        return self.decoder.decode(await asyncio.wait_for(self.dealer.recv(), 10))

    def close(self) -> None:
        self.dealer.close()
        self.push.close()


async def with_client(scenario):
    with tempfile.TemporaryDirectory(prefix="kiln-test-") as folder:
        client = EngineClient([f"ipc://{folder}/input"], [f"ipc://{folder}/output"], "m")
        await client.start()
        context = zmq.asyncio.Context()
        engine = ScriptedEngine(context, folder)
        try:
            await engine.attach(client)
            return await scenario(client, engine)
        finally:
            engine.close()
            await client.close()
            context.term()


def test_a_request_that_cannot_be_encoded_leaves_nothing_registered():
    """The lockout of issue 10: a value msgpack cannot carry failed after the stream was registered."""
    async def scenario(client, engine):
        unencodable = SamplingParams(max_new_tokens=4, top_k=2**64)
        for i in range(3):
            with pytest.raises(OverflowError):
                await client.submit(f"r{i}", [1, 2], unencodable)
        return client.streams, [e.requests for e in client.engines.values()]

    streams, engine_requests = run(with_client(scenario))
    assert streams == {} and engine_requests == [set()]


def test_a_submit_cancelled_mid_send_or_sent_to_a_vanished_engine_leaves_nothing_registered():
    async def scenario(client, engine):
        task = asyncio.ensure_future(client.submit("cancelled", [1, 2], GREEDY))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        handle = client.engines[engine.engine_id]
        engine.dealer.close()  # the route back is gone: the send fails (ROUTER_MANDATORY)
        await asyncio.sleep(0.3)
        with pytest.raises(NoEngineAvailable):
            await client.submit("unreachable", [1, 2], GREEDY, handle)
        return client.streams, handle.requests

    streams, engine_requests = run(with_client(scenario))
    assert streams == {} and engine_requests == set()


def test_an_engine_whose_steps_keep_failing_is_dropped():
    async def scenario(client, engine):
        lost = []
        client.on_engine_lost = lambda engine_id, why: lost.append(why)
        streams = []
        for i in range(MAX_FAILED_STEPS):
            streams.append(await client.submit(f"r{i}", [1, 2], GREEDY))
            await engine.next_input()
            await engine.send(StepOutputs(engine.engine_id, [RequestOutput(f"r{i}", [], "error", "boom")],
                                          engine.stats))
            await asyncio.sleep(0.1)
        outputs = [s.queue.get_nowait() for s in streams]
        return lost, outputs, list(client.engines), client.streams

    lost, outputs, engines, streams = run(with_client(scenario))
    assert engines == [] and streams == {}
    assert len(lost) == 1 and f"{MAX_FAILED_STEPS} steps in a row failed" in lost[0]
    assert all(o.finish_reason == "error" for o in outputs)


def test_a_completed_step_resets_the_failure_count():
    async def scenario(client, engine):
        for i in range(2 * MAX_FAILED_STEPS):
            await client.submit(f"r{i}", [1, 2], GREEDY)
            await engine.next_input()
            if i % (MAX_FAILED_STEPS - 1) == 0:  # a successful step now and then
                engine.stats = msgspec.structs.replace(engine.stats, steps=engine.stats.steps + 1)
                outputs = [RequestOutput(f"r{i}", [7], "length")]
            else:
                outputs = [RequestOutput(f"r{i}", [], "error", "boom")]
            await engine.send(StepOutputs(engine.engine_id, outputs, engine.stats))
            await asyncio.sleep(0.1)
        return list(client.engines)

    assert run(with_client(scenario)) == ["scripted"]


def test_a_stalled_event_loop_does_not_drop_a_live_engine():
    """The whole machine freezes (a suspended laptop, a paused VM) for longer than the heartbeat
    timeout; the engine's next heartbeat comes its usual second after it thaws. The frontend's
    own stall must not count as the engine's silence."""
    from ipc.engine_client import HEARTBEAT_TIMEOUT_S

    async def scenario(client, engine):
        frozen, done = threading.Event(), threading.Event()
        sender = asyncio.get_running_loop().run_in_executor(
            None, _heartbeats_from_a_thread, engine.output_address, engine.engine_id, frozen, done)
        try:
            await asyncio.sleep(1.0)
            frozen.set()
            time.sleep(HEARTBEAT_TIMEOUT_S + 2)  # the freeze, on the frontend's loop too
            await asyncio.sleep(1.0)  # the frontend runs again; the engine's heartbeat is due
            frozen.clear()
            await asyncio.sleep(1.5)
            return list(client.engines)
        finally:
            done.set()
            await sender

    assert run(with_client(scenario)) == ["scripted"]


def _heartbeats_from_a_thread(output_address: str, engine_id: str, frozen: threading.Event,
                              done: threading.Event) -> None:
    """An engine's output thread: a heartbeat every half second, none while frozen."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(output_address)
    encoder, _ = engine_output_codec()
    while not done.wait(0.5):
        if not frozen.is_set():
            push.send(encoder.encode(Heartbeat(engine_id, EngineStats())))
    push.close()
    context.term()


def test_stall_free_clock_leaves_out_the_stall():
    clock = StallFreeClock(tick_s=0.05, tolerance_s=0.05)
    start = clock.now()
    time.sleep(0.05)
    assert clock.tick() == 0.0
    time.sleep(0.5)  # a stall
    stalled = clock.tick()
    assert stalled >= 0.3
    assert clock.now() - start < 0.5
