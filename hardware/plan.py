"""The serving plan: what an engine will do with the machine it landed on.

`ServingPlan` crosses process boundaries (engine hello, `GET /info`, `cli.py plan --json`),
so it is a `msgspec.Struct` and holds only plain values. Every decision carries a
one-line reason in `reasons`, keyed by the field it explains.
"""
from __future__ import annotations

import msgspec


class PlanOverrides(msgspec.Struct, omit_defaults=True, frozen=True):
    """What the user forced through flags or env vars; None means "let the planner decide"."""

    dtype: str | None = None  # "bfloat16" | "float16" | "float32"
    quantization: str | None = None  # "nf4" | "none"
    max_batch: int | None = None
    max_context: int | None = None
    gpu_memory_fraction: float | None = None
    cpu_offload: bool | None = None
    compile: bool | None = None


class ServingPlan(msgspec.Struct, kw_only=True):
    device: str  # "cuda:0", "cpu", ...
    dtype: str  # "bfloat16" | "float16" | "float32"
    quantization: str | None  # "nf4" or None
    double_quant: bool
    offload: bool
    device_map: dict[str, str | int] | None
    max_batch: int
    max_context: int
    kv_cache_tokens: int
    weights_bytes: int
    compile: bool = False
    prefill_chunk: int = 256  # tokens of prompt computed per engine step, bounds inter-token latency
    reasons: dict[str, str] = msgspec.field(default_factory=dict)
    overridden: list[str] = msgspec.field(default_factory=list)  # decisions a flag or env var forced
