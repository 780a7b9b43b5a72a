"""The engine process: an input thread, a busy loop over the scheduler and the model, an output thread.

ZeroMQ and msgspec release the GIL, so socket I/O and (de)serialization overlap the model step;
the loop itself only touches two queues. Nothing a request carries can stop the loop: a step that
raises fails the requests in it and the loop goes on.
"""
from __future__ import annotations

import contextlib
import logging
import queue

import msgspec
import torch

from engine_core.loader import torch_dtype
from engine_core.model_runner import ModelRunner
from engine_core.sampler import Sampler
from engine_core.scheduler import ScheduledChunk, Scheduler
from engine_core.thread_policy import ThreadTuner
from engine_core.engine_io import HEARTBEAT_SECONDS, EngineIO
from ipc.messages import Abort, FinishReason, Request, RequestOutput, SamplingParams, Shutdown, StepOutputs

log = logging.getLogger("kiln.engine")


class Engine:
    def __init__(self, io: EngineIO, model, plan, eos_token_ids: set[int], device: torch.device):
        self.io = io
        self.plan = plan
        self.eos_token_ids = eos_token_ids
        self.scheduler = Scheduler(plan.max_batch, plan.prefill_chunk)
        kv_dtype = torch_dtype(plan.kv_dtype or plan.dtype)
        self.runner = ModelRunner(model, plan.max_batch, plan.max_context, device, kv_dtype,
                                  cuda_graphs=plan.cuda_graphs)  # the planner's call: whole model on one GPU
        self.sampler = Sampler(device)
        self.device = device
        # CPU: the thread count each step size runs with is measured, not guessed (thread_policy.py)
        self.threads = ThreadTuner() if device.type == "cpu" else None
        self.stats = io.stats
        self.running = True

    def warmup(self) -> None:
        """A full prefill chunk, then every slot at once: the planned peaks, before any user arrives
        (an out-of-memory surfaces here, at start, not mid-stream) and with allocations warmed."""
        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        long_prompt = [0] * max(1, min(self.plan.prefill_chunk, self.plan.max_context - 2))
        for i in range(self.plan.max_batch):
            self.scheduler.add(Request(f"warmup-{i}", long_prompt if i == 0 else [0] * 4, params))
        while len(self.scheduler):
            chunks = self.scheduler.schedule()
            self.runner.forward(chunks)
            for chunk in chunks:
                if chunk.sample:
                    self.scheduler.finish(chunk.seq.request_id)
                else:
                    chunk.seq.num_computed += chunk.length
        if self.runner.graphs is not None:
            log.info(self.runner.graphs.capture_all())
        self._update_stats()

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
            self._publish([RequestOutput(request.request_id, [], FinishReason.ERROR, error)])
            return
        self.scheduler.add(request)
        self._update_stats()

    def _step(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        sampled = [c.seq for c in chunks if c.sample]
        try:
            with self.threads.timed(sum(c.length for c in chunks)) if self.threads else contextlib.nullcontext():
                logits = self.runner.forward(chunks)
                tokens = self.sampler.sample(logits, sampled) if sampled else []
        except Exception as exc:  # fail this step's requests, keep serving the rest
            log.exception("step failed")
            failed = []
            for chunk in chunks:
                self.scheduler.abort(chunk.seq.request_id)
                failed.append(RequestOutput(chunk.seq.request_id, [], FinishReason.ERROR, f"engine step failed: {exc}"))
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
                finish = FinishReason.STOP
            elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= self.plan.max_context:
                finish = FinishReason.LENGTH
            if finish:
                self.scheduler.finish(seq.request_id)
                self.stats.served += 1
            outputs.append(RequestOutput(seq.request_id, [token], finish))
        return outputs

    def _update_stats(self) -> None:
        self.stats.running = len(self.scheduler.running)
        self.stats.waiting = len(self.scheduler.waiting)
        self.stats.kv_slots_used = self.scheduler.slots_used
        if self.device.type == "cuda":
            self.stats.gpu_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.stats.gpu_allocated_bytes = torch.cuda.memory_allocated(self.device)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._update_stats()
        if outputs:
            self.io.send(StepOutputs(self.io.engine_id, outputs, msgspec.structs.replace(self.stats)))
