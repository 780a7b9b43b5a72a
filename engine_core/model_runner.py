"""One forward pass over a mixed batch of prompt chunks and decode tokens.

The HF model supplies the weights and the per-token modules (embeddings, norms, projections,
MLP, rotary tables), however they were loaded (16-bit, bitsandbytes NF4, accelerate offload).
Attention is ours: K/V live in a preallocated slot cache, all tokens of the step are flattened
into one sequence so every linear layer runs once per step, and only attention is split:
all decode tokens in one padded SDPA call, each prompt chunk in one causal call.
"""
from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.scheduler import ScheduledChunk


class UnsupportedModel(Exception):
    pass


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """K and V for `slots` sequences × `context` positions per layer, allocated once.

    On CPU the pool is one anonymous mmap: the kernel hands out zeroed 4 KiB pages on first
    write, so the plan's whole budget is reserved but RAM is committed only as sequences fill
    their slots (numpy/torch zeros would touch it all, or take 2 MiB huge pages per write).
    Zeroed matters: masked positions are multiplied by 0, and stale NaN garbage would leak in.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, context: int, head_dim: int, dtype, device):
        shape = (2, layers, slots, kv_heads, context, head_dim)
        if torch.device(device).type == "cpu":
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._buffer = mmap.mmap(-1, math.prod(shape) * itemsize)
            pool = torch.frombuffer(self._buffer, dtype=dtype).view(shape)
        else:
            pool = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(pool[0]), list(pool[1])
        self.bytes = pool.numel() * pool.element_size()


class ModelRunner:
    def __init__(self, model: nn.Module, max_batch: int, max_context: int, device: torch.device, kv_dtype):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        needed = ("embed_tokens", "norm", "rotary_emb")
        if layers is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
            raise UnsupportedModel(f"{type(model).__name__}: the batched runner needs a decoder-only model "
                                   "with model.embed_tokens/layers/norm/rotary_emb and lm_head (Llama-like)")
        for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
            if not hasattr(layers[0], name):
                raise UnsupportedModel(f"{type(model).__name__}: decoder layers lack `{name}`")
        config = model.config
        self.model = model
        self.inner = inner
        self.layers = list(layers)
        self.device = device
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.scaling = attn.scaling
        # Mistral/Starcoder2-style sliding window: a token attends to the last `window` positions only
        use_window = getattr(config, "use_sliding_window", True)
        self.window = getattr(config, "sliding_window", None) if use_window else None
        self.cache = KVCache(len(self.layers), max_batch, self.num_kv_heads, max_context, self.head_dim,
                             kv_dtype, device)
        self.positions_range = torch.arange(max_context, device=device)

    def _prefill_mask(self, start: int, length: int) -> torch.Tensor | None:
        """None for a plain causal chunk (SDPA's fast path); else the chunk's queries over the cached
        prefix plus itself, causal, within the sliding window if the model has one."""
        end = start + length
        if start == 0 and not (self.window and end > self.window):
            return None
        key_pos = self.positions_range[:end][None, :]
        query_pos = self.positions_range[start:end][:, None]
        mask = key_pos <= query_pos
        if self.window:
            mask &= key_pos > query_pos - self.window
        return mask[None, None]

    @torch.inference_mode()
    def forward(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; returns float32 logits, one row per chunk with `sample` set, in order."""
        dev = self.device
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        prefills: list[tuple[int, int, int, int]] = []  # (flat start, length, slot, seq start)
        logit_rows: list[int] = []
        for chunk in chunks:
            flat = len(token_ids)
            token_ids += chunk.token_ids
            positions += range(chunk.start, chunk.start + chunk.length)
            slots += [chunk.seq.slot] * chunk.length
            if chunk.start >= len(chunk.seq.prompt_ids):
                decode_rows.append(flat)
            else:
                prefills.append((flat, chunk.length, chunk.seq.slot, chunk.start))
            if chunk.sample:
                logit_rows.append(flat + chunk.length - 1)
        n = len(token_ids)
        ids_t = torch.tensor(token_ids, device=dev)
        pos_t = torch.tensor(positions, device=dev)
        slot_t = torch.tensor(slots, device=dev)

        decode = None
        if decode_rows:
            rows = torch.tensor(decode_rows, device=dev)
            d_slots = slot_t[rows]
            lengths = pos_t[rows] + 1
            span = int(lengths.max())
            key_pos = self.positions_range[:span][None, :]
            mask = key_pos < lengths[:, None]
            if self.window:
                mask &= key_pos >= lengths[:, None] - self.window
            decode = (rows, d_slots, span, mask[:, None, None, :])
        prefill_masks = [self._prefill_mask(start, length) for _, length, _, start in prefills]

        hidden = self.inner.embed_tokens(ids_t[None])  # [1, n, hidden]
        cos, sin = self.inner.rotary_emb(hidden, pos_t[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [n, 1, head_dim]
        for index, layer in enumerate(self.layers):
            # accelerate offload: we call the layer's submodules, not `layer(...)`, so drive its hook the way
            # accelerate's wrapped forward would. Offloaded weights sit on each leaf module (q_proj, norms...)
            # whose own hooks fire when called; this layer-level hook (an AlignDevicesHook or SequentialHook)
            # moves inputs and, with place_submodules / preload classes, loads and drops the whole layer.
            hook = getattr(layer, "_hf_hook", None)
            if hook is not None:
                (hidden,), _ = hook.pre_forward(layer, hidden)
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_proj(x).view(n, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            cache_k, cache_v = self.cache.k[index], self.cache.v[index]
            cache_k[slot_t, :, pos_t] = k.to(cache_k.dtype)
            cache_v[slot_t, :, pos_t] = v.to(cache_v.dtype)
            out = torch.empty_like(q)
            if decode is not None:
                rows, d_slots, span, mask = decode
                keys = cache_k[d_slots, :, :span]
                values = cache_v[d_slots, :, :span]
                o = F.scaled_dot_product_attention(q[rows][:, :, None, :].to(keys.dtype), keys, values,
                                                   attn_mask=mask, scale=self.scaling, enable_gqa=True)
                out[rows] = o[:, :, 0, :].to(out.dtype)
            for (flat, length, slot, start), prefill_mask in zip(prefills, prefill_masks):
                keys = cache_k[slot, :, : start + length][None]
                values = cache_v[slot, :, : start + length][None]
                qp = q[flat : flat + length].transpose(0, 1)[None].to(keys.dtype)
                o = F.scaled_dot_product_attention(qp, keys, values, attn_mask=prefill_mask,
                                                   is_causal=prefill_mask is None, scale=self.scaling,
                                                   enable_gqa=True)
                out[flat : flat + length] = o[0].transpose(0, 1).to(out.dtype)
            hidden = residual + attn.o_proj(out.reshape(1, n, self.num_heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if hook is not None:
                hidden = hook.post_forward(layer, hidden)
        last = hidden[0, logit_rows]
        return self.model.lm_head(self.inner.norm(last)).float()
