"""CPU policy (no GPU): weights in RAM at the measured fastest format, or bf16 / NF4 when RAM is short;
disk offload when `gpu_layers` keeps fewer layers in RAM than the model has (planning.offload)."""

from __future__ import annotations

from hardware.profile import HardwareProfile
from hardware.profile import format_bytes as fb
from model.shape import ModelShape
from planning.batch import min_context
from planning.builder import PlanBuilder, cpu_compile_default
from planning.cpu_dtype import (
    CPU_KV_DTYPE,
    INT8_COMPUTE_DTYPE,
    QUANTIZED_FORMATS,
    cpu_dtype_default,
    cpu_plan_fields,
    describe_cpu_formats,
    phase_paths,
)
from planning.memory import Candidate, activation_peak_bytes, pick, quantized_weight_bytes, ram_reserve, weight_bytes
from planning.offload import plan_disk_offload
from planning.overrides import describe
from planning.plan import PlanError, PlanOverrides, ServingPlan

CPU_PREFILL_CHUNK = 256
CPU_CHUNK_WHY = "small chunks keep inter-token latency bounded on a few cores"


def _candidates(builder: PlanBuilder, dtype: str, budget: int) -> list[Candidate]:
    """The dtype chosen (and bf16 when it was fp32 by default), then NF4, as the overrides allow (a forced int8
    or int4 format is sized as bf16, and takes no NF4)."""
    shape, o = builder.shape, builder.overrides
    options: list[tuple[str, bool]] = []
    if o.quantization != "nf4":
        options.append((dtype, False))
        if o.dtype is None and dtype == "float32":
            options.append(("bfloat16", False))
    if o.quantization in (None, "nf4"):
        options.append((o.dtype or "bfloat16", True))  # bnb's CPU 4-bit kernels compute in bf16
    return [Candidate(shape, d, q, budget, _reserve(builder, budget, d, q), CPU_KV_DTYPE) for d, q in options]


def _reserve(builder: PlanBuilder, budget: int, dtype: str, quantized: bool) -> int:
    b = builder
    act = activation_peak_bytes(
        b.shape, b.chunk, b.activation_context, b.activation_batch, dtype, quantized, CPU_KV_DTYPE
    )
    return ram_reserve(budget) + act


def _refusal(shape: ModelShape, cands: list[Candidate], budget: int) -> PlanError:
    smallest = min(cands, key=lambda c: c.needed_min)
    lo = min_context(shape)
    return PlanError(
        f"{shape.name} ({shape.total_params / 1e9:.2f}B params) does not fit on this CPU-only machine: "
        f"the smallest plan, {smallest.label}, needs {fb(smallest.needed_min)} "
        f"(weights {fb(smallest.weights)} + KV cache for one {lo}-token sequence "
        f"{fb(smallest.kv_per_token * lo)} + reserve {fb(smallest.reserve)}), "
        f"but only {fb(budget)} of RAM is available (GPU_LAYERS=N keeps N decoder layers in RAM and "
        "reads the rest from disk on every forward: it runs, slowly)"
    )


QUANTIZED_WHAT = {
    "int8": "int8 weight-only linears (one scale per row)",
    "int4": (
        "int4 weight-only linears (a scale and zero per 32 weights; a 4-bit GGUF's own codes where it has them; "
        "LM head and embedding in int8 rows)"
    ),
}


def _explain(builder: PlanBuilder, chosen: Candidate, dtype: str, budget: int, fmt: str | None) -> None:
    shape, o, reasons = builder.shape, builder.overrides, builder.reasons
    if chosen.dtype != dtype:
        reasons["dtype"] = (
            f"{chosen.dtype}: {dtype} weights ({fb(weight_bytes(shape, dtype, False))}) leave too "
            "little RAM for a KV cache"
        )
    builder.explain_quantization(
        chosen.quantized,
        (
            f"NF4 with double quantization: 16-bit weights ({fb(weight_bytes(shape, chosen.dtype, False))}) do not "
            f"fit {fb(budget)} RAM with room for a KV cache; bitsandbytes' CPU 4-bit kernels are slow (memory tool, "
            "not speed)"
        )
        if chosen.quantized
        else (
            f"{QUANTIZED_WHAT[fmt]}, {fb(quantized_weight_bytes(shape, dtype, fmt))} (the measured fastest format, "
            "see dtype); the RAM budget is sized as for bf16 weights; --quantization none or --dtype turns it off"
        )
        if fmt
        else f"none: {chosen.dtype} weights ({fb(chosen.weights)}) fit in RAM with room for a KV cache",
    )
    if fmt and o.quantization == fmt:
        reasons["quantization"] = f"{QUANTIZED_WHAT[fmt]}, {fb(quantized_weight_bytes(shape, dtype, fmt))}, " + (
            describe(o, "quantization")
        )
    if o.cpu_offload is not None:
        reasons["offload"] = (
            f"none: weights are already in RAM; {describe(o, 'cpu_offload')} has no effect without "
            "a GPU (disk offload is too slow to serve)"
        )
    else:
        reasons["offload"] = "none: no GPU, all weights in RAM"
    if o.gpu_layers is not None:
        reasons["offload"] += (
            f"; all {shape.num_layers} layers in RAM ({describe(o, 'gpu_layers')}, "
            "which counts layers kept in RAM on a CPU-only machine)"
        )
    reasons["device"] += (
        f"; reserve {fb(chosen.reserve)} = max(2 GiB, 20% of available) for OS and frontend + activation peak"
    )


def plan_cpu(shape: ModelShape, profile: HardwareProfile, overrides: PlanOverrides) -> ServingPlan:
    builder = PlanBuilder(
        shape, overrides, CPU_PREFILL_CHUNK, CPU_CHUNK_WHY, ignored=frozenset({"gpu_memory_fraction"})
    )
    budget = profile.ram_available_bytes
    builder.reasons["device"] = f"cpu: no GPU ({profile.source}); {profile.cpu_cores} cores, {fb(budget)} RAM available"
    if overrides.gpu_memory_fraction is not None:
        builder.reasons["device"] += f"; gpu_memory_fraction ignored ({describe(overrides, 'gpu_memory_fraction')})"
    fmt, why = (
        _forced_format(builder, profile) if overrides.quantization in QUANTIZED_FORMATS else cpu_dtype_default(profile)
    )
    dtype = builder.choose_dtype(INT8_COMPUTE_DTYPE if fmt in QUANTIZED_FORMATS else fmt, why)
    if overrides.gpu_layers is not None and overrides.gpu_layers < shape.num_layers:
        if overrides.quantization in QUANTIZED_FORMATS:
            raise PlanError(
                f"{overrides.quantization} ({describe(overrides, 'quantization')}) cannot be combined with disk "
                f"offload ({describe(overrides, 'gpu_layers')}): the layers on disk stay {dtype}; drop one of the two"
            )
        return plan_disk_offload(builder, profile, dtype, budget, _reserve(builder, budget, dtype, False))
    cands = _candidates(builder, dtype, budget)
    chosen = pick(cands)
    if chosen is None:
        raise _refusal(shape, cands, budget)
    # int8 / int4 where measured fastest (or forced), unless a flag forced the dtype or no quantization, or RAM
    # forced another
    quantized_fmt = (
        fmt
        if fmt in QUANTIZED_FORMATS
        and overrides.dtype is None
        and overrides.quantization in (None, fmt)
        and chosen.dtype == dtype
        and not chosen.quantized
        else None
    )
    _explain(builder, chosen, dtype, budget, quantized_fmt)
    return builder.build(
        device="cpu",
        dtype=chosen.dtype,
        quantized=chosen.quantized,
        weight_format=quantized_fmt,
        weights_bytes=quantized_weight_bytes(shape, dtype, quantized_fmt) if quantized_fmt else chosen.weights,
        kv_room=chosen.kv_room,
        kv_per_token=chosen.kv_per_token,
        reserve_bytes=chosen.reserve,
        budget_bytes=budget,
        offload_bytes=0,
        compile_default=cpu_compile_default(chosen.quantized),
        **cpu_plan_fields(builder.reasons, profile),
    )


def _forced_format(builder: PlanBuilder, profile: HardwareProfile) -> tuple[str, str]:
    """(format, why) for a forced --quantization int8 / int4: computed in bf16, so a forced dtype must be bf16."""
    o, fmt = builder.overrides, builder.overrides.quantization
    if o.dtype not in (None, INT8_COMPUTE_DTYPE):
        raise PlanError(
            f"{fmt} ({describe(o, 'quantization')}) computes in bfloat16, but {describe(o, 'dtype')}: "
            "drop one of the two"
        )
    paths = phase_paths(profile.cpu_format_ms, fmt)
    measured = f"; {paths}" if paths else ""
    return fmt, (
        f"{QUANTIZED_WHAT[fmt]} computing in bf16, {describe(o, 'quantization')}{measured}; timings: "
        f"{describe_cpu_formats(profile.cpu_format_ms)}"
    )
