"""Pure byte arithmetic for a plan: weights, KV cache, activation peak, reserves. No decisions here.

All sizes in bytes (GiB = 2^30), from parameter counts and the machine profile only:
- Weights = parameters × dtype bytes; NF4 weights = b × (embeddings + untied lm_head + norms/biases)
  + 0.516 × decoder linear params (bitsandbytes quantizes only the decoder's nn.Linear weights).
- KV bytes per token = 2 × layers × kv_heads × head_dim × (2, or 4 for float32).
- Activation peak of one prefill chunk of C tokens, in compute dtype bytes b, sized for the chunk:
  C × (2h + (heads + 2·kv_heads)·head_dim + heads·head_dim + m·intermediate) × b   (residual + norm,
  qkv, attention output, MLP with m = 3 gated / 2 plain), plus fp32 logits for the last position
  of a full decode batch (max batch × vocab × 4), plus, under NF4, one linear weight dequantized to
  16-bit (hidden × intermediate × 2). Attention over the context runs in a fused kernel (SDPA's
  flash / memory-efficient kernels, on CPU too) that never holds C × context scores; what grows
  with the context is small: the chunk's boolean mask (C × context bytes, shared by all heads) and
  one layer's K and V gathered from the sequence's blocks (context × kv bytes per token / layers).
  Only where the model caps its attention logits (gemma2's softcap, computed explicitly) does one
  layer's fp32 scores heads × C × context × 4 count too. The context is the longest the plan may
  choose (the model's window or --max-context). Layers run one at a time, so the peak of one layer
  is the peak of the model.
- GPU budget = total × 0.90 (or × --gpu-memory-fraction), capped by the free memory NVML reports.
  Out of it come a reserve of 1 GiB (CUDA context, cuBLAS workspaces, fragmentation) plus the
  activation peak, then the weights; what is left is the KV cache. Together with the 10% this is
  HARDWARE-NOTES' "10% of total + 1 GiB", plus activations stated separately.
- CPU budget = available RAM (cgroup-capped). Reserve max(2 GiB, 20%) for the OS, the frontend
  process and the tokenizer, plus the activation peak.
"""

from __future__ import annotations

import math

from hardware.profile import GiB, GpuInfo, decoder_linear_shapes
from model.shape import TWO_MATRIX_MLP, ModelShape
from planning.batch import PREFERRED_BATCH, min_context
from planning.dtypes import dtype_bytes

GPU_FRACTION = 0.90
GPU_OVERHEAD = 1 * GiB
CPU_RESERVE_FRACTION, CPU_RESERVE_MIN = 0.20, 2 * GiB
NF4_BYTES_PER_PARAM = 0.516  # 4-bit codes + double-quantized absmax per 64 weights


def weight_bytes(shape: ModelShape, dtype: str, quantized: bool) -> int:
    """Resident weight bytes for the whole model in `dtype`, or NF4 with `dtype` for the rest."""
    b = dtype_bytes(dtype)
    if not quantized:
        return shape.total_params * b
    kept = shape.embedding_params + shape.lm_head_params + shape.other_params
    return kept * b + math.ceil(NF4_BYTES_PER_PARAM * shape.decoder_linear_params)


INT8_SCALE_BYTES = 2  # one bf16 scale per output row


def int8_weight_bytes(shape: ModelShape, dtype: str) -> int:
    """int8 weight-only linears (decoder layers and LM head; a tied head gets its own int8 copy), the rest
    (embeddings, norms) in `dtype`."""
    b = dtype_bytes(dtype)
    head = shape.vocab_size * shape.hidden_size
    rows = shape.num_layers * sum(out for _, out in decoder_linear_shapes(shape)) + shape.vocab_size
    kept = shape.embedding_params + shape.other_params
    return kept * b + shape.decoder_linear_params + head + rows * INT8_SCALE_BYTES


INT4_GROUP = 32  # weights per bf16 scale and zero (engine_core/int4_weights.py)
SCALED_EMBEDDINGS = frozenset({"gemma2", "gemma3_text"})  # an embedding that scales its rows: kept in `dtype`


def int4_weight_bytes(shape: ModelShape, dtype: str) -> int:
    """The int4 format (engine_core/int4_weights.py): decoder linears at half a byte per weight plus a 2-byte scale
    and zero per 32; the LM head in int8 rows (a byte per weight, a 2-byte scale per row); the input embedding in
    int8 rows too, sharing the head's when tied (a scaled embedding stays in `dtype`); norms and biases in `dtype`."""
    b = dtype_bytes(dtype)
    linear = shape.decoder_linear_params
    table = shape.vocab_size * shape.hidden_size
    int8_rows = table + shape.vocab_size * INT8_SCALE_BYTES
    if shape.architecture in SCALED_EMBEDDINGS:
        embedding = shape.embedding_params * b
    else:
        embedding = 0 if shape.tie_word_embeddings else int8_rows
    return linear // 2 + math.ceil(linear / INT4_GROUP) * 2 * 2 + int8_rows + embedding + shape.other_params * b


def quantized_weight_bytes(shape: ModelShape, dtype: str, fmt: str) -> int:
    """Resident bytes of a CPU weight-only format ("int8" or "int4")."""
    return int4_weight_bytes(shape, dtype) if fmt == "int4" else int8_weight_bytes(shape, dtype)


def kv_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    """K and V for every layer; NF4 computes (and caches) in 16-bit, so 2 bytes unless float32."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes(dtype)


EXPLICIT_SCORES = frozenset({"gemma2"})  # attention logits softcapped: scores computed outside SDPA, in fp32


def activation_peak_bytes(
    shape: ModelShape, chunk: int, context: int, batch: int, dtype: str, quantized: bool, kv_dtype: str | None = None
) -> int:
    """Peak transient memory of one prefill chunk against `context` keys, with `batch` decode rows' logits
    (see the module docstring for each term)."""
    b = dtype_bytes(dtype)
    h, hd = shape.hidden_size, shape.head_dim
    mlp_mats = 2 if shape.architecture in TWO_MATRIX_MLP else 3
    per_token = 2 * h + (shape.num_attention_heads + 2 * shape.num_kv_heads) * hd
    per_token += shape.num_attention_heads * hd + mlp_mats * shape.intermediate_size
    mask = chunk * context
    gathered = context * kv_bytes_per_token(shape, kv_dtype or dtype) // shape.num_layers
    scores = shape.num_attention_heads * chunk * context * 4 if shape.architecture in EXPLICIT_SCORES else 0
    logits = batch * shape.vocab_size * 4
    dequant = h * shape.intermediate_size * 2 if quantized else 0
    return chunk * per_token * b + mask + gathered + scores + logits + dequant


def layer_split(shape: ModelShape) -> tuple[int, int]:
    """(linear, other) params of one decoder layer."""
    linear = shape.decoder_linear_params // shape.num_layers
    return linear, max(0, shape.layer_params - linear)


def layer_bytes(shape: ModelShape, dtype: str, quantized: bool) -> int:
    """One decoder layer's weights as loaded on the compute device (NF4 quantizes its linears)."""
    linear, other = layer_split(shape)
    if quantized:
        return other * dtype_bytes(dtype) + math.ceil(NF4_BYTES_PER_PARAM * linear)
    return shape.layer_params * dtype_bytes(dtype)


def head_params(shape: ModelShape, embed: bool, lm_head: bool) -> int:
    """Parameters of the embedding table and/or the untied lm_head (0 when tied)."""
    return (shape.embedding_params if embed else 0) + (shape.lm_head_params if lm_head else 0)


def outside_layers_bytes(shape: ModelShape, dtype: str, moved_params: int = 0) -> int:
    """Weights outside the decoder layers (embeddings, lm_head, final norm) at `dtype`, less `moved_params`
    placed on another device."""
    layers_other = shape.num_layers * layer_split(shape)[1]
    heads = head_params(shape, True, True)
    return (heads - moved_params + max(0, shape.other_params - layers_other)) * dtype_bytes(dtype)


def gpu_budget(gpu: GpuInfo, fraction: float) -> int:
    """Device memory a GPU plan may use: total × fraction, capped by what is free."""
    return min(int(gpu.total_bytes * fraction), gpu.free_bytes)


def gpu_reserve(shape: ModelShape, chunk: int, context: int, batch: int, dtype: str, quantized: bool) -> int:
    """Kept free on the GPU: CUDA context and workspaces + the activation peak."""
    return GPU_OVERHEAD + activation_peak_bytes(shape, chunk, context, batch, dtype, quantized)


def ram_reserve(available: int) -> int:
    """RAM kept for the OS, the frontend process and the tokenizer: max(2 GiB, 20% of available)."""
    return max(CPU_RESERVE_MIN, int(CPU_RESERVE_FRACTION * available))


class Candidate:
    """One way to hold the weights on one device: dtype + quantization, and what it costs."""

    def __init__(
        self, shape: ModelShape, dtype: str, quantized: bool, budget: int, reserve: int, kv_dtype: str | None = None
    ) -> None:
        self.dtype, self.quantized, self.reserve = dtype, quantized, reserve
        self.weights = weight_bytes(shape, dtype, quantized)
        self.kv_per_token = kv_bytes_per_token(shape, kv_dtype or dtype)
        self.kv_room = budget - reserve - self.weights
        lo = min_context(shape)
        self.fits = self.kv_room >= self.kv_per_token * lo
        self.headroom = self.kv_room >= self.kv_per_token * lo * PREFERRED_BATCH
        self.needed_min = self.weights + reserve + self.kv_per_token * lo

    @property
    def label(self) -> str:
        return f"NF4 (+{self.dtype})" if self.quantized else self.dtype


def pick(cands: list[Candidate]) -> Candidate | None:
    """First candidate with room for 4 minimum-context sequences, else the most compact that fits at all."""
    for c in cands:
        if c.headroom:
            return c
    return cands[-1] if cands and cands[-1].fits else None
