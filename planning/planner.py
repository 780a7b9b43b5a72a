"""HardwareProfile + ModelShape (+ overrides) -> ServingPlan: dtype, NF4, offload, batch, context.

Pure arithmetic, no torch, no I/O: every number comes from parameter counts and the
profile, so a plan can be made for a machine we are not on and checked in tests.

The pieces: planning.memory (byte arithmetic: weights, KV, activations, reserves; the memory model
is in its docstring), planning.batch (KV room -> paged pool, context, batch), the policies planning.cpu,
planning.gpu and planning.offload (GPU -> RAM, RAM -> disk), and planning.builder, where every
plan is built.
"""

from __future__ import annotations

from hardware.profile import GpuInfo, HardwareProfile
from model.shape import ModelShape
from planning.cpu import plan_cpu
from planning.gpu import plan_gpu
from planning.overrides import describe
from planning.plan import PlanError, PlanOverrides, ServingPlan

__all__ = ["PlanError", "make_plan", "pick_gpu"]


def pick_gpu(profile: HardwareProfile, gpu_index: int | None) -> GpuInfo | None:
    """The GPU to plan for (`gpu_index`, else the first); None on a machine without one."""
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
        return plan_cpu(shape, profile, overrides)
    if overrides.quantization in ("int8", "int4"):
        raise PlanError(
            f"{overrides.quantization} ({describe(overrides, 'quantization')}) is a CPU weight format (torch's CPU "
            "kernels); on a GPU use --quantization nf4 (bitsandbytes 4-bit) or none"
        )
    return plan_gpu(shape, profile, gpu, overrides)
