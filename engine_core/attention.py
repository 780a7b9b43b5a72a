"""kiln's attention, plugged into transformers' own decoder layers through its AttentionInterface.

The model runs its own modules (norms, multipliers, rotary rules, MLPs), so every architecture
computes exactly what transformers computes; only the attention call is ours. It reads the step's
batch layout from a `StepContext` passed down as the `kiln_step` keyword argument, writes the new
K/V into kiln's paged block pool and attends over each sequence's blocks: all decode tokens in one batched call, each
prompt chunk in one causal call over its cached prefix.

All tokens of a step are flattened into one sequence ([1, n, ...]), so every linear layer runs
once per step. Everything here is device work with no host synchronisation, so a decode step can
be captured in a CUDA graph and replayed with new contents in the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION_NAME = "kiln"


@dataclass(eq=False)
class DecodeLayout:
    """The step's decode rows: one new token per sequence, attending over its first `lengths` cached
    positions, which its row of `tables` (block ids) holds. The table width × block size (≥ every
    length) bounds the keys read, so shapes stay static for a graph."""

    rows: torch.Tensor | None  # flat indices of the decode tokens; None = every token of the step, in order
    tables: torch.Tensor  # [rows, blocks] block ids (padding repeats a valid block; masked out)
    lengths: torch.Tensor
    first_block: int | None = None  # one row whose blocks are first_block, first_block + 1, ...: read in place
    # blocks every row starts with (a shared system prompt or document), read once for the whole batch;
    # `tables` and `lengths` then describe what follows them (see _attend_shared_prefix)
    prefix: torch.Tensor | None = None

    def span(self, block_size: int) -> int:
        return self.tables.shape[1] * block_size


@dataclass(frozen=True)
class PrefillChunk:
    flat: int  # first index of the chunk in the flattened step
    length: int
    start: int  # position of the chunk's first token in its sequence
    table: torch.Tensor  # the block ids holding positions [0, start + length), in order
    first_block: int | None = None  # set when those blocks are first_block, first_block + 1, ...: read in place


@dataclass(eq=False)
class StepContext:
    """What the attention of one step needs to know beyond q, k, v; built once per step."""

    cache_rows: torch.Tensor  # per flat token: its row in the flat cache view (block × block_size + offset)
    positions: torch.Tensor  # per flat token
    decode: DecodeLayout | None
    prefills: list[PrefillChunk]
    positions_range: torch.Tensor  # arange(longest span) on the device
    block_size: int
    dtype: torch.dtype = torch.float32  # the pool's
    _masks: dict = field(default_factory=dict)  # shared by the layers of the step

    def __post_init__(self) -> None:
        self.write_blocks = self.cache_rows // self.block_size  # where each new token's K/V go
        self.write_offsets = self.cache_rows % self.block_size

    def prepare_masks(self, windows: tuple) -> None:
        """Build every mask the layers will ask for before the first layer runs, so a compiled layer
        only ever reads them (building inside would make the first layer trace differently)."""
        for window in windows:
            if self.decode is not None:
                self.decode_mask(window)
            for chunk in self.prefills:
                self.prefill_mask(chunk, window)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[rows, 1, 1, span]: boolean for SDPA; with a shared prefix, 0/-inf in the pool's dtype (the
        form the attention kernel that also returns log-sum-exps takes)."""
        key = ("decode", window)
        if key not in self._masks:
            d = self.decode
            key_pos = self.positions_range[: d.span(self.block_size)][None, :]
            mask = key_pos < d.lengths[:, None]
            if window:
                mask &= key_pos >= d.lengths[:, None] - window
            mask = mask[:, None, None, :]
            if d.prefix is not None:
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
            self._masks[key] = mask
        return self._masks[key]

    def prefill_mask(self, chunk: PrefillChunk, window: int | None) -> torch.Tensor | None:
        """None for a plain causal chunk from position 0 (SDPA's fast path); else the chunk's queries
        over the cached prefix plus itself, causal, within the sliding window if the layer has one."""
        end = chunk.start + chunk.length
        if chunk.start == 0 and not (window and end > window):
            return None
        key = ("prefill", chunk.start, chunk.length, window)
        if key not in self._masks:
            key_pos = self.positions_range[:end][None, :]
            query_pos = self.positions_range[chunk.start : end][:, None]
            mask = key_pos <= query_pos
            if window:
                mask &= key_pos > query_pos - window
            self._masks[key] = mask[None, None]
        return self._masks[key]


def _attend(q, k, v, mask, scale, softcap, causal=False):
    """SDPA, or the explicit form when the model caps its attention logits (Gemma 2)."""
    if not softcap:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=True
        )
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def _blocks(cache: torch.Tensor, table: torch.Tensor, first_block: int | None) -> torch.Tensor:
    """[rows, blocks × block_size, kv_heads, d]: the blocks of each table row, in order. A run of
    consecutive blocks (one sequence allocated in one go) is a view of the pool, no copy; otherwise
    index_select copies whole blocks (contiguous runs of block_size × kv_heads × d values)."""
    rows, width = table.shape
    if first_block is not None:
        return cache.narrow(0, first_block, width).reshape(1, width * cache.shape[1], *cache.shape[2:])
    gathered = cache.index_select(0, table.reshape(-1))
    return gathered.view(rows, width * cache.shape[1], *cache.shape[2:])


def _attend_shared_prefix(q, keys, values, mask, prefix_keys, prefix_values, scale):
    """Cascade attention: every row's keys are one shared prefix followed by its own blocks. The prefix is
    read once, as one batched query ([kv_heads, rows × group, d] against its [kv_heads, P, d]) instead
    of once per row (gathered copies of a 1,400-token system prompt were most of a 10-user decode step),
    then each row attends over its own keys; the two partial results merge exactly by their log-sum-exps.
    The kernel is PyTorch's fused CPU attention, which returns those (SDPA does not); no sliding window,
    no logit softcap (the runner takes this path only for models without either)."""
    attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, kv_heads, group, dim = q.shape
    shared_q = q.transpose(0, 1).reshape(1, kv_heads, batch * group, dim)
    o1, lse1 = attend(shared_q, prefix_keys, prefix_values, scale=scale)
    o1 = o1.view(kv_heads, batch, group, dim).transpose(0, 1)
    lse1 = lse1.view(kv_heads, batch, group).transpose(0, 1)
    o2, lse2 = attend(q, keys, values, attn_mask=mask, scale=scale)
    lse = torch.logaddexp(lse1, lse2)
    return o1 * torch.exp(lse1 - lse)[..., None] + o2 * torch.exp(lse2 - lse)[..., None]


def _attend_decode(ctx: StepContext, q, cache_k, cache_v, window, scale, softcap):
    """One new token per decode row: q [B, heads, d] over the rows' cached keys/values, in q's dtype.

    The query heads that share a KV head become that head's query rows ([B, kv_heads, group, d]),
    so GQA needs no expanded copy of K/V and the call has a plain shape that SDPA's fused kernels
    take with a mask (one kernel per layer on a GPU instead of the math path's half a dozen). K/V are
    [B, kv_heads, span, d] views of the gathered blocks (strides, not copies)."""
    d = ctx.decode
    keys = _blocks(cache_k, d.tables, d.first_block).transpose(1, 2)
    values = _blocks(cache_v, d.tables, d.first_block).transpose(1, 2)
    batch, heads, dim = q.shape
    grouped = q.reshape(batch, keys.shape[1], heads // keys.shape[1], dim).to(keys.dtype)
    if d.prefix is None:
        o = _attend(grouped, keys, values, ctx.decode_mask(window), scale, softcap)
    else:
        if window or softcap:
            raise ValueError("a shared-prefix decode layout reached a layer with a sliding window or softcap")
        prefix = d.prefix[None]
        prefix_keys = _blocks(cache_k, prefix, None).transpose(1, 2)
        prefix_values = _blocks(cache_v, prefix, None).transpose(1, 2)
        o = _attend_shared_prefix(grouped, keys, values, ctx.decode_mask(window), prefix_keys, prefix_values, scale)
    return o.reshape(batch, heads, dim).to(q.dtype)


def kiln_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    softcap=None,
    kiln_step: StepContext | None = None,
    **kwargs,
):
    """transformers' attention signature: q [1, heads, n, d], k/v [1, kv_heads, n, d] (rotated) in,
    [1, n, heads, d] out. The model's own mask is ignored: the layout in `kiln_step` defines it.

    The layer's window is the `sliding_window` keyword only, the contract transformers' flash attention
    relies on too (sdpa and eager get it through the mask instead): a module attribute can be set on
    layers that attend globally (e.g. exaone4), so it is never read."""
    ctx = kiln_step
    if ctx is None:  # no mask was built either (see register): refuse rather than attend wrongly
        raise RuntimeError("a model set to kiln attention runs inside kiln's ModelRunner only (no kiln_step given)")
    cache_k, cache_v = module.kiln_k, module.kiln_v
    q = query[0].transpose(0, 1)  # [n, heads, d]
    # indexed on the pool itself, not on a flattened view: a compiled step then updates the buffer in place
    # (through a view, functionalization copies the whole pool back every layer)
    blocks, offsets = ctx.write_blocks, ctx.write_offsets
    cache_k[blocks, offsets] = key[0].transpose(0, 1).to(cache_k.dtype)
    cache_v[blocks, offsets] = value[0].transpose(0, 1).to(cache_v.dtype)
    d = ctx.decode
    if d is not None and d.rows is None:  # decode only (the graph case): no scatter
        return _attend_decode(ctx, q, cache_k, cache_v, sliding_window, scaling, softcap)[None], None
    out = torch.empty_like(q)
    if d is not None:
        out[d.rows] = _attend_decode(ctx, q[d.rows], cache_k, cache_v, sliding_window, scaling, softcap)
    for chunk in ctx.prefills:
        end = chunk.start + chunk.length
        table = chunk.table[None]
        keys = _blocks(cache_k, table, chunk.first_block)[:, :end].transpose(1, 2)
        values = _blocks(cache_v, table, chunk.first_block)[:, :end].transpose(1, 2)
        qp = q[chunk.flat : chunk.flat + chunk.length].transpose(0, 1)[None].to(keys.dtype)
        o = _attend(qp, keys, values, ctx.prefill_mask(chunk, sliding_window), scaling, softcap, causal=True)
        out[chunk.flat : chunk.flat + chunk.length] = o[0].transpose(0, 1).to(out.dtype)
    return out[None], None


def attach_cache(attention_module, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
    """Give a layer's attention its blocks of the pool ([blocks, block_size, kv_heads, head_dim]).

    Non-persistent buffers: never saved, not offloaded, and torch.compile sees them as inputs of the
    layer rather than per-layer constants, so one compiled graph serves every layer."""
    attention_module.register_buffer("kiln_k", cache_k, persistent=False)
    attention_module.register_buffer("kiln_v", cache_v, persistent=False)


def register() -> None:
    """Make "kiln" a valid `attn_implementation`. Masks: none is built for an implementation the mask
    interface does not know, which is what we want (the layout in the step context is the mask)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kiln_attention)
