"""GPU policy: the dtype from the compute capability, 16-bit or NF4 weights wholly on one GPU, else
offload (planning.offload). The byte arithmetic is planning.memory's."""

from __future__ import annotations

from hardware.profile import GiB, GpuInfo, HardwareProfile
from hardware.profile import format_bytes as fb
from model.shape import ModelShape
from planning.batch import PREFERRED_BATCH, min_context
from planning.builder import PlanBuilder
from planning.memory import GPU_FRACTION, Candidate, gpu_budget, gpu_reserve, pick, weight_bytes
from planning.offload import GpuBudget, plan_gpu_offload
from planning.overrides import describe
from planning.plan import PlanError, PlanOverrides, ServingPlan

CUDA_GRAPHS_REASON = (
    "yes: decode steps replay CUDA graphs captured at warmup per batch and key-span bucket "
    "(one launch per step instead of hundreds of kernels); prompt chunks run eager"
)


def gpu_chunk(gpu: GpuInfo) -> tuple[int, str]:
    if gpu.total_bytes >= 40 * GiB:
        return 2048, "large GPU: long chunks keep prefill efficient and the scores buffer small next to memory"
    if gpu.total_bytes >= 20 * GiB:
        return 1024, "mid-size GPU: balances prefill throughput against the activation peak"
    return 512, "small GPU: bounds the activation peak (attention scores grow with chunk × context)"


def gpu_dtype_default(gpu: GpuInfo) -> tuple[str, str]:
    cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
    if gpu.compute_capability >= (8, 0):
        return "bfloat16", f"compute capability {cc} ≥ 8.0 has native bf16"
    return "float16", f"compute capability {cc} < 8.0: bf16 is emulated there (check warmup logits for NaN)"


def _budget(gpu: GpuInfo, overrides: PlanOverrides) -> GpuBudget:
    frac = overrides.gpu_memory_fraction if overrides.gpu_memory_fraction is not None else GPU_FRACTION
    budget = gpu_budget(gpu, frac)
    why = (
        f"budget {fb(budget)} = {frac:.0%} of total"
        + (" (capped by free memory)" if budget == gpu.free_bytes else "")
        + (f" ({describe(overrides, 'gpu_memory_fraction')})" if overrides.gpu_memory_fraction is not None else "")
    )
    return GpuBudget(gpu.index, budget, why)


def plan_gpu(shape: ModelShape, profile: HardwareProfile, gpu: GpuInfo, overrides: PlanOverrides) -> ServingPlan:
    chunk, chunk_why = gpu_chunk(gpu)
    builder = PlanBuilder(shape, overrides, chunk, chunk_why)
    budget = _budget(gpu, overrides)
    cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
    others = f"; {len(profile.gpus)} GPUs: one engine per GPU (cli.py engine --gpu N)" if len(profile.gpus) > 1 else ""
    builder.reasons["device"] = (
        f"cuda:{gpu.index}: {gpu.name}, {fb(gpu.total_bytes)} total, {fb(gpu.free_bytes)} "
        f"free, cc {cc} (from {profile.source}){others}"
    )
    dtype = builder.choose_dtype(*gpu_dtype_default(gpu))

    def reserve_for(quantized: bool) -> int:
        return gpu_reserve(shape, chunk, builder.activation_context, builder.activation_batch, dtype, quantized)

    options = [
        q
        for q, allowed in ((False, overrides.quantization != "nf4"), (True, overrides.quantization != "none"))
        if allowed
    ]
    cands = [Candidate(shape, dtype, q, budget.bytes, reserve_for(q)) for q in options]
    forced_split = overrides.gpu_layers is not None and overrides.gpu_layers < shape.num_layers
    if forced_split and overrides.cpu_offload is False:
        raise PlanError(
            f"{describe(overrides, 'gpu_layers')} keeps {overrides.gpu_layers} of {shape.num_layers} layers on the "
            f"GPU, which needs CPU offload, but offload is off ({describe(overrides, 'cpu_offload')})"
        )
    chosen = None if (overrides.cpu_offload or forced_split) else pick(cands)
    if chosen is not None:
        return _plan_whole_gpu(builder, budget, dtype, chosen)
    if overrides.cpu_offload is False:
        smallest = min(cands, key=lambda c: c.needed_min)
        raise PlanError(
            f"{shape.name} does not fit on cuda:{gpu.index} and CPU offload is off "
            f"({describe(overrides, 'cpu_offload')}): the smallest plan, {smallest.label}, needs "
            f"{fb(smallest.needed_min)} of GPU memory, {budget.why} available"
        )
    quantized = overrides.quantization == "nf4" or (
        overrides.quantization is None and not forced_split and not overrides.cpu_offload
    )
    return plan_gpu_offload(builder, profile, budget, dtype, quantized, reserve_for(quantized))


def _plan_whole_gpu(builder: PlanBuilder, budget: GpuBudget, dtype: str, chosen: Candidate) -> ServingPlan:
    """Every weight on the GPU (16-bit, or NF4 when 16-bit leaves no room for 4 minimum-context sequences)."""
    shape, o, reasons, gi = builder.shape, builder.overrides, builder.reasons, budget.index
    builder.explain_quantization(
        chosen.quantized,
        (
            f"NF4 with double quantization, compute in {dtype}: {dtype} weights "
            f"({fb(weight_bytes(shape, dtype, False))}) do not leave room for {PREFERRED_BATCH} × "
            f"{min_context(shape)}-token sequences in the {budget.why}; NF4 weights are {fb(chosen.weights)}"
        )
        if chosen.quantized
        else f"none: {dtype} weights ({fb(chosen.weights)}) fit the {budget.why} with room for a KV cache",
    )
    reasons["offload"] = (
        builder.forced("cpu_offload", "none") if o.cpu_offload is False else "none: all weights fit on the GPU"
    )
    if o.gpu_layers is not None:
        reasons["offload"] += f"; all {shape.num_layers} layers on the GPU ({describe(o, 'gpu_layers')})"
    reasons["cuda_graphs"] = CUDA_GRAPHS_REASON
    reasons["device"] += (
        f"; {budget.why}, reserve {fb(chosen.reserve)} = 1 GiB CUDA context/workspaces + activation peak"
    )
    free_for_weights = budget.bytes - chosen.reserve
    return builder.build(
        device=f"cuda:{gi}",
        dtype=dtype,
        quantized=chosen.quantized,
        weights_bytes=chosen.weights,
        kv_room=chosen.kv_room,
        kv_per_token=chosen.kv_per_token,
        reserve_bytes=chosen.reserve,
        budget_bytes=budget.bytes,
        max_memory=lambda kv_bytes: {str(gi): free_for_weights - kv_bytes},
        device_map={"": gi},
        offload_bytes=0,
        cuda_graphs=True,
    )
