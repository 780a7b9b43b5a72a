"""One forward pass over a mixed batch of prompt chunks and decode tokens, through the model itself.

The HF model runs its own modules however they were loaded (16-bit, bitsandbytes NF4, accelerate
offload, whose hooks fire by themselves); attention is kiln's (engine_core/attention.py), over a
paged pool of KV blocks allocated once (engine_core/kv_cache.py); the scheduler says which blocks each
sequence holds. On a GPU, decode-only steps replay CUDA graphs captured per (batch bucket, key-span
bucket) over static block-table tensors: one launch instead of hundreds of kernels, no host sync inside.
On a CPU with compile on, they run one torch.compile'd graph of the whole model (compiled_decode.py).
"""

from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple

import torch
from torch import nn

from engine_core import attention
from engine_core.attention import DecodeLayout, PrefillChunk, StepContext
from engine_core.compiled_decode import CompiledDecode, is_decode_only
from engine_core.kv_cache import KVCache
from engine_core.scheduler import ScheduledChunk, Sequence

log = logging.getLogger("kiln.engine")

MIN_SPAN = 128  # smallest key span a decode graph attends over; spans double up to the context
# A prefix every decode row shares is read once for the batch when that saves at least this many key reads
# per layer (the prefix's tokens × the other rows): below it the extra kernel and the merge cost more
# than the copies they save (at 10 rows × 128 shared tokens they about break even on a 2-core CPU).
SHARED_PREFIX_MIN_SAVED = 4096


class UnsupportedModel(Exception):
    pass


class StepLogits(NamedTuple):
    """A step's float32 logits: one row per `sample` chunk, in order; and per chunk that scores its
    prompt (`scores_prompt`), the rows of all its positions (else None)."""

    sample: torch.Tensor
    prompt: list[torch.Tensor | None]


def _text_config(config):
    return getattr(config, "text_config", None) or config


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        max_batch: int,
        max_context: int,
        device: torch.device,
        kv_dtype,
        num_blocks: int | None = None,  # default: room for max_batch sequences of max_context tokens
        block_size: int = 16,
        cuda_graphs: bool = False,
        compiled_decode: bool = False,
    ):
        from model.shape import unsupported_architecture

        if (reason := unsupported_architecture(getattr(model.config, "model_type", None))) is not None:
            raise UnsupportedModel(reason)
        config = _text_config(model.config)
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise UnsupportedModel(f"{type(model).__name__}: no decoder layers at model.model.layers")
        attention.register()
        model.config._attn_implementation = attention.ATTENTION_NAME
        config._attn_implementation = attention.ATTENTION_NAME
        self.model = model
        self.device = device
        self.max_batch = max_batch
        self.max_context = max_context
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.block_size = block_size
        self.max_blocks = math.ceil(max_context / block_size)  # the widest block table a sequence needs
        num_blocks = num_blocks or max_batch * self.max_blocks
        self.cache = KVCache(len(layers), num_blocks, block_size, kv_heads, head_dim, kv_dtype, device)
        for layer, k, v in zip(layers, self.cache.k, self.cache.v):
            attention.attach_cache(layer.self_attn, k, v)
        self.positions_range = torch.arange(self.max_blocks * block_size, device=device)
        # the windows layers pass as `sliding_window`: none (global layers) and the config's, if any
        self.windows = (None,) + ((config.sliding_window,) if getattr(config, "sliding_window", None) else ())
        # cascade attention over shared prefixes: CPU only (its kernel is PyTorch's CPU one), and only for
        # models whose every layer attends globally without a logit softcap (the merge assumes both)
        self.shares_prefixes = (
            device.type == "cpu" and len(self.windows) == 1 and not getattr(config, "attn_logit_softcapping", None)
        )
        self.shared_prefix_min_saved = SHARED_PREFIX_MIN_SAVED
        self.shared_prefix_steps = 0  # decode steps that read a shared prefix once
        self.graphs = DecodeGraphs(self) if cuda_graphs and device.type == "cuda" else None
        self.compiled = CompiledDecode(self) if compiled_decode and device.type == "cpu" else None

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def forward(self, chunks: list[ScheduledChunk]) -> StepLogits:
        """Run the step; the logits of the rows the step needs (see StepLogits)."""
        if self.graphs is not None and self.graphs.covers(chunks):
            return StepLogits(self.graphs.run(chunks), [None] * len(chunks))
        if self.compiled is not None and self.compiled.covers(chunks):
            return StepLogits(self.compiled.run(chunks), [None] * len(chunks))
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        cache_rows: list[int] = []
        decodes: list[tuple[int, Sequence, int]] = []  # (flat row, sequence, length) of each one-token chunk
        prefills: list[tuple[int, ScheduledChunk]] = []  # (flat row, chunk) of each longer or scoring chunk
        logit_rows: list[int] = []  # the sampled rows first, in chunk order; then prompt-scoring rows
        scored: list[tuple[int, int] | None] = []  # per chunk: (first, count) into the prompt-scoring rows
        score_rows: list[int] = []
        for chunk in chunks:
            flat = len(token_ids)
            token_ids += chunk.token_ids
            span = range(chunk.start, chunk.start + chunk.length)
            positions += span
            cache_rows += [chunk.seq.cache_row(p, bs) for p in span]
            if chunk.length == 1 and not chunk.scores_prompt:
                decodes.append((flat, chunk.seq, chunk.start + 1))
            else:
                prefills.append((flat, chunk))
            if chunk.sample:
                logit_rows.append(flat + chunk.length - 1)
            scored.append((len(score_rows), chunk.length) if chunk.scores_prompt else None)
            if chunk.scores_prompt:
                score_rows += range(flat, flat + chunk.length)
        samples = len(logit_rows)
        logit_rows += score_rows
        n = len(token_ids)
        # one host-to-device copy of everything: ids, positions, cache rows, logit rows, decode rows and
        # lengths, the decode block tables (padded by repeating a row's last block: masked), prefill tables
        shared = self.shared_prefix([(seq, length) for _, seq, length in decodes])
        skip = len(shared)  # blocks every decode row starts with; its table and length then start after them
        width = max((math.ceil(length / bs) - skip for _, _, length in decodes), default=0)
        d_rows = [flat for flat, _, _ in decodes]
        d_lengths = [length - skip * bs for _, _, length in decodes]
        d_tables: list[int] = []
        for _, seq, length in decodes:
            d_tables += seq.block_table(length, width, bs, skip)
        p_tables: list[int] = []
        for _, chunk in prefills:
            p_tables += chunk.seq.blocks[: math.ceil((chunk.start + chunk.length) / bs)]
        packed = torch.tensor(
            token_ids + positions + cache_rows + logit_rows + d_rows + d_lengths + d_tables + p_tables + shared
        ).to(self.device, non_blocking=True)
        ids, pos, rows_t = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
        at = 3 * n
        logit_index = packed[at : at + len(logit_rows)]
        at += len(logit_rows)
        decode = None
        if decodes:
            b = len(decodes)
            d_rows_t, d_lengths_t = packed[at : at + b], packed[at + b : at + 2 * b]
            tables = packed[at + 2 * b : at + 2 * b + b * width].view(b, width)
            at += 2 * b + b * width
            first = _consecutive_run(d_tables) if b == 1 else None
            prefix = packed[len(packed) - skip :] if skip else None
            decode = DecodeLayout(None if d_rows == list(range(n)) else d_rows_t, tables, d_lengths_t, first, prefix)
        chunk_layouts = []
        for flat, chunk in prefills:
            count = math.ceil((chunk.start + chunk.length) / bs)
            table = chunk.seq.blocks[:count]
            chunk_layouts.append(
                PrefillChunk(flat, chunk.length, chunk.start, packed[at : at + count], _consecutive_run(table))
            )
            at += count
        ctx = self._context(rows_t, pos, decode, chunk_layouts)
        logits = self._logits(ids, pos, logit_index, ctx)
        prompt = [None if at is None else logits[samples + at[0] : samples + at[0] + at[1]] for at in scored]
        return StepLogits(logits[:samples], prompt)

    def shared_prefix(self, rows: list[tuple[Sequence, int]]) -> list[int]:
        """The blocks every decode row (sequence, keys it attends over) starts with, when reading them once
        for the batch is worth it (`shared_prefix_min_saved`); else []. Only full blocks before each row's
        current one can be shared (the prefix cache shares full blocks only)."""
        if not self.shares_prefixes or len(rows) < 2:
            return []
        bs = self.block_size
        common = os.path.commonprefix([seq.blocks[: (length - 1) // bs] for seq, length in rows])
        if len(common) < 2 or len(common) * bs * (len(rows) - 1) < self.shared_prefix_min_saved:
            return []
        self.shared_prefix_steps += 1
        return common

    def _context(self, cache_rows, positions, decode, prefills) -> StepContext:
        return StepContext(
            cache_rows, positions, decode, prefills, self.positions_range, self.block_size, self.cache.k[0].dtype
        )

    def _logits(self, ids, positions, logit_index, ctx) -> torch.Tensor:
        ctx.prepare_masks(self.windows)
        out = self.model(
            input_ids=ids[None],
            position_ids=positions[None],
            logits_to_keep=logit_index,
            use_cache=False,
            kiln_step=ctx,
        )
        return out.logits[0].float()


def _consecutive_run(blocks: list[int]) -> int | None:
    """The first block when `blocks` are b, b + 1, b + 2, ... (attention then reads them in place)."""
    if blocks and blocks[-1] - blocks[0] == len(blocks) - 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return blocks[0]
    return None


class DecodeGraphs:
    """CUDA graphs of the decode-only step, one per (batch bucket, key-span bucket).

    Each graph reads its inputs from static tensors (token, position, cache row, length and block table
    per row) that are refilled before replay. A batch smaller than its bucket is padded by repeating
    its last row. Spans double from MIN_SPAN to the context (the block table's width follows): attention
    reads at most twice the keys it needs. All graphs share one memory pool, captured largest first,
    so they cost one step's activations.
    """

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        buckets = {1, 2, 4, 8}
        size = 16
        while size < runner.max_batch:
            buckets |= {size, size + size // 2}
            size *= 2
        self.batch_buckets = sorted({b for b in buckets if b < runner.max_batch} | {runner.max_batch})
        bs = runner.block_size
        spans, span = [], max(1, min(MIN_SPAN // bs, runner.max_blocks))
        while span < runner.max_blocks:
            spans.append(span)
            span *= 2
        self.span_buckets = spans + [runner.max_blocks]  # in blocks
        dev = runner.device
        top = self.batch_buckets[-1]
        self.ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.cache_rows = torch.zeros(top, dtype=torch.long, device=dev)
        self.lengths = torch.ones(top, dtype=torch.long, device=dev)
        self.tables = torch.zeros(top, runner.max_blocks, dtype=torch.long, device=dev)
        self.host = torch.zeros(4 + runner.max_blocks, top, dtype=torch.long).pin_memory()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.failed: str | None = None

    def covers(self, chunks: list[ScheduledChunk]) -> bool:
        return not self.failed and bool(self.graphs) and is_decode_only(chunks, self.batch_buckets[-1])

    def capture_all(self) -> str:
        """Capture every bucket now (warmup), so memory is known before users arrive; on any failure
        (a kernel that cannot be captured, e.g. some quantized paths) fall back to eager for good."""
        try:
            for batch in reversed(self.batch_buckets):
                for span in reversed(self.span_buckets):
                    self._capture(batch, span)
        except Exception as exc:  # eager still works; say why
            self.failed = f"CUDA graph capture failed ({type(exc).__name__}: {exc!s:.160}); decode runs eager"
            self.graphs.clear()
            torch.cuda.synchronize()
            return self.failed
        bs = self.runner.block_size
        return (
            f"CUDA graphs for decode: {len(self.graphs)} captured, batch buckets {self.batch_buckets}, "
            f"key spans {self.span_buckets[0] * bs}..{self.span_buckets[-1] * bs}"
        )

    @torch.inference_mode()
    def _capture(self, batch: int, span: int) -> None:
        runner = self.runner
        ctx = runner._context(
            self.cache_rows[:batch],
            self.positions[:batch],
            DecodeLayout(None, self.tables[:batch, :span], self.lengths[:batch]),
            [],
        )
        rows = runner.positions_range[:batch]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm the kernels (cuBLAS handles, autotuning) outside capture
            runner._logits(self.ids[:batch], self.positions[:batch], rows, ctx)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        ctx._masks.clear()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = runner._logits(self.ids[:batch], self.positions[:batch], rows, ctx)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(batch, span)] = (graph, logits)

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        n = len(chunks)
        bs = self.runner.block_size
        batch = next(b for b in self.batch_buckets if b >= n)
        longest = max(c.start + 1 for c in chunks)
        span = next(s for s in self.span_buckets if s * bs >= longest)
        # rows past n repeat the last sequence: they write the same K/V to the same place, and their
        # logits are dropped, so padding needs no memory of its own and never touches another block
        padded = chunks + [chunks[-1]] * (batch - n)
        host = self.host[:, :batch]
        host[0] = torch.tensor([c.token_ids[0] for c in padded])
        host[1] = torch.tensor([c.start for c in padded])
        host[2] = torch.tensor([c.seq.cache_row(c.start, bs) for c in padded])
        host[3] = host[1] + 1
        host[4 : 4 + span] = torch.tensor([c.seq.block_table(c.start + 1, span, bs) for c in padded]).T
        for target, row in zip((self.ids, self.positions, self.cache_rows, self.lengths), host):
            target[:batch].copy_(row, non_blocking=True)
        self.tables[:batch, :span].copy_(host[4 : 4 + span].T, non_blocking=True)
        graph, logits = self.graphs[(batch, span)]
        graph.replay()
        return logits[:n].float()
