"""The engine process: an input thread, a busy loop over the scheduler and the model, an output thread.

ZeroMQ and msgspec release the GIL, so socket I/O and (de)serialization overlap the model step;
the loop itself only touches two queues. Nothing a request carries can stop the loop: a step that
raises fails the requests in it and the loop goes on. A guided request (constrained decoding) waits
outside the scheduler while its grammar compiles on a worker (engine_core/guided.py), so the loop
never waits for a compile; a grammar that fails, or takes longer than the compile timeout, fails
its own request only.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from typing import NamedTuple

import msgspec
import torch

from engine_core.block_pool import BlockPool
from engine_core.engine_io import HEARTBEAT_SECONDS, EngineIO
from engine_core.guided import GuideCompiler, PendingGuides, SequenceGuide
from engine_core.loader import torch_dtype
from engine_core.model_runner import ModelRunner
from engine_core.sampler import Sampler, token_logprobs
from engine_core.scheduler import CacheCounters, ScheduledChunk, Scheduler
from engine_core.thread_policy import ThreadTuner
from hardware.heap import release_freed_memory
from ipc.messages import (
    Abort,
    FinishReason,
    Request,
    RequestOutput,
    RequestTiming,
    SamplingParams,
    Shutdown,
    StepOutputs,
    TokenLogprobs,
)

log = logging.getLogger("kiln.engine")


class StepResult(NamedTuple):
    """What one model step produced: a token per `sample` chunk, and the logprobs asked for."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None]  # per sampled token


class Engine:
    def __init__(
        self,
        io: EngineIO,
        model,
        plan,
        eos_token_ids: set[int],
        device: torch.device,
        guides: GuideCompiler | None = None,  # None: guided requests are refused
    ):
        self.io = io
        self.plan = plan
        self.eos_token_ids = eos_token_ids
        block_size = plan.kv_block_size
        self.pool = BlockPool(max(1, plan.kv_cache_tokens // block_size), block_size, plan.prefix_caching)
        # no sequence may outgrow the pool alone (it would preempt itself for ever)
        self.max_context = min(plan.max_context, self.pool.num_blocks * block_size)
        self.scheduler = Scheduler(plan.max_batch, plan.prefill_chunk, self.max_context, eos_token_ids, self.pool)
        kv_dtype = torch_dtype(plan.kv_dtype or plan.dtype)
        self.runner = ModelRunner(
            model,
            plan.max_batch,
            self.max_context,
            device,
            kv_dtype,
            self.pool.num_blocks,
            block_size,
            cuda_graphs=plan.cuda_graphs,  # the planner's call: whole model on one GPU
            compiled_decode=plan.compile,  # CPU only: one compiled graph for decode steps
        )
        self.sampler = Sampler(device)
        self.device = device
        # CPU: the thread count each step size runs with is measured, not guessed (thread_policy.py)
        self.threads = ThreadTuner() if device.type == "cpu" else None
        self.stats = io.stats
        self.running = True
        # constrained decoding: requests whose grammar compiles, and each running guided sequence's state
        self.pending = PendingGuides(guides, wake=lambda: io.inbox.put(None)) if guides is not None else None
        self.guided: dict[str, SequenceGuide] = {}

    def warmup(self) -> None:
        """A full prefill chunk, then the whole batch at once: the planned peaks, before any user arrives
        (an out-of-memory surfaces here, at start, not mid-stream) and with allocations warmed. The dummy
        prompts leave nothing in the prefix cache."""
        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        long_prompt = [0] * max(1, min(self.plan.prefill_chunk, self.max_context - 2))
        batch = min(self.plan.max_batch, self.pool.num_blocks // 2)
        for i in range(max(1, batch)):
            self.scheduler.add(Request(f"warmup-{i}", long_prompt if i == 0 else [0] * 4, params))
        while len(self.scheduler):
            chunks = self.scheduler.schedule()
            logits = self.runner.forward(chunks)
            self.scheduler.update(chunks, logits.sample.argmax(dim=-1).tolist())
        self.pool.clear_cache()
        self.scheduler.counters = CacheCounters()
        if self.runner.graphs is not None:
            log.info(self.runner.graphs.capture_all())
        if self.runner.compiled is not None:
            log.info("loading or compiling the decode step (a first start traces it: a minute or two on a small CPU)")
            log.info(self.runner.compiled.warm())
        self.runner.cache.drop_contents()  # nothing cached survives warm-up: its pages go back to the OS
        release_freed_memory()  # the warm-up's activations (1.5B shapes: ~130 MB glibc kept after they were freed)
        self._update_stats()

    def run(self) -> None:
        while self.running:
            self._drain_inbox(block=len(self.scheduler) == 0)
            if self.pending:
                self._admit_guided()
            if not len(self.scheduler):
                continue
            chunks = self.scheduler.schedule()
            if not chunks:
                continue
            result = self._execute(chunks)
            self._drain_inbox(block=False)  # aborts that arrived mid-step win over this step's tokens
            self._publish(self._update(chunks, result) if result is not None else [])

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
                    if self.pending is not None:
                        self.pending.discard(request_id)
                    self.guided.pop(request_id, None)
                self._update_stats()
            elif isinstance(message, Shutdown):
                self.running = False
            try:
                message = self.io.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, request: Request) -> None:
        error = None
        params = request.params
        if not request.prompt_token_ids:
            error = "prompt has no tokens"
        elif len(request.prompt_token_ids) >= self.max_context:
            error = f"prompt has {len(request.prompt_token_ids)} tokens; the context window is {self.max_context}"
        elif request.request_id in self.scheduler.by_id or (self.pending and request.request_id in self.pending):
            error = f"duplicate request id {request.request_id}"
        elif params.max_new_tokens < 0 or (params.max_new_tokens == 0 and params.prompt_logprobs is None):
            error = f"max_new_tokens is {params.max_new_tokens}; 0 is only allowed when scoring the prompt"
        elif params.guide is not None and self.pending is None:
            error = "constrained decoding (guide) is not available on this engine"
        if error:
            self._publish([RequestOutput(request.request_id, [], FinishReason.REFUSED, error)])
            return
        if params.guide is not None:
            self.pending.add(request)  # scheduled once its grammar is compiled (_admit_guided)
        else:
            self.scheduler.add(request)
        self._update_stats()

    def _admit_guided(self) -> None:
        """Schedule the guided requests whose grammar is ready; fail those whose compile failed or timed out."""
        ready, failed = self.pending.poll()
        for request, guide, arrived_at in ready:
            self.scheduler.add(request).arrived_at = arrived_at  # the compile counts as queue time
            self.guided[request.request_id] = guide
        if ready or failed:
            self._publish([RequestOutput(request_id, [], FinishReason.REFUSED, error) for request_id, error in failed])

    def _execute(self, chunks: list[ScheduledChunk]) -> StepResult | None:
        """The model step and sampling; on an exception, this step's requests fail (each gets an error)
        and the loop goes on serving the rest."""
        sampled = [c.seq for c in chunks if c.sample]
        guides = [self.guided.get(s.request_id) for s in sampled] if self.guided else None
        try:
            with self.threads.timed(sum(c.length for c in chunks)) if self.threads else contextlib.nullcontext():
                logits = self.runner.forward(chunks)
                tokens = self.sampler.sample(logits.sample, sampled, self.eos_token_ids, guides) if sampled else []
                logprobs = self.sampler.logprobs(logits.sample, sampled, tokens) if sampled else []
                self._score_prompts(chunks, logits.prompt)
        except Exception as exc:
            log.exception("step failed")
            failed = []
            for chunk in chunks:
                self.guided.pop(chunk.seq.request_id, None)
                if self.scheduler.abort(chunk.seq.request_id) is not None:
                    failed.append(
                        RequestOutput(chunk.seq.request_id, [], FinishReason.ERROR, f"engine step failed: {exc}")
                    )
            self._publish(failed)
            return None
        self.stats.steps += 1
        self.stats.max_running_seen = max(self.stats.max_running_seen, len(chunks))
        return StepResult(tokens, logprobs)

    @staticmethod
    def _score_prompts(chunks: list[ScheduledChunk], prompt_logits: list) -> None:
        """Prompt logprobs, chunk by chunk: position p's logits score prompt token p + 1."""
        for chunk, logits in zip(chunks, prompt_logits):
            if logits is None:
                continue
            seq = chunk.seq
            targets = seq.prompt_ids[chunk.start + 1 : chunk.start + chunk.length + 1]
            seq.prompt_logprobs += token_logprobs(logits[: len(targets)], targets, seq.params.prompt_logprobs)

    def _update(self, chunks: list[ScheduledChunk], result: StepResult) -> list[RequestOutput]:
        """Hand the step to the scheduler, then one output per sequence that got a token or finished
        (its first also carries the engine-side timing and, when asked, the prompt's logprobs)."""
        guide_errors = self._advance_guides(chunks, result.tokens) if self.guided else {}
        self.stats.served += len(self.scheduler.update(chunks, result.tokens))
        if self.guided:
            self._finish_guided(chunks, guide_errors)
        outputs = []
        now = time.perf_counter()
        for chunk, token, logprobs in zip([c for c in chunks if c.sample], result.tokens, result.logprobs):
            seq = chunk.seq
            if seq.finish_reason is FinishReason.ABORT:
                continue  # aborted mid-step: it never emits another token
            first, seq.first_output_sent = not seq.first_output_sent, True
            error = guide_errors.get(seq.request_id) if guide_errors else None
            new = [token] if seq.params.max_new_tokens > 0 and error is None else []
            output = RequestOutput(
                seq.request_id,
                new,
                seq.finish_reason,
                error,
                logprobs=[logprobs] if logprobs is not None and new else None,
            )
            if first:
                output.timing = RequestTiming(seq.scheduled_at - seq.arrived_at, now - seq.scheduled_at)
                if seq.params.prompt_logprobs is not None:
                    output.prompt_logprobs = seq.prompt_logprobs
            outputs.append(output)
        return outputs

    def _advance_guides(self, chunks: list[ScheduledChunk], tokens: list[int]) -> dict[str, str]:
        """Each guided sequence's grammar takes its sampled token; returns {request id: error} for those the
        token left (a mask that could not be computed, which llguidance reports as an error)."""
        errors = {}
        for chunk, token in zip([c for c in chunks if c.sample], tokens):
            seq = chunk.seq
            guide = self.guided.get(seq.request_id)
            if guide is None or seq.finish_reason is FinishReason.ABORT or seq.params.max_new_tokens == 0:
                continue
            if not guide.advance(token):
                errors[seq.request_id] = f"constrained decoding failed: {guide.error or f'token {token} rejected'}"
        return errors

    def _finish_guided(self, chunks: list[ScheduledChunk], errors: dict[str, str]) -> None:
        """A guided sequence ends once its grammar is complete (STOP, as at end of sequence, whatever
        ignore_eos, min_tokens or the length limit said this step) or failed (ERROR); its state goes."""
        for chunk in chunks:
            seq = chunk.seq
            if not chunk.sample or seq.request_id not in self.guided or seq.finish_reason is FinishReason.ABORT:
                continue
            if seq.request_id in errors:
                seq.finish_reason = FinishReason.ERROR
            elif self.guided[seq.request_id].done:
                seq.finish_reason = FinishReason.STOP
            if seq.finish_reason is not None:
                del self.guided[seq.request_id]
                if self.scheduler.finish(seq.request_id) is not None:  # still running: it ends here
                    self.stats.served += 1

    def _update_stats(self) -> None:
        self.stats.running = len(self.scheduler.running)
        self.stats.waiting = len(self.scheduler.waiting) + (len(self.pending) if self.pending else 0)
        self.stats.kv_slots_used = self.scheduler.slots_used
        pool, counters = self.pool, self.scheduler.counters
        self.stats.kv_blocks_total = pool.num_blocks
        self.stats.kv_blocks_used = pool.num_used
        self.stats.kv_blocks_cached = pool.num_cached
        self.stats.prefix_cache_queries = counters.queries
        self.stats.prefix_cache_hits = counters.hits
        self.stats.preemptions = counters.preemptions
        if self.device.type == "cuda":
            self.stats.gpu_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.stats.gpu_allocated_bytes = torch.cuda.memory_allocated(self.device)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._update_stats()
        if outputs:
            self.io.send(StepOutputs(self.io.engine_id, outputs, msgspec.structs.replace(self.stats)))
