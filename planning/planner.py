"""HardwareProfile + ModelShape (+ overrides) -> ServingPlan: dtype, NF4, offload, batch, context.

Pure arithmetic, no torch, no I/O: every number comes from parameter counts and the
profile, so a plan can be made for a machine we are not on and checked in tests.

Memory model (all sizes in bytes; GiB = 2^30):
- GPU budget = total × 0.90 (or × --gpu-memory-fraction), capped by the free memory NVML reports.
  Out of it come a reserve of 1 GiB (CUDA context, cuBLAS workspaces, fragmentation) plus the
  activation peak below, then the weights; what is left is the KV cache. Together with the
  10% this is HARDWARE-NOTES' "10% of total + 1 GiB", plus activations stated separately.
- CPU budget = available RAM (cgroup-capped). Reserve max(2 GiB, 20%) for the OS, the frontend
  process and the tokenizer, plus the activation peak.
- Activation peak of one prefill chunk of C tokens, in compute dtype bytes b:
  C × (2h + (heads + 2·kv_heads)·head_dim + heads·head_dim + m·intermediate) × b   (residual + norm,
  qkv, attention output, MLP with m = 3 gated / 2 plain), plus one layer's attention scores
  heads × C × context × 4 (the SDPA math fallback materializes them in fp32), plus fp32 logits
  for the last position of a full decode batch (16 × vocab × 4), plus, under NF4, one linear
  weight dequantized to 16-bit (hidden × intermediate × 2). Layers run one at a time, so the peak
  of one layer is the peak of the model.
- KV bytes per token = 2 × layers × kv_heads × head_dim × (2, or 4 for float32).
- NF4 weights = b × (embeddings + untied lm_head + norms/biases) + 0.516 × decoder linear params.
- GPU offload (the weights do not fit with a KV cache): the GPU holds the reserve, KV for at least one
  minimum-context sequence, the embeddings, lm_head and final norm, the first N decoder layers, and one
  offloaded layer while it runs (b × layer params, NF4 too: bitsandbytes does not quantize CPU layers;
  transformers 5 loads them in the compute dtype, and the loader casts any left in fp32). RAM holds the other layers at
  b × layer params. If that leaves no room for one decoder layer on the GPU, the embedding table moves
  to RAM (a row lookup on CPU; only hidden rows cross PCIe), then the lm_head (a CPU matmul per step);
  tied embeddings and lm_head are one tensor and move together. Their b × params then count in RAM
  (offload_bytes) instead of on the GPU (max_memory); their CPU activations (chunk × hidden, batch ×
  vocab) fall within the RAM reserve. The plan says so with device_map "cpu" for `model.embed_tokens` /
  `lm_head`. Refused when even then no decoder layer fits.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from model.shape import ACCELERATE_LAYOUT, ModelShape
from planning.overrides import describe
from planning.plan import PlanOverrides, ServingPlan
from hardware.profile import GiB, GpuInfo, HardwareProfile, format_bytes as fb

GPU_FRACTION = 0.90
GPU_OVERHEAD = 1 * GiB
CPU_RESERVE_FRACTION, CPU_RESERVE_MIN = 0.20, 2 * GiB
MIN_CONTEXT, MAX_CONTEXT, CONTEXT_STEP = 2048, 8192, 256
MAX_BATCH, PREFERRED_BATCH = 16, 4
NF4_BYTES_PER_PARAM = 0.516  # 4-bit codes + double-quantized absmax per 64 weights
CPU_PREFILL_CHUNK = 256
# K/V kept in fp32 on CPU: torch's CPU attention kernels are far slower in bf16 (decode at 160
# cached tokens: 780 vs 120 µs per layer measured here), worth twice the KV bytes of a small model
CPU_KV_DTYPE = "float32"
CPU_KV_REASON = ("float32 on CPU: torch's CPU attention is several times slower in bf16 (measured 780 vs 120 µs "
                 "per layer at 160 cached tokens, batch 10), so K/V stay fp32 whatever the weight dtype")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Weight formats the CPU loader can use, in order of preference on a tie; measured by engine_core/cpu_formats.py.
# int8 dynamic quantization is left out: not exact (activations quantized per step) and the loader has no path for it.
CPU_WEIGHT_FORMATS = ("float32", "bfloat16")
CPU_FORMAT_MARGIN = 0.90  # another format replaces float32 only when it takes ≤ 90% of float32's time


class PlanError(Exception):
    """No plan fits: the message says how much memory is needed and how much there is."""


# ---------------------------------------------------------------- arithmetic


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def weight_bytes(shape: ModelShape, dtype: str, quantized: bool) -> int:
    """Resident weight bytes for the whole model in `dtype`, or NF4 with `dtype` for the rest."""
    b = dtype_bytes(dtype)
    if not quantized:
        return shape.total_params * b
    kept = shape.embedding_params + shape.lm_head_params + shape.other_params
    return kept * b + math.ceil(NF4_BYTES_PER_PARAM * shape.decoder_linear_params)


def kv_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    """K and V for every layer; NF4 computes (and caches) in 16-bit, so 2 bytes unless float32."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes(dtype)


def activation_peak_bytes(shape: ModelShape, chunk: int, context: int, dtype: str, quantized: bool) -> int:
    """Peak transient memory of one prefill chunk (see the module docstring for each term)."""
    b = dtype_bytes(dtype)
    h, hd = shape.hidden_size, shape.head_dim
    mlp_mats = 2 if shape.architecture == "starcoder2" else 3
    per_token = 2 * h + (shape.num_attention_heads + 2 * shape.num_kv_heads) * hd
    per_token += shape.num_attention_heads * hd + mlp_mats * shape.intermediate_size
    scores = shape.num_attention_heads * chunk * context * 4
    logits = MAX_BATCH * shape.vocab_size * 4
    dequant = h * shape.intermediate_size * 2 if quantized else 0
    return chunk * per_token * b + scores + logits + dequant


def _layer_split(shape: ModelShape) -> tuple[int, int]:
    """(linear, other) params of one decoder layer."""
    linear = shape.decoder_linear_params // shape.num_layers
    return linear, max(0, shape.layer_params - linear)


def _layer_bytes(shape: ModelShape, dtype: str, quantized: bool) -> int:
    linear, other = _layer_split(shape)
    if quantized:
        return other * dtype_bytes(dtype) + math.ceil(NF4_BYTES_PER_PARAM * linear)
    return shape.layer_params * dtype_bytes(dtype)


def context_limits(shape: ModelShape) -> tuple[int, int]:
    """(min, max) context the planner chooses from: 2048..8192, never above the model's maximum."""
    top = shape.max_position_embeddings
    return min(MIN_CONTEXT, top), min(MAX_CONTEXT, top)


# ---------------------------------------------------------------- batch and context


def choose_batch_context(
    tokens: int, shape: ModelShape, overrides: PlanOverrides
) -> tuple[int, int, str, str]:
    """Split a KV budget of `tokens` into (batch, context, batch reason, context reason).

    Longer context first until batch would drop below 4, then more batch, up to 16 × 8192.
    """
    lo, hi = context_limits(shape)
    fb_, fc = overrides.max_batch, overrides.max_context
    if fb_ is not None and fc is not None:
        if fb_ * fc > tokens:
            raise PlanError(
                f"{fb_} sequences × {fc} tokens = {fb_ * fc} KV tokens, but the KV budget holds {tokens}"
            )
        return fb_, fc, describe(overrides, "max_batch"), describe(overrides, "max_context")
    if fc is not None:
        batch = min(MAX_BATCH, tokens // fc)
        if batch < 1:
            raise PlanError(f"one {fc}-token sequence does not fit: the KV budget holds {tokens} tokens")
        return batch, fc, f"{batch} sequences of the forced context fill the KV budget (cap {MAX_BATCH})", describe(
            overrides, "max_context"
        )
    if fb_ is not None:
        ctx = min(hi, tokens // fb_)
        if ctx < lo:
            raise PlanError(
                f"{fb_} sequences × {lo} tokens (the smallest context) = {fb_ * lo} KV tokens, "
                f"but the KV budget holds {tokens}"
            )
        if ctx < hi:
            ctx -= ctx % CONTEXT_STEP
        return fb_, ctx, describe(overrides, "max_batch"), f"longest context (≤ {hi}) the forced batch leaves room for"
    if tokens >= PREFERRED_BATCH * hi:
        batch = min(MAX_BATCH, tokens // hi)
        why_ctx = f"the ceiling: min(8192, the model's max_position_embeddings {shape.max_position_embeddings})"
        why_batch = (
            f"capped at {MAX_BATCH}" if batch == MAX_BATCH else f"{batch} sequences of {hi} tokens fill the KV budget"
        )
        return batch, hi, why_batch, why_ctx
    if tokens >= PREFERRED_BATCH * lo:
        ctx = (tokens // PREFERRED_BATCH) // CONTEXT_STEP * CONTEXT_STEP
        batch = min(MAX_BATCH, tokens // ctx)
        return (
            batch, ctx,
            f"kept at {PREFERRED_BATCH}+ concurrent sequences before growing context further",
            f"longest context (multiple of {CONTEXT_STEP}) that keeps {PREFERRED_BATCH} sequences in the KV budget",
        )
    if tokens >= lo:
        batch = tokens // lo
        return batch, lo, f"only {batch} sequence(s) of {lo} tokens fit the KV budget", "the minimum context"
    raise PlanError(f"the KV budget holds {tokens} tokens, less than one {lo}-token sequence")


# ---------------------------------------------------------------- the plan


class _Candidate:
    """One way to hold the weights on one device: dtype + quantization, and what it costs."""

    def __init__(self, shape: ModelShape, dtype: str, quantized: bool, budget: int, reserve: int,
                 kv_dtype: str | None = None) -> None:
        self.dtype, self.quantized = dtype, quantized
        self.weights = weight_bytes(shape, dtype, quantized)
        self.kv_per_token = kv_bytes_per_token(shape, kv_dtype or dtype)
        self.kv_room = budget - reserve - self.weights
        lo, _ = context_limits(shape)
        self.fits = self.kv_room >= self.kv_per_token * lo
        self.headroom = self.kv_room >= self.kv_per_token * lo * PREFERRED_BATCH
        self.needed_min = self.weights + reserve + self.kv_per_token * lo

    @property
    def label(self) -> str:
        return f"NF4 (+{self.dtype})" if self.quantized else self.dtype


def _pick(cands: list[_Candidate]) -> _Candidate | None:
    """First candidate with room for 4 minimum-context sequences, else the most compact that fits at all."""
    for c in cands:
        if c.headroom:
            return c
    return cands[-1] if cands and cands[-1].fits else None


def pick_gpu(profile: HardwareProfile, gpu_index: int | None) -> GpuInfo | None:
    if not profile.gpus:
        if gpu_index is not None:
            raise PlanError(f"GPU {gpu_index} requested but no GPU was found ({profile.source})")
        return None
    index = 0 if gpu_index is None else gpu_index
    for g in profile.gpus:
        if g.index == index:
            return g
    raise PlanError(f"GPU {index} requested but this machine has GPUs {[g.index for g in profile.gpus]}")


def make_plan(
    shape: ModelShape,
    profile: HardwareProfile,
    overrides: PlanOverrides = PlanOverrides(),
    *,
    gpu_index: int | None = None,
) -> ServingPlan:
    """The serving plan for `shape` on `profile`; raises PlanError when nothing fits."""
    if overrides.max_context is not None and overrides.max_context > shape.max_position_embeddings:
        raise PlanError(
            f"max_context {overrides.max_context} ({describe(overrides, 'max_context')}) exceeds the model's "
            f"max_position_embeddings {shape.max_position_embeddings}"
        )
    gpu = pick_gpu(profile, gpu_index)
    if gpu is None:
        return _plan_cpu(shape, profile, overrides)
    return _plan_gpu(shape, profile, gpu, overrides)


def _context_for_activations(shape: ModelShape, overrides: PlanOverrides) -> int:
    return overrides.max_context or context_limits(shape)[1]


def _common(reasons: dict[str, str], overridden: list[str], overrides: PlanOverrides, chunk: int, chunk_why: str) -> bool:
    """compile and prefill_chunk reasons; returns the compile decision."""
    if overrides.compile is not None:
        overridden.append("compile")
        reasons["compile"] = ("torch.compile on" if overrides.compile else "eager") + ", " + describe(overrides, "compile")
    else:
        reasons["compile"] = "eager by default: torch.compile costs a long warmup and needs Triton; enable with --compile or ENABLE_COMPILE=1"
    reasons["prefill_chunk"] = f"{chunk} prompt tokens per step: {chunk_why}"
    return bool(overrides.compile)


def _dtype_choice(overrides: PlanOverrides, default: str, why: str, reasons: dict, overridden: list) -> str:
    if overrides.dtype is not None:
        overridden.append("dtype")
        reasons["dtype"] = f"{overrides.dtype}, {describe(overrides, 'dtype')}"
        return overrides.dtype
    reasons["dtype"] = f"{default}: {why}"
    return default


def _finish(
    shape: ModelShape, overrides: PlanOverrides, reasons: dict, overridden: list, kv_room: int, kv_per_token: int
) -> tuple[int, int, int]:
    tokens = max(0, kv_room) // kv_per_token
    for field in ("max_batch", "max_context"):
        if getattr(overrides, field) is not None:
            overridden.append(field)
    batch, ctx, why_b, why_c = choose_batch_context(tokens, shape, overrides)
    reasons["max_batch"] = f"{batch}: {why_b}"
    reasons["max_context"] = f"{ctx}: {why_c}"
    kv_tokens = batch * ctx
    reasons["kv_cache_tokens"] = (
        f"{batch} × {ctx} = {kv_tokens} tokens × {kv_per_token} B/token = {fb(kv_tokens * kv_per_token)}, "
        f"out of {fb(kv_room)} left after weights and reserve"
    )
    return batch, ctx, kv_tokens


# ---------------------------------------------------------------- CPU weight format


def format_timings(ms: dict[str, float]) -> dict[str, dict[int, float]]:
    """{"float32@1": 34.0, ...} -> {"float32": {1: 34.0}, ...}; keys without "<format>@<rows>" are skipped."""
    by_format: dict[str, dict[int, float]] = {}
    for key, value in ms.items():
        fmt, _, rows = key.partition("@")
        if rows.isdigit():
            by_format.setdefault(fmt, {})[int(rows)] = value
    return by_format


def _beats(candidate: dict[int, float], base: dict[int, float]) -> bool:
    """Measured at every batch size float32 was, and at least CPU_FORMAT_MARGIN faster at each."""
    return bool(base) and all(b in candidate and candidate[b] <= CPU_FORMAT_MARGIN * base[b] for b in base)


def fastest_cpu_format(ms: dict[str, float]) -> str | None:
    """The weight format to load on CPU given measured timings, or None when float32 was not measured.

    float32 unless another loadable format is at least 10% faster at every measured batch size:
    float32 is the exact one (token for token with transformers), so near-ties keep it."""
    timings = format_timings(ms)
    base = timings.get("float32")
    if not base:
        return None
    faster = [f for f in CPU_WEIGHT_FORMATS if f != "float32" and _beats(timings.get(f, {}), base)]
    return min(faster, key=lambda f: sum(timings[f].values()), default="float32")


def _timings_summary(timings: dict[str, dict[int, float]]) -> str:
    """'float32 34.0 / 63.6, bfloat16 20.7 / 25.8 ms per decode step at batch 1 / 8'."""
    rows = sorted({b for t in timings.values() for b in t})
    per_format = ", ".join(
        f"{fmt} {' / '.join(f'{t[b]:.1f}' if b in t else '-' for b in rows)}" for fmt, t in timings.items())
    return f"{per_format} ms per decode step at batch {' / '.join(map(str, rows))}"


def describe_cpu_formats(ms: dict[str, float]) -> str:
    """The cpu_formats reason: the measured timings and what they cover, or that none were measured yet."""
    timings = format_timings(ms)
    if not timings:
        return ("not measured on this machine for this model yet: the engine times each weight format on the "
                "model's own layer shapes at its first start and caches the result")
    return (f"{_timings_summary(timings)} (every linear + lm_head, random weights at this model's shapes, one "
            "thread); measured at an engine's first start, cached per machine and model")


def cpu_dtype_default(profile: HardwareProfile) -> tuple[str, str]:
    """(dtype, why) for CPU weights: the measured fastest format, else a guess from the CPU flags."""
    measured = fastest_cpu_format(profile.cpu_format_ms)
    if measured is not None:
        summary = _timings_summary(format_timings(profile.cpu_format_ms))
        if measured == "float32":
            return "float32", (f"measured on this CPU at this model's shapes, no other format is {1 - CPU_FORMAT_MARGIN:.0%} "
                               f"faster at every batch size, and fp32 is exact: {summary}")
        return measured, (f"measured on this CPU at this model's shapes, at least {1 - CPU_FORMAT_MARGIN:.0%} faster "
                          f"than float32 at every batch size: {summary}")
    guess = "not measured yet, so a guess from the CPU flags (the engine measures at its first start)"
    if profile.cpu_bf16:
        return "bfloat16", (f"{guess}: this CPU computes bf16 natively (avx512_bf16/amx_bf16), half the weight "
                            "traffic of fp32 (measured on a 2-core EPYC: 33 vs 54 ms per decode step at batch 1)")
    return "float32", f"{guess}: no native bf16 (no avx512_bf16/amx_bf16), so bf16 matmuls may be emulated, slower than fp32"


def _plan_cpu(shape: ModelShape, profile: HardwareProfile, overrides: PlanOverrides) -> ServingPlan:
    reasons: dict[str, str] = {}
    overridden: list[str] = []
    budget = profile.ram_available_bytes
    chunk = CPU_PREFILL_CHUNK
    reasons["device"] = f"cpu: no GPU ({profile.source}); {profile.cpu_cores} cores, {fb(budget)} RAM available"
    if overrides.gpu_memory_fraction is not None:
        reasons["device"] += f"; gpu_memory_fraction ignored ({describe(overrides, 'gpu_memory_fraction')})"
    default, why = cpu_dtype_default(profile)
    dtype = _dtype_choice(overrides, default, why, reasons, overridden)

    def reserve_for(d: str, q: bool) -> int:
        act = activation_peak_bytes(shape, chunk, _context_for_activations(shape, overrides), d, q)
        return max(CPU_RESERVE_MIN, int(CPU_RESERVE_FRACTION * budget)) + act

    if overrides.gpu_layers is not None and overrides.gpu_layers < shape.num_layers:
        return _plan_disk_offload(shape, profile, overrides, dtype, budget, reserve_for(dtype, False), chunk,
                                  reasons, overridden)

    options: list[tuple[str, bool]] = []
    if overrides.quantization != "nf4":
        options.append((dtype, False))
        if overrides.dtype is None and dtype == "float32":
            options.append(("bfloat16", False))
    if overrides.quantization != "none":
        options.append((overrides.dtype or "bfloat16", True))  # bnb's CPU 4-bit kernels compute in bf16
    cands = [_Candidate(shape, d, q, budget, reserve_for(d, q), CPU_KV_DTYPE) for d, q in options]
    chosen = _pick(cands)
    if chosen is None:
        smallest = min(cands, key=lambda c: c.needed_min)
        raise PlanError(
            f"{shape.name} ({shape.total_params / 1e9:.2f}B params) does not fit on this CPU-only machine: "
            f"the smallest plan, {smallest.label}, needs {fb(smallest.needed_min)} "
            f"(weights {fb(smallest.weights)} + KV cache for one {context_limits(shape)[0]}-token sequence "
            f"{fb(smallest.kv_per_token * context_limits(shape)[0])} + reserve {fb(budget - smallest.kv_room - smallest.weights)}), "
            f"but only {fb(budget)} of RAM is available (GPU_LAYERS=N keeps N decoder layers in RAM and "
            "reads the rest from disk on every forward: it runs, slowly)"
        )
    if chosen.dtype != dtype:
        reasons["dtype"] = f"{chosen.dtype}: {dtype} weights ({fb(weight_bytes(shape, dtype, False))}) leave too little RAM for a KV cache"
    reserve = budget - chosen.kv_room - chosen.weights
    if overrides.quantization is not None:
        overridden.append("quantization")
        reasons["quantization"] = f"{'NF4' if chosen.quantized else 'none'}, {describe(overrides, 'quantization')}"
    elif chosen.quantized:
        reasons["quantization"] = (
            f"NF4 with double quantization: 16-bit weights ({fb(weight_bytes(shape, chosen.dtype, False))}) do not fit "
            f"{fb(budget)} RAM with room for a KV cache; bitsandbytes' CPU 4-bit kernels are slow (memory tool, not speed)"
        )
    else:
        reasons["quantization"] = f"none: {chosen.dtype} weights ({fb(chosen.weights)}) fit in RAM with room for a KV cache"
    if overrides.cpu_offload is not None:
        overridden.append("cpu_offload")
        reasons["offload"] = f"none: weights are already in RAM; {describe(overrides, 'cpu_offload')} has no effect without a GPU (disk offload is too slow to serve)"
    else:
        reasons["offload"] = "none: no GPU, all weights in RAM"
    if overrides.gpu_layers is not None:
        overridden.append("gpu_layers")
        reasons["offload"] += (f"; all {shape.num_layers} layers in RAM ({describe(overrides, 'gpu_layers')}, "
                               "which counts layers kept in RAM on a CPU-only machine)")
    batch, ctx, kv_tokens = _finish(shape, overrides, reasons, overridden, chosen.kv_room, chosen.kv_per_token)
    compile_ = _common(reasons, overridden, overrides, chunk, "small chunks keep inter-token latency bounded on a few cores")
    reasons["device"] += f"; reserve {fb(reserve)} = max(2 GiB, 20% of available) for OS and frontend + activation peak"
    reasons["kv_dtype"] = CPU_KV_REASON
    reasons["cpu_formats"] = describe_cpu_formats(profile.cpu_format_ms)
    return ServingPlan(
        kv_dtype=CPU_KV_DTYPE, device="cpu", dtype=chosen.dtype, quantization="nf4" if chosen.quantized else None,
        double_quant=chosen.quantized, offload=False, device_map=None, max_batch=batch, max_context=ctx,
        kv_cache_tokens=kv_tokens, weights_bytes=chosen.weights, compile=compile_, prefill_chunk=chunk,
        reasons=reasons, overridden=overridden, max_memory=None, kv_bytes_per_token=chosen.kv_per_token,
        kv_cache_bytes=kv_tokens * chosen.kv_per_token, reserve_bytes=reserve, budget_bytes=budget,
        offload_bytes=0, total_params=shape.total_params, model=shape.name, cpu_format_ms=dict(profile.cpu_format_ms),
    )


def _plan_disk_offload(
    shape: ModelShape, profile: HardwareProfile, overrides: PlanOverrides, dtype: str, budget: int, reserve: int,
    chunk: int, reasons: dict, overridden: list,
) -> ServingPlan:
    """CPU-only, `gpu_layers` (read as "decoder layers kept in RAM") < all: the rest go to disk.

    accelerate's disk offload: the offloaded layers' weights stay in the safetensors checkpoint (or are
    written once to an offload folder) and are memory-mapped; an AlignDevicesHook on each of their
    modules reads the weights in before that module runs and drops them after. RAM then holds the
    embeddings, norms, the kept layers, the KV cache and one streamed layer at a time (the kernel's
    page cache may keep the file's pages around, but it can always reclaim them). bitsandbytes
    quantizes while loading into RAM, so NF4 is not combined with disk offload.
    """
    L, b, kept = shape.num_layers, dtype_bytes(dtype), overrides.gpu_layers
    if overrides.cpu_offload is False:
        overridden.append("cpu_offload")
        raise PlanError(
            f"{describe(overrides, 'gpu_layers')} keeps {kept} of {L} layers in RAM, which needs disk offload, "
            f"but offload is off ({describe(overrides, 'cpu_offload')})"
        )
    if overrides.quantization == "nf4":
        raise PlanError(
            f"NF4 ({describe(overrides, 'quantization')}) cannot be combined with disk offload "
            f"({describe(overrides, 'gpu_layers')}): bitsandbytes quantizes layers as they are loaded into RAM; "
            "drop one of the two"
        )
    overridden.append("gpu_layers")
    if overrides.cpu_offload is not None:
        overridden.append("cpu_offload")
    if overrides.quantization is not None:
        overridden.append("quantization")
    layers_other = L * _layer_split(shape)[1]
    fixed = (shape.embedding_params + shape.lm_head_params + max(0, shape.other_params - layers_other)) * b
    layer = shape.layer_params * b
    on_disk = L - kept
    ram_weights = fixed + kept * layer
    disk_bytes = on_disk * layer
    stream = layer  # one disk layer's weights materialized while it runs (module by module, so at most this)
    kv_per_token = kv_bytes_per_token(shape, CPU_KV_DTYPE)
    kv_room = budget - reserve - ram_weights - stream
    reasons["quantization"] = (
        f"none: disk offload keeps {dtype} weights (bitsandbytes cannot quantize layers that live on disk)"
        + (f", {describe(overrides, 'quantization')}" if overrides.quantization is not None else "")
    )
    reasons["offload"] = (
        f"{kept} of {L} decoder layers in RAM, {on_disk} on disk ({fb(disk_bytes)}), "
        f"{describe(overrides, 'gpu_layers')} (layers kept in RAM on a CPU-only machine): accelerate disk offload, "
        "weights memory-mapped from the checkpoint or the offload folder and read in on every forward, "
        "so each step is bound by disk and page-cache reads"
    )
    batch, ctx, kv_tokens = _finish(shape, overrides, reasons, overridden, kv_room, kv_per_token)
    compile_ = _common(reasons, overridden, overrides, chunk, "small chunks keep inter-token latency bounded on a few cores")
    reasons["device"] += (
        f"; reserve {fb(reserve)} = max(2 GiB, 20% of available) for OS and frontend + activation peak, "
        f"plus {fb(stream)} for the layer streamed from disk"
    )
    device_map: dict[str, str | int] = {"model.embed_tokens": "cpu"}
    if shape.architecture in ACCELERATE_LAYOUT or shape.source.endswith(".gguf"):
        device_map["model.rotary_emb"] = "cpu"
    for i in range(L):
        device_map[f"model.layers.{i}"] = "cpu" if i < kept else "disk"
    device_map["model.norm"] = "cpu"
    device_map["lm_head"] = "cpu"
    reasons["kv_dtype"] = CPU_KV_REASON
    reasons["cpu_formats"] = describe_cpu_formats(profile.cpu_format_ms)
    return ServingPlan(
        kv_dtype=CPU_KV_DTYPE, device="cpu", dtype=dtype, quantization=None, double_quant=False, offload=True, device_map=device_map,
        max_batch=batch, max_context=ctx, kv_cache_tokens=kv_tokens, weights_bytes=ram_weights + disk_bytes,
        compile=compile_, prefill_chunk=chunk, reasons=reasons, overridden=overridden, max_memory=None,
        kv_bytes_per_token=kv_per_token, kv_cache_bytes=kv_tokens * kv_per_token, reserve_bytes=reserve + stream,
        budget_bytes=budget, offload_bytes=disk_bytes, total_params=shape.total_params, model=shape.name,
        cpu_format_ms=dict(profile.cpu_format_ms),
    )


def _gpu_chunk(gpu: GpuInfo) -> tuple[int, str]:
    if gpu.total_bytes >= 40 * GiB:
        return 2048, "large GPU: long chunks keep prefill efficient and the scores buffer small next to memory"
    if gpu.total_bytes >= 20 * GiB:
        return 1024, "mid-size GPU: balances prefill throughput against the activation peak"
    return 512, "small GPU: bounds the activation peak (attention scores grow with chunk × context)"


def _plan_gpu(shape: ModelShape, profile: HardwareProfile, gpu: GpuInfo, overrides: PlanOverrides) -> ServingPlan:
    reasons: dict[str, str] = {}
    overridden: list[str] = []
    gi = gpu.index
    cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
    frac = overrides.gpu_memory_fraction if overrides.gpu_memory_fraction is not None else GPU_FRACTION
    budget = min(int(gpu.total_bytes * frac), gpu.free_bytes)
    others = f"; {len(profile.gpus)} GPUs: one engine per GPU (cli.py engine --gpu N)" if len(profile.gpus) > 1 else ""
    reasons["device"] = (
        f"cuda:{gi}: {gpu.name}, {fb(gpu.total_bytes)} total, {fb(gpu.free_bytes)} free, cc {cc} (from {profile.source}){others}"
    )
    if overrides.gpu_memory_fraction is not None:
        overridden.append("gpu_memory_fraction")
    chunk, chunk_why = _gpu_chunk(gpu)
    if gpu.compute_capability >= (8, 0):
        default, why = "bfloat16", f"compute capability {cc} ≥ 8.0 has native bf16"
    else:
        default, why = "float16", f"compute capability {cc} < 8.0: bf16 is emulated there (check warmup logits for NaN)"
    dtype = _dtype_choice(overrides, default, why, reasons, overridden)

    ctx_act = _context_for_activations(shape, overrides)

    def reserve_for(q: bool) -> int:
        return GPU_OVERHEAD + activation_peak_bytes(shape, chunk, ctx_act, dtype, q)

    options = []
    if overrides.quantization != "nf4":
        options.append(False)
    if overrides.quantization != "none":
        options.append(True)
    cands = [_Candidate(shape, dtype, q, budget, reserve_for(q)) for q in options]
    forced_split = overrides.gpu_layers is not None and overrides.gpu_layers < shape.num_layers
    if forced_split and overrides.cpu_offload is False:
        raise PlanError(
            f"{describe(overrides, 'gpu_layers')} keeps {overrides.gpu_layers} of {shape.num_layers} layers on the GPU, "
            f"which needs CPU offload, but offload is off ({describe(overrides, 'cpu_offload')})"
        )
    chosen = None if (overrides.cpu_offload or forced_split) else _pick(cands)
    budget_why = (
        f"budget {fb(budget)} = {frac:.0%} of total" + (" (capped by free memory)" if budget == gpu.free_bytes else "")
        + (f" ({describe(overrides, 'gpu_memory_fraction')})" if overrides.gpu_memory_fraction is not None else "")
    )
    if overrides.quantization is not None:
        overridden.append("quantization")

    if chosen is not None:
        reserve = reserve_for(chosen.quantized)
        if overrides.quantization is not None:
            reasons["quantization"] = f"{'NF4' if chosen.quantized else 'none'}, {describe(overrides, 'quantization')}"
        elif chosen.quantized:
            reasons["quantization"] = (
                f"NF4 with double quantization, compute in {dtype}: {dtype} weights "
                f"({fb(weight_bytes(shape, dtype, False))}) do not leave room for {PREFERRED_BATCH} × "
                f"{context_limits(shape)[0]}-token sequences in the {budget_why}; NF4 weights are {fb(chosen.weights)}"
            )
        else:
            reasons["quantization"] = f"none: {dtype} weights ({fb(chosen.weights)}) fit the {budget_why} with room for a KV cache"
        if overrides.cpu_offload is False:
            overridden.append("cpu_offload")
            reasons["offload"] = f"none, {describe(overrides, 'cpu_offload')}"
        else:
            reasons["offload"] = "none: all weights fit on the GPU"
        if overrides.gpu_layers is not None:
            overridden.append("gpu_layers")
            reasons["offload"] += f"; all {shape.num_layers} layers on the GPU ({describe(overrides, 'gpu_layers')})"
        batch, ctx, kv_tokens = _finish(shape, overrides, reasons, overridden, chosen.kv_room, chosen.kv_per_token)
        compile_ = _common(reasons, overridden, overrides, chunk, chunk_why)
        reasons["cuda_graphs"] = ("yes: decode steps replay CUDA graphs captured at warmup per batch and key-span bucket "
                                  "(one launch per step instead of hundreds of kernels); prompt chunks run eager")
        reasons["device"] += f"; {budget_why}, reserve {fb(reserve)} = 1 GiB CUDA context/workspaces + activation peak"
        return ServingPlan(
            device=f"cuda:{gi}", dtype=dtype, quantization="nf4" if chosen.quantized else None,
            double_quant=chosen.quantized, offload=False, device_map={"": gi}, max_batch=batch, max_context=ctx,
            kv_cache_tokens=kv_tokens, weights_bytes=chosen.weights, compile=compile_, cuda_graphs=True, prefill_chunk=chunk,
            reasons=reasons, overridden=overridden, max_memory={str(gi): budget - reserve - kv_tokens * chosen.kv_per_token},
            kv_bytes_per_token=chosen.kv_per_token, kv_cache_bytes=kv_tokens * chosen.kv_per_token,
            reserve_bytes=reserve, budget_bytes=budget, offload_bytes=0, total_params=shape.total_params, model=shape.name,
        )

    # Offload: the first layers on the GPU, the rest in RAM, streamed to the GPU on each forward.
    if overrides.cpu_offload is False and not forced_split:
        overridden.append("cpu_offload")
        smallest = min(cands, key=lambda c: c.needed_min)
        raise PlanError(
            f"{shape.name} does not fit on cuda:{gi} and CPU offload is off ({describe(overrides, 'cpu_offload')}): "
            f"the smallest plan, {smallest.label}, needs {fb(smallest.needed_min)} of GPU memory, "
            f"{budget_why} available"
        )
    forced = overrides.cpu_offload or forced_split
    quantized = overrides.quantization == "nf4" or (overrides.quantization is None and not forced)
    return _plan_offload(shape, profile, gpu, overrides, dtype, quantized, budget, budget_why, reserve_for(quantized),
                         chunk, chunk_why, reasons, overridden)


class _Placement(NamedTuple):
    """Where the embedding table and lm_head live in an offload plan, and what is left on the GPU."""

    embed_on_cpu: bool
    lm_head_on_cpu: bool
    cpu_bytes: int  # their weight bytes moved to RAM
    fixed_gpu: int  # embeddings + lm_head + final norm (whichever stay) on the GPU
    on_gpu: int  # decoder layers on the GPU
    stream: int  # one offloaded layer materialized on the GPU while it runs (0 when none is offloaded)


def _head_options(shape: ModelShape) -> list[tuple[bool, bool]]:
    """(embeddings on CPU, lm_head on CPU), fastest first. Tied weights are one tensor, so one device."""
    if shape.lm_head_params == 0:
        return [(False, False), (True, True)]
    return [(False, False), (True, False), (True, True)]


def _place(shape: ModelShape, embed_on_cpu: bool, lm_head_on_cpu: bool, b: int, gpu_layer: int, cpu_layer: int,
           free_for_weights: int, must_offload: bool) -> _Placement:
    """How many decoder layers fit in `free_for_weights` (GPU budget - reserve - minimum KV) for one placement."""
    layers_other = shape.num_layers * _layer_split(shape)[1]
    heads = shape.embedding_params + shape.lm_head_params
    cpu_params = (shape.embedding_params if embed_on_cpu else 0) + (shape.lm_head_params if lm_head_on_cpu else 0)
    fixed_gpu = (heads - cpu_params + max(0, shape.other_params - layers_other)) * b
    room = free_for_weights - fixed_gpu
    L = shape.num_layers
    if not must_offload and room >= L * gpu_layer:
        return _Placement(embed_on_cpu, lm_head_on_cpu, cpu_params * b, fixed_gpu, L, 0)
    on_gpu = max(-1, min(L - 1 if must_offload else L, (room - cpu_layer) // gpu_layer))
    return _Placement(embed_on_cpu, lm_head_on_cpu, cpu_params * b, fixed_gpu, on_gpu, cpu_layer)


def _describe_heads(shape: ModelShape, placement: _Placement, gi: int) -> str:
    """Where the embeddings and lm_head live, and why, in words (the `embed_lm_head` reason)."""
    size = fb(placement.cpu_bytes)
    if not placement.embed_on_cpu:
        return f"on cuda:{gi}: with them there, the GPU still holds {placement.on_gpu} decoder layer(s)"
    if shape.lm_head_params == 0:
        return (f"embeddings and the tied lm_head in RAM ({size}), to leave GPU room for decoder layers: the lookup "
                "is cheap on CPU, but the output projection is a CPU matmul per step (slow, but it runs)")
    if placement.lm_head_on_cpu:
        return (f"embeddings and lm_head in RAM ({size}), to leave GPU room for decoder layers: the lookup is cheap "
                "on CPU, the lm_head is a CPU matmul per step (slow, but it runs)")
    return (f"embeddings in RAM ({size}), to leave GPU room for decoder layers: the lookup of a few rows is cheap "
            "on CPU, only the hidden rows cross PCIe")


def _plan_offload(
    shape: ModelShape, profile: HardwareProfile, gpu: GpuInfo, overrides: PlanOverrides, dtype: str, quantized: bool,
    budget: int, budget_why: str, reserve: int, chunk: int, chunk_why: str, reasons: dict, overridden: list,
) -> ServingPlan:
    """First decoder layers on the GPU, the rest in RAM, streamed to the GPU on each forward.

    The embeddings (then the lm_head) move to RAM only when keeping them on the GPU leaves no room for
    the decoder layers asked for (one, or `gpu_layers`): a GPU layer saves a PCIe copy per step.
    """
    gi, b, L = gpu.index, dtype_bytes(dtype), shape.num_layers
    lo, _ = context_limits(shape)
    kv_per_token = kv_bytes_per_token(shape, dtype)
    gpu_layer = _layer_bytes(shape, dtype, quantized)
    cpu_layer = shape.layer_params * b  # the loader casts offloaded layers to the compute dtype, NF4 or not
    kv_min = kv_per_token * lo
    free_for_weights = budget - reserve - kv_min
    ram_budget = profile.ram_available_bytes - max(CPU_RESERVE_MIN, int(CPU_RESERVE_FRACTION * profile.ram_available_bytes))
    if overrides.gpu_layers is not None:
        overridden.append("gpu_layers")
    wanted = overrides.gpu_layers if overrides.gpu_layers is not None else 1
    must_offload = bool(overrides.cpu_offload) and overrides.gpu_layers is None
    placements = [_place(shape, e, h, b, gpu_layer, cpu_layer, free_for_weights, must_offload)
                  for e, h in _head_options(shape)]
    chosen = next((p for p in placements if p.on_gpu >= wanted), None)
    if chosen is None:
        last = placements[-1]
        if overrides.gpu_layers is None or last.on_gpu < 1:
            raise PlanError(
                f"{shape.name} cannot run on cuda:{gi} even with CPU offload and embeddings and lm_head in RAM: "
                f"one decoder layer, one streamed layer, reserve and KV for one {lo}-token sequence need "
                f"{fb(budget - free_for_weights + last.fixed_gpu + last.stream + gpu_layer)} of GPU memory, "
                f"{budget_why} available (try --cpu-only)"
            )
        raise PlanError(
            f"{overrides.gpu_layers} layers on cuda:{gi} ({describe(overrides, 'gpu_layers')}) need "
            f"{fb(budget - free_for_weights + last.fixed_gpu + last.stream + overrides.gpu_layers * gpu_layer)} "
            f"of GPU memory, {budget_why} available; at most {last.on_gpu} fit"
            + (" with embeddings and lm_head in RAM" if last.embed_on_cpu else "")
        )
    on_gpu = overrides.gpu_layers if overrides.gpu_layers is not None else chosen.on_gpu
    on_gpu = min(on_gpu, L)
    stream = chosen.stream if on_gpu < L else 0
    on_cpu = L - on_gpu
    offload_bytes = on_cpu * cpu_layer + chosen.cpu_bytes
    if offload_bytes > ram_budget:
        raise PlanError(
            f"{shape.name} ({shape.total_params / 1e9:.2f}B params) does not fit in GPU + RAM: it needs "
            f"{fb(budget - free_for_weights + chosen.fixed_gpu + stream + on_gpu * gpu_layer)} on cuda:{gi} "
            f"({budget_why}) plus {fb(offload_bytes)} of RAM for {on_cpu} offloaded layers"
            + (" and the embeddings/lm_head" if chosen.cpu_bytes else "")
            + f", but only {fb(max(0, ram_budget))} of RAM is usable "
            f"({fb(profile.ram_available_bytes)} available minus the OS/frontend reserve)"
        )
    gpu_weights = chosen.fixed_gpu + on_gpu * gpu_layer
    kv_room = budget - reserve - gpu_weights - stream

    if overrides.quantization is not None:
        reasons["quantization"] = f"{'NF4' if quantized else 'none'}, {describe(overrides, 'quantization')}"
    elif quantized:
        reasons["quantization"] = (
            f"NF4 with double quantization, compute in {dtype}: even NF4 weights "
            f"({fb(weight_bytes(shape, dtype, True))}) do not fit the {budget_why} with a KV cache"
        )
    else:
        reasons["quantization"] = "none: offload was forced, so 16-bit weights are split between GPU and RAM"
    if overrides.gpu_layers is not None:
        why = describe(overrides, "gpu_layers")
    elif overrides.cpu_offload:
        why = describe(overrides, "cpu_offload")
    else:
        why = "the weights do not fit on the GPU"
    if overrides.cpu_offload is not None:
        overridden.append("cpu_offload")
    reasons["embed_lm_head"] = _describe_heads(shape, chosen, gi)
    layers_why = (f"{on_gpu} of {L} layers on cuda:{gi}, {on_cpu} in RAM ({fb(on_cpu * cpu_layer)}), {why}"
                  + (f"; {reasons['embed_lm_head']}" if chosen.embed_on_cpu else ""))
    streamed = ("; offloaded layers are copied to the GPU on every forward, so decode is bound by PCIe" if on_cpu
                else "")
    reasons["offload"] = (
        layers_why + streamed
        + (f"; load with BitsAndBytesConfig(llm_int8_enable_fp32_cpu_offload=True): CPU layers stay unquantized, "
           f"in {dtype}" if quantized else "")
    )
    batch, ctx, kv_tokens = _finish(shape, overrides, reasons, overridden, kv_room, kv_per_token)
    compile_ = _common(reasons, overridden, overrides, chunk, chunk_why)
    reasons["cuda_graphs"] = "no: offloaded weights are moved by host-side hooks on every forward, which a graph cannot replay"
    reasons["device"] += (
        f"; {budget_why}, reserve {fb(reserve)} = 1 GiB CUDA context/workspaces + activation peak, "
        f"plus {fb(stream)} for the streamed layer"
    )
    device_map: dict[str, str | int] = {"model.embed_tokens": "cpu" if chosen.embed_on_cpu else gi}
    if shape.architecture in ACCELERATE_LAYOUT or shape.source.endswith(".gguf"):
        device_map["model.rotary_emb"] = gi
    for i in range(L):
        device_map[f"model.layers.{i}"] = gi if i < on_gpu else "cpu"
    device_map["model.norm"] = gi
    device_map["lm_head"] = "cpu" if chosen.lm_head_on_cpu else gi
    return ServingPlan(
        device=f"cuda:{gi}", dtype=dtype, quantization="nf4" if quantized else None, double_quant=quantized,
        offload=True, device_map=device_map, max_batch=batch, max_context=ctx, kv_cache_tokens=kv_tokens,
        weights_bytes=gpu_weights + offload_bytes, compile=compile_, prefill_chunk=chunk, reasons=reasons,
        overridden=overridden, max_memory={str(gi): gpu_weights, "cpu": ram_budget},
        kv_bytes_per_token=kv_per_token, kv_cache_bytes=kv_tokens * kv_per_token, reserve_bytes=reserve + stream,
        budget_bytes=budget, offload_bytes=offload_bytes, total_params=shape.total_params, model=shape.name,
    )
