"""The engine process: an input thread, a busy loop over the scheduler and the model, an output thread.

ZeroMQ and msgspec release the GIL, so socket I/O and (de)serialization overlap the model step;
the loop itself only touches two queues. Nothing a request carries can stop the loop: a step that
raises fails the requests in it and the loop goes on.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time

import msgspec
import torch
import zmq

from engine_core.model_runner import ModelRunner
from engine_core.sampler import Sampler
from engine_core.scheduler import ScheduledChunk, Scheduler
from ipc.messages import (
    Abort,
    EngineFailed,
    EngineHello,
    EngineReady,
    EngineStats,
    Heartbeat,
    Request,
    RequestOutput,
    Shutdown,
    StepOutputs,
    engine_input_codec,
    engine_output_codec,
)

log = logging.getLogger("kiln.engine")

HEARTBEAT_SECONDS = 1.0


class EngineIO:
    """The two socket threads. `send` is safe from any thread; `inbox` receives decoded inputs."""

    def __init__(self, engine_id: str, input_address: str, output_address: str, parent_pid: int | None):
        self.engine_id = engine_id
        self.input_address = input_address
        self.output_address = output_address
        self.parent_pid = parent_pid
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.stats = EngineStats()
        self.context = zmq.Context()
        self.stopped = threading.Event()

    def start_output(self) -> None:
        threading.Thread(target=self._fatal_on_error, args=(self._output_loop,), name="engine-output",
                         daemon=True).start()

    def start_input(self) -> None:
        threading.Thread(target=self._fatal_on_error, args=(self._input_loop,), name="engine-input",
                         daemon=True).start()

    @staticmethod
    def _fatal_on_error(loop) -> None:
        """An engine that cannot talk is useless: die loudly so the frontend notices at once."""
        try:
            loop()
        except Exception:
            log.exception("%s crashed; engine exits", threading.current_thread().name)
            os._exit(70)

    def close(self, timeout: float = 2.0) -> None:
        """Let queued outputs go out, then stop both threads."""
        deadline = time.monotonic() + timeout
        while not self.outbox.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stopped.set()

    def send(self, message) -> None:
        self.outbox.put(message)

    def _output_loop(self) -> None:
        encoder, _ = engine_output_codec()
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(self.output_address)
        last_sent = 0.0
        while not self.stopped.is_set():
            try:
                message = self.outbox.get(timeout=HEARTBEAT_SECONDS / 2)
            except queue.Empty:
                message = None
            if message is None:
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.error("frontend process %d is gone; engine exits", self.parent_pid)
                    os._exit(1)
                if time.monotonic() - last_sent < HEARTBEAT_SECONDS:
                    continue
                message = Heartbeat(self.engine_id, self.stats)
            sock.send(encoder.encode(message), copy=False)
            last_sent = time.monotonic()
        sock.close()

    def _input_loop(self) -> None:
        _, decoder = engine_input_codec()
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.engine_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.input_address)
        while not self.stopped.is_set():
            frame = sock.recv(copy=False)
            try:
                self.inbox.put(decoder.decode(frame.buffer))
            except Exception as exc:  # a malformed frame must not kill the engine
                log.warning("dropping undecodable input message: %s", exc)


class Engine:
    def __init__(self, io: EngineIO, model, plan, eos_token_ids: set[int], device: torch.device):
        self.io = io
        self.plan = plan
        self.eos_token_ids = eos_token_ids
        self.scheduler = Scheduler(plan.max_batch, plan.max_context, plan.prefill_chunk)
        self.runner = ModelRunner(model, plan.max_batch, plan.max_context, device,
                                  kv_dtype=next(p.dtype for p in model.parameters() if p.is_floating_point()))
        self.sampler = Sampler(device)
        self.stats = io.stats
        self.running = True

    def warmup(self) -> None:
        """One full-batch step at the planned maximum so the first user does not pay for allocation."""
        from ipc.messages import SamplingParams

        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        prompt = [0] * min(self.plan.prefill_chunk // max(1, self.plan.max_batch), 8) or [0]
        for i in range(self.plan.max_batch):
            self.scheduler.add(Request(f"warmup-{i}", prompt, params))
        while len(self.scheduler):
            chunks = self.scheduler.schedule()
            self.runner.forward(chunks)
            for chunk in chunks:
                if chunk.sample:
                    self.scheduler.finish(chunk.seq.request_id)
                else:
                    chunk.seq.num_computed += chunk.length

    def run(self) -> None:
        while self.running:
            self._drain_inbox(block=len(self.scheduler) == 0)
            if not len(self.scheduler):
                continue
            chunks = self.scheduler.schedule()
            if not chunks:
                continue
            outputs = self._step(chunks)
            self._drain_inbox(block=False)  # aborts that arrived mid-step win over this step's tokens
            outputs = [o for o in outputs if o.finish_reason is not None or o.request_id in self.scheduler.by_id]
            self._publish(outputs)

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self.io.inbox.get(timeout=HEARTBEAT_SECONDS) if block else self.io.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(message, Request):
                self._admit(message)
            elif isinstance(message, Abort):
                for request_id in message.request_ids:
                    self.scheduler.abort(request_id)
                self._update_stats()
            elif isinstance(message, Shutdown):
                self.running = False
            try:
                message = self.io.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, request: Request) -> None:
        error = None
        if not request.prompt_token_ids:
            error = "prompt has no tokens"
        elif len(request.prompt_token_ids) >= self.plan.max_context:
            error = f"prompt has {len(request.prompt_token_ids)} tokens; the context window is {self.plan.max_context}"
        elif request.request_id in self.scheduler.by_id:
            error = f"duplicate request id {request.request_id}"
        if error:
            self._publish([RequestOutput(request.request_id, [], "error", error)])
            return
        self.scheduler.add(request)
        self._update_stats()

    def _step(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        sampled = [c.seq for c in chunks if c.sample]
        try:
            logits = self.runner.forward(chunks)
            tokens = self.sampler.sample(logits, sampled) if sampled else []
        except Exception as exc:  # fail this step's requests, keep serving the rest
            log.exception("step failed")
            failed = []
            for chunk in chunks:
                self.scheduler.abort(chunk.seq.request_id)
                failed.append(RequestOutput(chunk.seq.request_id, [], "error", f"engine step failed: {exc}"))
            return failed
        self.stats.steps += 1
        self.stats.max_running_seen = max(self.stats.max_running_seen, len(chunks))
        outputs = []
        sampled_iter = iter(tokens)
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed = chunk.start + chunk.length
            if not chunk.sample:
                continue
            token = next(sampled_iter)
            seq.output_ids.append(token)
            finish = None
            if token in self.eos_token_ids and not seq.params.ignore_eos:
                finish = "stop"
            elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= self.plan.max_context:
                finish = "length"
            if finish:
                self.scheduler.finish(seq.request_id)
                self.stats.served += 1
            outputs.append(RequestOutput(seq.request_id, [token], finish))
        return outputs

    def _update_stats(self) -> None:
        self.stats.running = len(self.scheduler.running)
        self.stats.waiting = len(self.scheduler.waiting)
        self.stats.kv_slots_used = self.scheduler.slots_used

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._update_stats()
        if outputs:
            self.io.send(StepOutputs(self.io.engine_id, outputs, msgspec.structs.replace(self.stats)))


def announce(io: EngineIO, device: str, model_name: str, plan) -> None:
    io.send(EngineHello(engine_id=io.engine_id, pid=os.getpid(), device=device, model=model_name, plan=plan))


def ready(io: EngineIO, load_seconds: float) -> None:
    io.send(EngineReady(engine_id=io.engine_id, load_seconds=load_seconds))


def failed(io: EngineIO, message: str) -> None:
    io.send(EngineFailed(engine_id=io.engine_id, message=message))
