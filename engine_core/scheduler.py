"""Continuous (iteration-level) batching over a shared pool of KV blocks, with prefix caching.

Each running sequence holds a block table: the pool blocks (engine_core/block_pool.py) that hold its
K/V, taken as it grows and returned when it finishes or is aborted. A request is admitted when the
pool has the blocks for its next chunk, not when a whole-context slot is free, so many short requests
share memory that one long one would have reserved. At admission the full blocks of the prompt are
looked up in the prefix index: the longest cached prefix is taken by reference and only the rest is
computed. A request whose next block is being computed right now by another sequence (ten users
sending the same system prompt at once) waits for it instead of computing it again.

Every step decodes one token for each running sequence whose tokens are all computed, and spends a
token budget (`prefill_chunk`) on prompts in arrival order, chunk by chunk, so a long prompt never
stalls the running streams for more than one chunk's compute. When the pool runs dry, the newest
running sequence is preempted: its blocks go back (full ones stay cached), and it waits at the head
of the queue to recompute prompt and output so far, then continues exactly where it stopped.

The scheduler owns request state: `schedule` says what a step computes, `update` applies what it
produced (computed positions, sampled tokens) and applies the one finish rule.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from engine_core.block_pool import BlockHash, BlockPool, hash_block
from ipc.messages import FinishReason, Request, SamplingParams, TokenLogprobs


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    blocks: list[int] = field(default_factory=list)  # block table: position p lives in blocks[p // block_size]
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_registered: int = 0  # leading blocks keyed in the prefix index (or taken from it)
    hashes: list[BlockHash] = field(default_factory=list)  # keys of the full blocks hashed so far
    output_ids: list[int] = field(default_factory=list)
    generator: object | None = None  # the sampler's per-request RNG, created lazily
    finish_reason: FinishReason | None = None
    arrived_at: float = field(default_factory=time.perf_counter)  # admitted by this engine
    scheduled_at: float | None = None  # first chunk scheduled (queue time ends, prefill begins)
    first_output_sent: bool = False  # the engine sent its first token (or its prompt's scores)
    preemptions: int = 0
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # filled chunk by chunk, when asked

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        """Everything but the newest token is computed: the next step feeds that token alone."""
        return self.num_computed == self.num_tokens - 1 and bool(self.output_ids)

    def cache_row(self, position: int, block_size: int) -> int:
        """Where `position`'s K/V live in the pool's flat view: its block × block_size + its offset."""
        return self.blocks[position // block_size] * block_size + position % block_size

    def block_table(self, positions: int, width: int, block_size: int, skip: int = 0) -> list[int]:
        """The blocks holding the first `positions` positions but the first `skip` blocks (a prefix read
        once for the batch), padded to `width` by repeating the last (a valid block the attention mask
        hides), for a rectangular table of several sequences."""
        used = self.blocks[skip : -(-positions // block_size)]
        return used + [used[-1]] * (width - len(used))

    def token_ids(self, start: int, length: int) -> list[int]:
        prompt = len(self.prompt_ids)
        if start >= prompt:
            return self.output_ids[start - prompt : start - prompt + length]
        ids = self.prompt_ids[start : start + length]
        return ids if start + length <= prompt else ids + self.output_ids[: start + length - prompt]

    def block_hashes(self, count: int, block_size: int) -> list[BlockHash]:
        """Keys of the first `count` full blocks of prompt + output, extending the chain as needed."""
        while len(self.hashes) < count:
            i = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.append(hash_block(parent, self.token_ids(i * block_size, block_size), self.cache_salt))
        return self.hashes[:count]


@dataclass(eq=False)
class ScheduledChunk:
    """`seq` computes tokens [start, start + length) this step; `sample` if the last one yields a new token."""

    seq: Sequence
    start: int
    length: int
    sample: bool

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids(self.start, self.length)

    @property
    def is_prefill(self) -> bool:
        return self.start < len(self.seq.prompt_ids)

    @property
    def scores_prompt(self) -> bool:
        """Its positions' logits are all wanted: each predicts the next prompt token (OpenAI's echo). Not
        again after a preemption once the scores were sent."""
        seq = self.seq
        return self.is_prefill and seq.params.prompt_logprobs is not None and not seq.first_output_sent


@dataclass
class CacheCounters:
    """Since the engine started: prompt tokens looked up in the prefix cache, tokens found, preemptions."""

    queries: int = 0
    hits: int = 0
    preemptions: int = 0


class Scheduler:
    def __init__(
        self,
        max_batch: int,
        prefill_chunk: int,
        max_context: int,
        eos_token_ids: set[int],
        pool: BlockPool | None = None,  # default: room for max_batch sequences of max_context, 16-token blocks
    ):
        self.pool = pool = pool or BlockPool(max_batch * math.ceil(max_context / 16), 16)
        self.block_size = pool.block_size
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_context = max_context
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.by_id: dict[str, Sequence] = {}
        self.counters = CacheCounters()
        # a little headroom kept at admission, so running sequences can grow a while before preempting
        self.watermark = max(1, pool.num_blocks // 100)

    def __len__(self) -> int:
        return len(self.by_id)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def add(self, request: Request) -> Sequence:
        seq = Sequence(request.request_id, list(request.prompt_token_ids), request.params, request.cache_salt)
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is and return its blocks; unknown ids are ignored. A sequence that
        had not finished is marked ABORT, so a step it was part of knows to drop its results."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.finish_reason is None:
            seq.finish_reason = FinishReason.ABORT
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)
        return seq

    finish = abort  # a finished sequence leaves exactly the way an aborted one does

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.num_registered = 0

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self.prefill_chunk
        i = 0
        while i < len(self.running):  # oldest first; preemption takes from the end
            seq = self.running[i]
            if seq.is_decoding:
                length = 1
            elif budget > 0:
                length = min(budget, seq.num_tokens - seq.num_computed)
            else:
                i += 1
                continue
            if not self._grow(seq, seq.num_computed + length):
                continue  # seq itself was preempted (it was the newest): running[i] is the next one now
            if not seq.is_decoding:
                budget -= length
            chunks.append(ScheduledChunk(seq, seq.num_computed, length, seq.num_computed + length == seq.num_tokens))
            i += 1
        if budget > 0:
            chunks += self._admit_waiting(budget)
        return chunks

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for `seq` to hold `tokens` positions, preempting the newest running sequences while the
        pool is dry. False if `seq` had to be preempted itself."""
        need = self.blocks_for(tokens) - len(seq.blocks)
        while need > 0:
            blocks = self.pool.allocate(need)
            if blocks is not None:
                seq.blocks += blocks
                return True
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it first, to recompute everything it has so far (prompt and
        output; its full blocks stay cached, so what the pool has not reused since costs nothing)."""
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.preemptions += 1
        if not seq.first_output_sent:
            seq.prompt_logprobs = []
        self.counters.preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        """Admit queued sequences in arrival order while the step's token budget, the batch cap and the
        pool allow; a sequence whose next block another sequence is computing right now waits for it."""
        chunks = []
        in_flight = self._blocks_in_flight()
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            hits, keys = self._cached_prefix(seq)
            if len(hits) < len(keys) and keys[len(hits)] in in_flight:
                skipped.append(self.waiting.popleft())  # its prefix is being computed: take it next step
                continue
            computed = len(hits) * self.block_size
            length = min(budget, seq.num_tokens - computed)
            need = self.blocks_for(computed + length) - len(hits)
            if self.pool.num_free - self.pool.free_among(hits) < need + (self.watermark if self.running else 0):
                break
            self.waiting.popleft()
            self.pool.take(hits)
            seq.blocks = hits + self.pool.allocate(need)
            seq.num_computed = seq.num_registered = computed
            if seq.preemptions == 0:
                self.counters.queries += len(seq.prompt_ids)
                self.counters.hits += computed
            if seq.scheduled_at is None:
                seq.scheduled_at = time.perf_counter()
            self.running.append(seq)
            in_flight.update(keys[len(hits) :])
            budget -= length
            chunks.append(ScheduledChunk(seq, computed, length, computed + length == seq.num_tokens))
        self.waiting.extendleft(reversed(skipped))
        return chunks

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[BlockHash]]:
        """(cached blocks of seq's longest cached prefix, keys of all its full blocks). At least the last
        token is always computed (its logits are the next token's), and a request that scores its prompt
        computes every position (its logprobs come from the computation)."""
        if not self.pool.caching:
            return [], []
        keys = seq.block_hashes((seq.num_tokens - 1) // self.block_size, self.block_size)
        if seq.params.prompt_logprobs is not None and not seq.first_output_sent:
            return [], keys
        return self.pool.lookup(keys), keys

    def _blocks_in_flight(self) -> set[BlockHash]:
        """Keys of the full blocks running sequences are still computing (prompts in progress)."""
        if not self.pool.caching:
            return set()
        keys: set[BlockHash] = set()
        for seq in self.running:
            if not seq.is_decoding:
                full = (seq.num_tokens - 1) // self.block_size
                keys.update(seq.block_hashes(full, self.block_size)[seq.num_computed // self.block_size :])
        return keys

    # ------------------------------------------------------------------ update

    def update(self, chunks: list[ScheduledChunk], tokens: list[int]) -> list[Sequence]:
        """Apply a step: advance each chunk's computed positions (keying the blocks it filled), append the
        token sampled for each `sample` chunk (`tokens`, in chunk order), and finish the sequences that are
        done. Chunks of requests aborted during the step are skipped. Returns the sequences that finished."""
        finished = []
        sampled = iter(tokens)
        for chunk in chunks:
            seq = chunk.seq
            token = next(sampled) if chunk.sample else None
            if seq.finish_reason is FinishReason.ABORT:
                continue
            seq.num_computed = chunk.start + chunk.length
            if token is not None and seq.params.max_new_tokens > 0:  # 0: the prompt was only scored
                seq.output_ids.append(token)
            self._register_full_blocks(seq)
            if token is None:
                continue
            seq.finish_reason = self._finish_reason(seq)
            if seq.finish_reason is not None:
                self.finish(seq.request_id)
                finished.append(seq)
        return finished

    def _register_full_blocks(self, seq: Sequence) -> None:
        if not self.pool.caching:
            return
        full = seq.num_computed // self.block_size
        if full > seq.num_registered:
            keys = seq.block_hashes(full, self.block_size)
            for i in range(seq.num_registered, full):
                self.pool.register(seq.blocks[i], keys[i])
            seq.num_registered = full

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
        """Sequences holding KV blocks."""
        return len(self.running)
