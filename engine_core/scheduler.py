"""Continuous (iteration-level) batching over a fixed pool of KV slots.

Each running sequence owns one slot: a row of the KV cache sized for the whole context window,
reserved when it is admitted and released the moment it finishes or is aborted. The lowest free
slot is taken first, so running sequences tend to sit on consecutive slots, which the decode
attention can then read in place. Memory is thus
fixed up front and a burst of requests only lengthens the waiting queue.

Every step decodes one token for each sequence whose prompt is done, and spends a token budget
(`prefill_chunk`) on prompts in arrival order, chunk by chunk, so a long prompt never stalls the
running streams for more than one chunk's compute.

The scheduler owns request state: `schedule` says what a step computes, `update` applies what it
produced (computed positions, sampled tokens) and applies the one finish rule.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from ipc.messages import FinishReason, Request, SamplingParams, TokenLogprobs


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    slot: int = -1
    num_computed: int = 0  # tokens whose K/V are in the cache
    output_ids: list[int] = field(default_factory=list)
    generator: object | None = None  # the sampler's per-request RNG, created lazily
    finish_reason: FinishReason | None = None
    arrived_at: float = field(default_factory=time.perf_counter)  # admitted by this engine
    scheduled_at: float | None = None  # first chunk scheduled (queue time ends, prefill begins)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # filled chunk by chunk, when asked

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(eq=False)
class ScheduledChunk:
    """`seq` computes tokens [start, start + length) this step; `sample` if the last one yields a new token."""

    seq: Sequence
    start: int
    length: int
    sample: bool

    @property
    def token_ids(self) -> list[int]:
        seq = self.seq
        if self.start >= len(seq.prompt_ids):
            return [seq.output_ids[self.start - len(seq.prompt_ids)]]
        return seq.prompt_ids[self.start : self.start + self.length]

    @property
    def is_prefill(self) -> bool:
        return self.start < len(self.seq.prompt_ids)

    @property
    def scores_prompt(self) -> bool:
        """Its positions' logits are all wanted: each predicts the next prompt token (OpenAI's echo)."""
        return self.is_prefill and self.seq.params.prompt_logprobs is not None


class Scheduler:
    def __init__(self, max_batch: int, prefill_chunk: int, max_context: int, eos_token_ids: set[int]):
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_context = max_context
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self.free_slots: list[int] = list(range(max_batch))  # a min-heap: the lowest free slot goes first

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, request: Request) -> Sequence:
        seq = Sequence(request.request_id, list(request.prompt_token_ids), request.params)
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is and free its slot; unknown ids are ignored. A sequence that had
        not finished is marked ABORT, so a step it was part of knows to drop its results."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.finish_reason is None:
            seq.finish_reason = FinishReason.ABORT
        if seq.slot >= 0:
            self.running.remove(seq)
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = -1
        else:
            self.waiting.remove(seq)
        return seq

    finish = abort  # a finished sequence leaves exactly the way an aborted one does

    def schedule(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self.prefill_chunk
        prefilling: list[Sequence] = []
        for seq in self.running:
            if seq.num_computed >= len(seq.prompt_ids):
                chunks.append(ScheduledChunk(seq, seq.num_computed, 1, True))
            else:
                prefilling.append(seq)
        while self.waiting and self.free_slots and budget > len(prefilling):
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            seq.scheduled_at = time.perf_counter()
            self.running.append(seq)
            prefilling.append(seq)
        for seq in prefilling:
            if budget <= 0:
                break
            length = min(budget, len(seq.prompt_ids) - seq.num_computed)
            budget -= length
            done = seq.num_computed + length == len(seq.prompt_ids)
            chunks.append(ScheduledChunk(seq, seq.num_computed, length, done))
        return chunks

    def update(self, chunks: list[ScheduledChunk], tokens: list[int]) -> list[Sequence]:
        """Apply a step: advance each chunk's computed positions, append the token sampled for each
        `sample` chunk (`tokens`, in chunk order), and finish the sequences that are done. Chunks of
        requests aborted during the step are skipped. Returns the sequences that finished."""
        finished = []
        sampled = iter(tokens)
        for chunk in chunks:
            seq = chunk.seq
            token = next(sampled) if chunk.sample else None
            if seq.finish_reason is FinishReason.ABORT:
                continue
            seq.num_computed = chunk.start + chunk.length
            if token is None:
                continue
            if seq.params.max_new_tokens > 0:  # 0: the prompt was only scored
                seq.output_ids.append(token)
            seq.finish_reason = self._finish_reason(seq)
            if seq.finish_reason is not None:
                self.finish(seq.request_id)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        """The one finish rule: end of sequence (unless ignored or before min_tokens), then length."""
        out = seq.output_ids
        if out and out[-1] in self.eos_token_ids and not seq.params.ignore_eos and len(out) > seq.params.min_tokens:
            return FinishReason.STOP
        if len(out) >= seq.params.max_new_tokens or seq.num_tokens >= self.max_context:
            return FinishReason.LENGTH
        return None

    @property
    def slots_used(self) -> int:
        return self.max_batch - len(self.free_slots)
