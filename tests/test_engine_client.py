"""The frontend's EngineClient (frontend/router.py) in-process: routing, redispatch, liveness, admission.

It runs over real ZeroMQ sockets against scripted engines: the engine's side of the protocol by
hand (hello on a DEALER, outputs on a PUSH), no model. That reaches failure points a client cannot
reach on purpose, in well under a second per scenario. Timeouts are the client's constructor
arguments, shortened here; waits poll with generous deadlines and nothing asserts wall-clock time.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from frontend.router import MAX_FAILED_STEPS, EngineClient, NoEngineAvailable
from frontend.stall_clock import StallFreeClock
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
    engine_input_codec,
    engine_output_codec,
)
from planning.plan import ServingPlan
from tests.http_client import run

PLAN = ServingPlan(
    device="cpu",
    dtype="float32",
    quantization=None,
    double_quant=False,
    offload=False,
    device_map=None,
    max_batch=2,
    max_context=64,
    kv_cache_tokens=128,
    weights_bytes=0,
)
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)
DEADLINE_S = 10.0  # for anything that should happen within a second; generous for a loaded machine
SHORT = {"heartbeat_timeout_s": 0.5, "progress_timeout_s": 0.5, "liveness_tick_s": 0.1}  # liveness tests


# ---- the harness: scripted engines around a real client ------------------------------------------


class ScriptedEngine:
    """The engine's side of the protocol, by hand: hello on a DEALER, outputs on a PUSH."""

    def __init__(
        self, context: zmq.asyncio.Context, folder: str, engine_id: str = "scripted", plan: ServingPlan = PLAN
    ):
        self.engine_id = engine_id
        self.plan = plan
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
        self.beating = False  # heartbeats every 0.05 s while set (the harness starts them)
        self._beats: asyncio.Task | None = None

    async def attach(self, client: EngineClient) -> None:
        await self.dealer.send(
            self.encoder.encode(
                EngineHello(engine_id=self.engine_id, pid=os.getpid(), device="cpu", model="m", plan=self.plan)
            )
        )
        await self.dealer.recv()  # the welcome
        await self.send(EngineReady(engine_id=self.engine_id, load_seconds=0.0))
        await until(
            lambda: self.engine_id in client.engines and client.engines[self.engine_id].ready,
            f"engine {self.engine_id} ready",
        )

    async def send(self, message) -> None:
        await self.push.send(self.encoder.encode(message))

    async def next_input(self):
        return self.decoder.decode(await asyncio.wait_for(self.dealer.recv(), DEADLINE_S))

    async def has_input(self, within_s: float = 0.3) -> bool:
        return bool(await self.dealer.poll(within_s * 1000))

    async def step(self, *outputs: RequestOutput, served: int = 0) -> None:
        """One completed engine step carrying these outputs."""
        self.stats = msgspec.structs.replace(self.stats, steps=self.stats.steps + 1, served=self.stats.served + served)
        await self.send(StepOutputs(self.engine_id, list(outputs), self.stats))

    def start_heartbeats(self) -> None:
        self.beating = True
        self._beats = asyncio.ensure_future(self._heartbeats())

    async def _heartbeats(self) -> None:
        while True:
            if self.beating:
                await self.send(Heartbeat(self.engine_id, self.stats))
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            await asyncio.gather(self._beats, return_exceptions=True)
        self.dealer.close()
        self.push.close()


async def until(condition, what: str, timeout: float = DEADLINE_S):
    """Poll `condition` on the event loop until it is truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def with_client(scenario, engines: int = 1, heartbeats: bool = False, plan: ServingPlan = PLAN, **client_options):
    """Run scenario(client, *engines) with a started client and `engines` attached scripted engines
    (named "scripted", or "a", "b", ... when there are several), each with `plan`."""
    with tempfile.TemporaryDirectory(prefix="kiln-test-") as folder:
        client = EngineClient([f"ipc://{folder}/input"], [f"ipc://{folder}/output"], "m", **client_options)
        await client.start()
        context = zmq.asyncio.Context()
        names = ["scripted"] if engines == 1 else [chr(ord("a") + i) for i in range(engines)]
        scripted = [ScriptedEngine(context, folder, name, plan) for name in names]
        try:
            for engine in scripted:
                if heartbeats:
                    engine.start_heartbeats()
                await engine.attach(client)
            return await scenario(client, *scripted)
        finally:
            for engine in scripted:
                await engine.close()
            await client.close()
            context.term()


async def next_output(stream) -> RequestOutput:
    return await asyncio.wait_for(stream.queue.get(), DEADLINE_S)


# ---- registration and admission ---------------------------------------------------------------


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


def test_admission_counts_queued_tokens_as_well_as_requests():
    """PLAN: 2 slots of 64 tokens (128 KV tokens). 18 requests would pass the request count, but
    requests of 62 tokens of work each fill 3 × 128 tokens after 7."""

    async def scenario(client, engine):
        admitted = 0
        while not client.overloaded() and admitted < 20:
            await client.submit(f"r{admitted}", [1, 2], SamplingParams(max_new_tokens=60))
            admitted += 1
        for i in range(admitted):
            await client.abort(f"r{i}")
        return admitted, client.overloaded()

    admitted, still_overloaded = run(with_client(scenario))
    assert admitted == 7 and not still_overloaded


async def _admitted(client, prompt: list[int], params: SamplingParams, most: int) -> int:
    """How many such requests the client takes before it says overloaded (at most `most`); all aborted after."""
    admitted = 0
    while not client.overloaded() and admitted < most:
        await client.submit(f"r{admitted}", prompt, params)
        admitted += 1
    for i in range(admitted):
        await client.abort(f"r{i}")
    return admitted


def test_admission_allows_eight_waiting_requests_per_place_in_the_running_batch():
    """max_batch 2 and a pool too big for the token rule to matter: 2 running + 16 waiting."""
    roomy = msgspec.structs.replace(PLAN, kv_cache_tokens=1_000_000)

    async def scenario(client, engine):
        return await _admitted(client, [1, 2], SamplingParams(max_new_tokens=16), most=40)

    assert run(with_client(scenario, plan=roomy)) == 18


def test_a_budget_counts_up_to_one_sequences_share_of_the_pool():
    """A request with no limit of its own has a budget up to the context window, which with a paged pool
    can be the whole pool: it counts as one sequence's share (PLAN: 128 tokens / 2 = 64), so 2 + 64 tokens
    each, and 3 × 128 tokens of work are reached after 6 requests, not after the first."""

    async def scenario(client, engine):
        return await _admitted(client, [1, 2], SamplingParams(max_new_tokens=1 << 30), most=20)

    assert run(with_client(scenario)) == 6


def test_a_64_user_benchmark_on_a_default_cpu_plan_is_not_refused():
    """64 users × 2 requests of short prompts and 128 tokens, all open at once, against a plan of the
    default CPU shape (a running batch of 64, a pool of 131072 tokens): no 429 (issue 21's acceptance)."""
    cpu = msgspec.structs.replace(PLAN, max_batch=64, max_context=8192, kv_cache_tokens=131072)

    async def scenario(client, engine):
        return await _admitted(client, list(range(40)), SamplingParams(max_new_tokens=128), most=128)

    assert run(with_client(scenario, plan=cpu)) == 128


def test_the_cache_salt_travels_with_the_request():
    async def scenario(client, engine):
        await client.submit("salted", [1, 2], GREEDY, cache_salt="tenant-a")
        await client.submit("plain", [1, 2], GREEDY)
        return await engine.next_input(), await engine.next_input()

    salted, plain = run(with_client(scenario))
    assert (salted.request_id, salted.cache_salt) == ("salted", "tenant-a")
    assert (plain.request_id, plain.cache_salt) == ("plain", None)


def test_an_aborted_request_is_aborted_in_its_engine_and_its_late_outputs_are_dropped():
    async def scenario(client, engine):
        stream = await client.submit("r", [1, 2], GREEDY)
        assert isinstance(await engine.next_input(), Request)
        await client.abort("r")
        abort = await engine.next_input()
        await engine.step(RequestOutput("r", [5]))  # already on its way when the abort left
        await asyncio.sleep(0.2)
        return abort, stream.queue.qsize(), client.streams, client.engines[engine.engine_id].requests

    abort, queued, streams, held = run(with_client(scenario))
    assert abort == Abort(["r"]) and queued == 0 and streams == {} and held == set()


# ---- routing ------------------------------------------------------------------------------------


def test_the_engine_with_the_least_outstanding_tokens_is_picked():
    """Outstanding work = unprocessed prompt + remaining budget of the requests an engine holds;
    once a request has tokens, only its remaining budget counts."""

    async def scenario(client, a, b):
        picks = []
        await client.submit(
            "big", list(range(20)), SamplingParams(max_new_tokens=4), client.engines["a"]
        )  # 24 tokens of work
        await client.submit("small", [1, 2], SamplingParams(max_new_tokens=10), client.engines["b"])  # 12
        picks.append(
            (
                client.pick_engine().engine_id,
                client.outstanding_tokens(client.engines["a"]),
                client.outstanding_tokens(client.engines["b"]),
            )
        )
        await a.next_input()
        await a.step(RequestOutput("big", [7]))  # the prompt is done: 3 tokens of budget left
        await until(lambda: client.streams["big"].tokens_received == 1, "the token to arrive")
        picks.append(
            (
                client.pick_engine().engine_id,
                client.outstanding_tokens(client.engines["a"]),
                client.outstanding_tokens(client.engines["b"]),
            )
        )
        return picks

    assert run(with_client(scenario, engines=2)) == [("b", 24, 12), ("a", 3, 12)]


def test_ties_go_to_the_engine_that_has_served_least_so_sequential_requests_alternate():
    async def scenario(client, a, b):
        scripted = {"a": a, "b": b}
        served_by = []
        for i in range(4):
            stream = await client.submit(f"r{i}", [1, 2], GREEDY)  # no engine named: the client picks
            engine = scripted[stream.engine_id]
            request = await engine.next_input()
            assert request.request_id == f"r{i}"
            await engine.step(RequestOutput(f"r{i}", [7, 8, 9, 10], FinishReason.LENGTH), served=1)
            assert (await next_output(stream)).finish_reason == FinishReason.LENGTH
            served_by.append(stream.engine_id)
        return served_by

    served_by = run(with_client(scenario, engines=2))
    assert served_by in (["a", "b", "a", "b"], ["b", "a", "b", "a"]), served_by


def test_no_ready_engine_raises_no_engine_available():
    async def scenario(client, engine):
        await engine.send(EngineFailed(engine_id=engine.engine_id, message="out of memory"))
        await until(lambda: not client.engines, "the failed engine to be dropped")
        with pytest.raises(NoEngineAvailable):
            client.pick_engine()
        return list(client.failures)

    assert run(with_client(scenario)) == ["out of memory"]


# ---- redispatch -----------------------------------------------------------------------------------


def test_a_request_with_no_token_yet_moves_off_a_lost_engine_and_completes():
    async def scenario(client, a, b):
        lost = []
        client.on_engine_lost = lambda engine_id, why, was_ready: lost.append((engine_id, was_ready))
        stream = await client.submit("r", [1, 2, 3], GREEDY, client.engines["a"])
        assert (await a.next_input()).request_id == "r"
        await a.send(EngineFailed(engine_id="a", message="device lost"))  # no token was produced for it
        moved = await b.next_input()
        await b.step(RequestOutput("r", [4, 5]))
        await b.step(RequestOutput("r", [6, 7], FinishReason.LENGTH), served=1)
        outputs = [await next_output(stream), await next_output(stream)]
        return lost, moved, stream.engine_id, outputs, list(client.engines), client.streams

    lost, moved, engine_id, outputs, engines, streams = run(with_client(scenario, engines=2))
    assert lost == [("a", True)] and engines == ["b"] and streams == {}
    assert isinstance(moved, Request) and moved.request_id == "r" and moved.prompt_token_ids == [1, 2, 3]
    assert engine_id == "b"
    assert [o.new_token_ids for o in outputs] == [[4, 5], [6, 7]]
    assert outputs[-1].finish_reason == FinishReason.LENGTH


def test_a_request_with_tokens_on_a_lost_engine_ends_with_an_explicit_error():
    """Its text so far was already sent to the client, so it cannot start over elsewhere."""

    async def scenario(client, a, b):
        stream = await client.submit("r", [1, 2], GREEDY, client.engines["a"])
        await a.next_input()
        await a.step(RequestOutput("r", [4]))
        first = await next_output(stream)
        await a.send(EngineFailed(engine_id="a", message="device lost"))
        last = await next_output(stream)
        return first, last, await b.has_input(), client.streams, client.engines["b"].requests

    first, last, b_got_input, streams, b_requests = run(with_client(scenario, engines=2))
    assert first.new_token_ids == [4]
    assert last.finish_reason == FinishReason.ERROR and "engine a lost: device lost" in last.error
    assert not b_got_input and streams == {} and b_requests == set()


def test_a_request_on_the_only_engine_ends_with_an_error_when_it_is_lost():
    async def scenario(client, engine):
        stream = await client.submit("r", [1, 2], GREEDY)
        await engine.next_input()
        client.engine_lost(engine.engine_id, "process 123 exited with code -9")  # as the supervisor says it
        return await next_output(stream), client.streams, client.engine_ready.is_set()

    output, streams, ready = run(with_client(scenario))
    assert output.finish_reason == FinishReason.ERROR and "exited with code -9" in output.error
    assert streams == {} and not ready


# ---- liveness -------------------------------------------------------------------------------------


def test_an_engine_that_stops_heartbeating_is_dropped_and_its_request_moves():
    async def scenario(client, a, b):
        lost = []
        client.on_engine_lost = lambda engine_id, why, was_ready: lost.append((engine_id, why))
        stream = await client.submit("r", [1, 2], GREEDY, client.engines["a"])
        await a.next_input()
        a.beating = False  # alive as a process, silent on the wire
        await until(lambda: "a" not in client.engines, "the silent engine to be dropped")
        moved = await b.next_input()
        await b.step(RequestOutput("r", [4, 5, 6, 7], FinishReason.LENGTH), served=1)
        return lost, moved.request_id, (await next_output(stream)).finish_reason, list(client.engines)

    lost, moved, finish, engines = run(with_client(scenario, engines=2, heartbeats=True, **SHORT))
    assert [engine_id for engine_id, _ in lost] == ["a"] and "no heartbeat" in lost[0][1]
    assert moved == "r" and finish == FinishReason.LENGTH and engines == ["b"]


def test_an_engine_that_heartbeats_but_never_finishes_a_step_is_dropped_as_hung():
    """vLLM cannot tell an engine that is alive but hung; the progress check can: it holds a
    request, heart-beats, and its step count never moves."""

    async def scenario(client, a, b):
        lost = []
        client.on_engine_lost = lambda engine_id, why, was_ready: lost.append((engine_id, why))
        stream = await client.submit("r", [1, 2], GREEDY, client.engines["a"])
        await a.next_input()
        await until(lambda: "a" not in client.engines, "the hung engine to be dropped")
        told = await a.next_input()
        await b.next_input()
        await b.step(RequestOutput("r", [4, 5, 6, 7], FinishReason.LENGTH), served=1)
        return lost, told, (await next_output(stream)).finish_reason

    lost, told, finish = run(with_client(scenario, engines=2, heartbeats=True, **SHORT))
    assert [engine_id for engine_id, _ in lost] == ["a"] and "hung" in lost[0][1]
    assert told == Shutdown() and finish == FinishReason.LENGTH


def test_an_idle_engine_that_heartbeats_is_kept():
    """The progress check applies only while an engine holds requests."""

    async def scenario(client, engine):
        await asyncio.sleep(4 * SHORT["progress_timeout_s"])
        return list(client.engines)

    assert run(with_client(scenario, heartbeats=True, **SHORT)) == ["scripted"]


def test_a_dropped_engine_that_speaks_again_is_told_to_go():
    async def scenario(client, engine):
        engine.beating = False
        await until(lambda: not client.engines, "the silent engine to be dropped")
        engine.beating = True  # it was only slow: it speaks again
        told = await engine.next_input()
        await asyncio.sleep(0.3)  # more heartbeats: it stays out, and is told only once
        return told, list(client.engines), await engine.has_input()

    told, engines, told_again = run(with_client(scenario, heartbeats=True, **SHORT))
    assert isinstance(told, Welcome) and not told.accepted and "dropped" in told.reason
    assert engines == [] and not told_again


def test_an_engine_whose_steps_keep_failing_is_dropped():
    async def scenario(client, engine):
        lost = []
        client.on_engine_lost = lambda engine_id, why, was_ready: lost.append(why)
        streams = []
        for i in range(MAX_FAILED_STEPS):
            streams.append(await client.submit(f"r{i}", [1, 2], GREEDY))
            await engine.next_input()
            await engine.send(
                StepOutputs(engine.engine_id, [RequestOutput(f"r{i}", [], FinishReason.ERROR, "boom")], engine.stats)
            )
            await asyncio.sleep(0.1)
        outputs = [s.queue.get_nowait() for s in streams]
        return lost, outputs, list(client.engines), client.streams

    lost, outputs, engines, streams = run(with_client(scenario))
    assert engines == [] and streams == {}
    assert len(lost) == 1 and f"{MAX_FAILED_STEPS} steps in a row failed" in lost[0]
    assert all(o.finish_reason == FinishReason.ERROR for o in outputs)


def test_a_completed_step_resets_the_failure_count():
    async def scenario(client, engine):
        for i in range(2 * MAX_FAILED_STEPS):
            await client.submit(f"r{i}", [1, 2], GREEDY)
            await engine.next_input()
            if i % (MAX_FAILED_STEPS - 1) == 0:  # a successful step now and then
                engine.stats = msgspec.structs.replace(engine.stats, steps=engine.stats.steps + 1)
                outputs = [RequestOutput(f"r{i}", [7], "length")]
            else:
                outputs = [RequestOutput(f"r{i}", [], FinishReason.ERROR, "boom")]
            await engine.send(StepOutputs(engine.engine_id, outputs, engine.stats))
            await asyncio.sleep(0.1)
        return list(client.engines)

    assert run(with_client(scenario)) == ["scripted"]


def test_a_stalled_event_loop_does_not_drop_a_live_engine():
    """The whole machine freezes (a suspended laptop, a paused VM) for longer than the heartbeat
    timeout; the engine's next heartbeat comes soon after it thaws. The frontend's own stall must
    not count as the engine's silence. (Timeouts shortened: 1.5 s heartbeat timeout, a 2.5 s freeze.)"""
    timeout_s = 1.5

    async def scenario(client, engine):
        frozen, done = threading.Event(), threading.Event()
        sender = asyncio.get_running_loop().run_in_executor(
            None, _heartbeats_from_a_thread, engine.output_address, engine.engine_id, frozen, done
        )
        try:
            await asyncio.sleep(0.5)
            frozen.set()
            time.sleep(timeout_s + 1.0)  # the freeze, on the frontend's loop too
            await asyncio.sleep(0.2)  # the frontend runs again; the engine's heartbeat is due
            frozen.clear()
            await asyncio.sleep(1.0)
            return list(client.engines)
        finally:
            done.set()
            await sender

    assert run(with_client(scenario, heartbeat_timeout_s=timeout_s, liveness_tick_s=0.2)) == ["scripted"]


def _heartbeats_from_a_thread(
    output_address: str, engine_id: str, frozen: threading.Event, done: threading.Event
) -> None:
    """An engine's output thread: a heartbeat every 0.2 s, none while frozen."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(output_address)
    encoder, _ = engine_output_codec()
    while not done.wait(0.2):
        if not frozen.is_set():
            push.send(encoder.encode(Heartbeat(engine_id, EngineStats())))
    push.close()
    context.term()


def test_stall_free_clock_leaves_out_the_stall():
    clock = StallFreeClock(tick_s=0.05, tolerance_s=0.2)  # tolerance: room for a loaded machine's jitter
    start = clock.now()
    time.sleep(0.05)
    assert clock.tick() == 0.0
    time.sleep(0.8)  # a stall
    stalled = clock.tick()
    assert stalled >= 0.5
    assert clock.now() - start < 0.5
