"""The serving plan: what an engine will do with the machine it landed on.

`ServingPlan` crosses process boundaries (engine hello, `GET /info`, `cli.py plan --json`),
so it is a `msgspec.Struct` and holds only plain values. Every decision carries a
one-line reason in `reasons`, keyed by the field it explains.
"""

from __future__ import annotations

import msgspec


class PlanError(Exception):
    """No plan fits: the message says how much memory is needed and how much there is."""


class PlanOverrides(msgspec.Struct, omit_defaults=True, frozen=True):
    """What the user forced through flags or env vars; None means "let the planner decide"."""

    dtype: str | None = None  # "bfloat16" | "float16" | "float32"
    quantization: str | None = None  # "nf4" | "int8" | "int4" (CPU weight-only formats) | "none"
    max_batch: int | None = None
    max_context: int | None = None
    gpu_memory_fraction: float | None = None
    cpu_offload: bool | None = None
    compile: bool | None = None
    prefix_caching: bool | None = None  # automatic prefix caching (on unless --no-prefix-caching)
    kv_cache_tokens: int | None = None  # the KV pool's size in tokens (e.g. to test pool pressure)
    gpu_layers: int | None = None  # decoder layers kept on the GPU, the rest offloaded (like llama.cpp -ngl);
    # on a CPU-only machine: decoder layers kept in RAM, the rest read from disk (accelerate disk offload)
    # Where each forced value came from, e.g. {"quantization": "QUANTIZATION=none"}; for reasons only.
    sources: dict[str, str] = msgspec.field(default_factory=dict)


class ServingPlan(msgspec.Struct, kw_only=True):
    device: str  # "cuda:0", "cpu", ...
    dtype: str  # "bfloat16" | "float16" | "float32"
    quantization: str | None  # "nf4", "int8" or "int4" (CPU, chosen by measurement or forced) or None
    double_quant: bool
    offload: bool
    device_map: dict[str, str | int] | None
    max_batch: int  # most sequences running at once (a cap; the pool's free blocks admit them)
    max_context: int  # longest sequence, prompt + output
    kv_cache_tokens: int  # the paged KV pool: kv_blocks × kv_block_size tokens shared by all sequences
    weights_bytes: int
    compile: bool = False
    cuda_graphs: bool = False  # decode steps replayed from CUDA graphs (whole model on one GPU)
    kv_dtype: str = ""  # dtype of the KV cache; "" = the weight dtype (GPU plans)
    prefill_chunk: int = 256  # tokens of prompt computed per engine step, bounds inter-token latency
    kv_block_size: int = 16  # tokens per KV block: the unit of allocation and of prefix caching
    prefix_caching: bool = True  # full blocks are keyed by their token prefix and reused across requests
    reasons: dict[str, str] = msgspec.field(default_factory=dict)
    overridden: list[str] = msgspec.field(default_factory=list)  # decisions a flag or env var forced
    # The numbers behind the decisions (added by the planner; 0 / None when unknown).
    max_memory: dict[str, int] | None = (
        None  # accelerate max_memory, keys "0", "1", ..., "cpu" (see accelerate_max_memory)
    )
    kv_bytes_per_token: int = 0  # 2 × layers × kv_heads × head_dim × KV dtype bytes
    kv_cache_bytes: int = 0  # kv_cache_tokens × kv_bytes_per_token, allocated once at start
    reserve_bytes: int = 0  # kept free on the device: runtime overhead + activation peak
    budget_bytes: int = 0  # device memory the plan may use (GPU total × fraction capped by free, or available RAM)
    offload_bytes: int = 0  # weight bytes the device_map offloads: to CPU RAM (GPU plans) or to disk (CPU plans)
    total_params: int = 0
    model: str = ""  # the model's name, for display
    # CPU plans: measured ms per decode step for each weight format, by "<format>@<batch rows>" (see
    # HardwareProfile.cpu_format_ms); empty when not measured yet (the dtype is then the CPU-flags guess).
    cpu_format_ms: dict[str, float] = msgspec.field(default_factory=dict)


def accelerate_max_memory(plan: ServingPlan) -> dict[int | str, int] | None:
    """`plan.max_memory` with GPU keys as ints, the form `from_pretrained(max_memory=...)` expects."""
    if plan.max_memory is None:
        return None
    return {int(k) if k.isdigit() else k: v for k, v in plan.max_memory.items()}
