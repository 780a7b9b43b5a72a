"""Offload policies: weights that do not fit the device go one level down, layer by layer.

GPU offload (the weights do not fit with a KV cache): the GPU holds the reserve, KV for at least one
minimum-context sequence, the embeddings, lm_head and final norm, the first N decoder layers, and one
offloaded layer while it runs (b × layer params, NF4 too: bitsandbytes does not quantize CPU layers;
transformers 5 loads them in the compute dtype, and the loader casts any left in fp32). RAM holds the
other layers at b × layer params. If that leaves no room for one decoder layer on the GPU, the embedding
table moves to RAM (a row lookup on CPU; only hidden rows cross PCIe), then the lm_head (a CPU matmul
per step); tied embeddings and lm_head are one tensor and move together. Their b × params then count in
RAM (offload_bytes) instead of on the GPU (max_memory); their CPU activations (chunk × hidden, batch ×
vocab) fall within the RAM reserve. The plan says so with device_map "cpu" for `model.embed_tokens` /
`lm_head`. Refused when even then no decoder layer fits.

Disk offload (CPU-only, fewer decoder layers kept in RAM than the model has): see `plan_disk_offload`.
"""

from __future__ import annotations

from typing import NamedTuple

from hardware.profile import HardwareProfile
from hardware.profile import format_bytes as fb
from model.shape import ACCELERATE_LAYOUT, ModelShape
from planning.batch import min_context
from planning.builder import PlanBuilder
from planning.cpu_dtype import CPU_KV_DTYPE, cpu_plan_fields
from planning.dtypes import dtype_bytes
from planning.memory import (
    head_params,
    kv_bytes_per_token,
    layer_bytes,
    outside_layers_bytes,
    ram_reserve,
    weight_bytes,
)
from planning.overrides import describe
from planning.plan import PlanError, ServingPlan


class GpuBudget(NamedTuple):
    index: int
    bytes: int  # device memory the plan may use
    why: str  # 'budget 14.4 GiB = 90% of total ...', for reasons and refusals


def split_device_map(
    shape: ModelShape, home: str | int, kept: int, rest: str, embed: str | int, lm_head: str | int
) -> dict[str, str | int]:
    """accelerate device_map: the first `kept` decoder layers on `home`, the others on `rest`; the final
    norm (and rotary embedding) on `home`; the embeddings and lm_head where given."""
    device_map: dict[str, str | int] = {"model.embed_tokens": embed}
    if shape.architecture in ACCELERATE_LAYOUT or shape.source.endswith(".gguf"):
        device_map["model.rotary_emb"] = home
    for i in range(shape.num_layers):
        device_map[f"model.layers.{i}"] = home if i < kept else rest
    device_map["model.norm"] = home
    device_map["lm_head"] = lm_head
    return device_map


# ---------------------------------------------------------------- GPU -> RAM


class Placement(NamedTuple):
    """Where the embedding table and lm_head live in an offload plan, and what is left on the GPU."""

    embed_on_cpu: bool
    lm_head_on_cpu: bool
    cpu_bytes: int  # their weight bytes moved to RAM
    fixed_gpu: int  # embeddings + lm_head + final norm (whichever stay) on the GPU
    on_gpu: int  # decoder layers on the GPU
    stream: int  # one offloaded layer materialized on the GPU while it runs (0 when none is offloaded)


def head_options(shape: ModelShape) -> list[tuple[bool, bool]]:
    """(embeddings on CPU, lm_head on CPU), fastest first. Tied weights are one tensor, so one device."""
    if shape.lm_head_params == 0:
        return [(False, False), (True, True)]
    return [(False, False), (True, False), (True, True)]


def place(
    shape: ModelShape,
    embed_on_cpu: bool,
    lm_head_on_cpu: bool,
    dtype: str,
    gpu_layer: int,
    cpu_layer: int,
    free_for_weights: int,
    must_offload: bool,
) -> Placement:
    """How many decoder layers fit in `free_for_weights` (GPU budget - reserve - minimum KV) for one placement."""
    cpu_params = head_params(shape, embed_on_cpu, lm_head_on_cpu)
    fixed_gpu = outside_layers_bytes(shape, dtype, moved_params=cpu_params)
    room = free_for_weights - fixed_gpu
    L, cpu_bytes = shape.num_layers, cpu_params * dtype_bytes(dtype)
    if not must_offload and room >= L * gpu_layer:
        return Placement(embed_on_cpu, lm_head_on_cpu, cpu_bytes, fixed_gpu, L, 0)
    on_gpu = max(-1, min(L - 1 if must_offload else L, (room - cpu_layer) // gpu_layer))
    return Placement(embed_on_cpu, lm_head_on_cpu, cpu_bytes, fixed_gpu, on_gpu, cpu_layer)


def describe_heads(shape: ModelShape, placement: Placement, gi: int) -> str:
    """Where the embeddings and lm_head live, and why, in words (the `embed_lm_head` reason)."""
    size = fb(placement.cpu_bytes)
    if not placement.embed_on_cpu:
        return f"on cuda:{gi}: with them there, the GPU still holds {placement.on_gpu} decoder layer(s)"
    if shape.lm_head_params == 0:
        return (
            f"embeddings and the tied lm_head in RAM ({size}), to leave GPU room for decoder layers: the lookup "
            "is cheap on CPU, but the output projection is a CPU matmul per step (slow, but it runs)"
        )
    if placement.lm_head_on_cpu:
        return (
            f"embeddings and lm_head in RAM ({size}), to leave GPU room for decoder layers: the lookup is cheap "
            "on CPU, the lm_head is a CPU matmul per step (slow, but it runs)"
        )
    return (
        f"embeddings in RAM ({size}), to leave GPU room for decoder layers: the lookup of a few rows is cheap "
        "on CPU, only the hidden rows cross PCIe"
    )


def _choose_placement(
    builder: PlanBuilder, gpu: GpuBudget, dtype: str, gpu_layer: int, cpu_layer: int, free_for_weights: int
) -> Placement:
    """The fastest placement that keeps the decoder layers asked for (one, or `gpu_layers`) on the GPU."""
    shape, o = builder.shape, builder.overrides
    wanted = o.gpu_layers if o.gpu_layers is not None else 1
    must_offload = bool(o.cpu_offload) and o.gpu_layers is None
    placements = [
        place(shape, e, h, dtype, gpu_layer, cpu_layer, free_for_weights, must_offload) for e, h in head_options(shape)
    ]
    chosen = next((p for p in placements if p.on_gpu >= wanted), None)
    if chosen is not None:
        return chosen
    last = placements[-1]
    fixed = gpu.bytes - free_for_weights + last.fixed_gpu + last.stream  # reserve, minimum KV, heads, streamed layer
    if o.gpu_layers is None or last.on_gpu < 1:
        raise PlanError(
            f"{shape.name} cannot run on cuda:{gpu.index} even with CPU offload and embeddings and lm_head in RAM: "
            f"one decoder layer, one streamed layer, reserve and KV for one {min_context(shape)}-token sequence "
            f"need {fb(fixed + gpu_layer)} of GPU memory, {gpu.why} available (try --cpu-only)"
        )
    raise PlanError(
        f"{o.gpu_layers} layers on cuda:{gpu.index} ({describe(o, 'gpu_layers')}) need "
        f"{fb(fixed + o.gpu_layers * gpu_layer)} of GPU memory, {gpu.why} available; at most {last.on_gpu} fit"
        + (" with embeddings and lm_head in RAM" if last.embed_on_cpu else "")
    )


def _explain_gpu_offload(
    builder: PlanBuilder, chosen: Placement, gpu: GpuBudget, dtype: str, quantized: bool, on_gpu: int, cpu_layer: int
) -> None:
    shape, o, reasons = builder.shape, builder.overrides, builder.reasons
    L = shape.num_layers
    on_cpu = L - on_gpu
    builder.explain_quantization(
        quantized,
        (
            f"NF4 with double quantization, compute in {dtype}: even NF4 weights "
            f"({fb(weight_bytes(shape, dtype, True))}) do not fit the {gpu.why} with a KV cache"
        )
        if quantized
        else "none: offload was forced, so 16-bit weights are split between GPU and RAM",
    )
    if o.gpu_layers is not None:
        why = describe(o, "gpu_layers")
    elif o.cpu_offload:
        why = describe(o, "cpu_offload")
    else:
        why = "the weights do not fit on the GPU"
    reasons["embed_lm_head"] = describe_heads(shape, chosen, gpu.index)
    reasons["offload"] = (
        f"{on_gpu} of {L} layers on cuda:{gpu.index}, {on_cpu} in RAM ({fb(on_cpu * cpu_layer)}), {why}"
        + (f"; {reasons['embed_lm_head']}" if chosen.embed_on_cpu else "")
        + ("; offloaded layers are copied to the GPU on every forward, so decode is bound by PCIe" if on_cpu else "")
        + (
            f"; load with BitsAndBytesConfig(llm_int8_enable_fp32_cpu_offload=True): CPU layers stay unquantized, "
            f"in {dtype}"
            if quantized
            else ""
        )
    )
    reasons["cuda_graphs"] = (
        "no: offloaded weights are moved by host-side hooks on every forward, which a graph cannot replay"
    )


def plan_gpu_offload(
    builder: PlanBuilder, profile: HardwareProfile, gpu: GpuBudget, dtype: str, quantized: bool, reserve: int
) -> ServingPlan:
    """First decoder layers on the GPU, the rest in RAM, streamed to the GPU on each forward.

    The embeddings (then the lm_head) move to RAM only when keeping them on the GPU leaves no room for
    the decoder layers asked for (one, or `gpu_layers`): a GPU layer saves a PCIe copy per step.
    """
    shape, o, gi, L = builder.shape, builder.overrides, gpu.index, builder.shape.num_layers
    kv_per_token = kv_bytes_per_token(shape, dtype)
    gpu_layer = layer_bytes(shape, dtype, quantized)
    cpu_layer = shape.layer_params * dtype_bytes(dtype)  # the loader casts offloaded layers to the compute dtype
    free_for_weights = gpu.bytes - reserve - kv_per_token * min_context(shape)
    chosen = _choose_placement(builder, gpu, dtype, gpu_layer, cpu_layer, free_for_weights)
    on_gpu = min(o.gpu_layers if o.gpu_layers is not None else chosen.on_gpu, L)
    stream = chosen.stream if on_gpu < L else 0
    on_cpu = L - on_gpu
    offload_bytes = on_cpu * cpu_layer + chosen.cpu_bytes
    gpu_weights = chosen.fixed_gpu + on_gpu * gpu_layer
    ram_budget = profile.ram_available_bytes - ram_reserve(profile.ram_available_bytes)
    if offload_bytes > ram_budget:
        raise PlanError(
            f"{shape.name} ({shape.total_params / 1e9:.2f}B params) does not fit in GPU + RAM: it needs "
            f"{fb(gpu.bytes - free_for_weights + gpu_weights + stream)} on cuda:{gi} "
            f"({gpu.why}) plus {fb(offload_bytes)} of RAM for {on_cpu} offloaded layers"
            + (" and the embeddings/lm_head" if chosen.cpu_bytes else "")
            + f", but only {fb(max(0, ram_budget))} of RAM is usable "
            f"({fb(profile.ram_available_bytes)} available minus the OS/frontend reserve)"
        )
    _explain_gpu_offload(builder, chosen, gpu, dtype, quantized, on_gpu, cpu_layer)
    builder.reasons["device"] += (
        f"; {gpu.why}, reserve {fb(reserve)} = 1 GiB CUDA context/workspaces + activation peak, "
        f"plus {fb(stream)} for the streamed layer"
    )
    device_map = split_device_map(
        shape,
        gi,
        on_gpu,
        "cpu",
        embed="cpu" if chosen.embed_on_cpu else gi,
        lm_head="cpu" if chosen.lm_head_on_cpu else gi,
    )
    return builder.build(
        device=f"cuda:{gi}",
        dtype=dtype,
        quantized=quantized,
        weights_bytes=gpu_weights + offload_bytes,
        kv_room=gpu.bytes - reserve - gpu_weights - stream,
        kv_per_token=kv_per_token,
        reserve_bytes=reserve + stream,
        budget_bytes=gpu.bytes,
        max_memory={str(gi): gpu_weights, "cpu": ram_budget},
        offload=True,
        device_map=device_map,
        offload_bytes=offload_bytes,
    )


# ---------------------------------------------------------------- RAM -> disk


def _check_disk_offload(builder: PlanBuilder) -> None:
    o, L = builder.overrides, builder.shape.num_layers
    if o.cpu_offload is False:
        raise PlanError(
            f"{describe(o, 'gpu_layers')} keeps {o.gpu_layers} of {L} layers in RAM, which needs disk offload, "
            f"but offload is off ({describe(o, 'cpu_offload')})"
        )
    if o.quantization == "nf4":
        raise PlanError(
            f"NF4 ({describe(o, 'quantization')}) cannot be combined with disk offload "
            f"({describe(o, 'gpu_layers')}): bitsandbytes quantizes layers as they are loaded into RAM; "
            "drop one of the two"
        )


def plan_disk_offload(
    builder: PlanBuilder, profile: HardwareProfile, dtype: str, budget: int, reserve: int
) -> ServingPlan:
    """CPU-only, `gpu_layers` (read as "decoder layers kept in RAM") < all: the rest go to disk.

    accelerate's disk offload: the offloaded layers' weights stay in the safetensors checkpoint (or are
    written once to an offload folder) and are memory-mapped; an AlignDevicesHook on each of their
    modules reads the weights in before that module runs and drops them after. RAM then holds the
    embeddings, norms, the kept layers, the KV cache and one streamed layer at a time (the kernel's
    page cache may keep the file's pages around, but it can always reclaim them). bitsandbytes
    quantizes while loading into RAM, so NF4 is not combined with disk offload.
    """
    _check_disk_offload(builder)
    shape, o, reasons = builder.shape, builder.overrides, builder.reasons
    L, kept = shape.num_layers, o.gpu_layers
    layer = shape.layer_params * dtype_bytes(dtype)
    ram_weights = outside_layers_bytes(shape, dtype) + kept * layer
    disk_bytes = (L - kept) * layer
    stream = layer  # one disk layer's weights materialized while it runs (module by module, so at most this)
    reasons["quantization"] = (
        f"none: disk offload keeps {dtype} weights (bitsandbytes cannot quantize layers that live on disk)"
        + (f", {describe(o, 'quantization')}" if o.quantization is not None else "")
    )
    reasons["offload"] = (
        f"{kept} of {L} decoder layers in RAM, {L - kept} on disk ({fb(disk_bytes)}), "
        f"{describe(o, 'gpu_layers')} (layers kept in RAM on a CPU-only machine): accelerate disk offload, "
        "weights memory-mapped from the checkpoint or the offload folder and read in on every forward, "
        "so each step is bound by disk and page-cache reads"
    )
    reasons["device"] += (
        f"; reserve {fb(reserve)} = max(2 GiB, 20% of available) for OS and frontend + activation peak, "
        f"plus {fb(stream)} for the layer streamed from disk"
    )
    return builder.build(
        device="cpu",
        dtype=dtype,
        quantized=False,
        weights_bytes=ram_weights + disk_bytes,
        kv_room=budget - reserve - ram_weights - stream,
        kv_per_token=kv_bytes_per_token(shape, CPU_KV_DTYPE),
        reserve_bytes=reserve + stream,
        budget_bytes=budget,
        offload=True,
        offload_bytes=disk_bytes,
        device_map=split_device_map(shape, "cpu", kept, "disk", embed="cpu", lm_head="cpu"),
        **cpu_plan_fields(reasons, profile),
    )
