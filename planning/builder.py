"""The one place a ServingPlan is built: the policies (cpu, gpu, offload) decide, the builder records.

A policy makes a `PlanBuilder` with what every plan shares (model, overrides, prefill chunk), fills
in reasons as it decides, and ends with `build(...)`, which sizes the paged KV pool, the context and the
batch (planning.batch), writes the compile / prefill / KV / prefix-caching reasons and lists the forced
fields, all the same way for every plan.
"""

from __future__ import annotations

import os
import shutil

from hardware.profile import format_bytes as fb
from model.shape import ModelShape
from planning.batch import KV_BLOCK_SIZE, batch_bound, choose_batch, context_bound, size_pool
from planning.overrides import FIELDS, describe
from planning.plan import PlanOverrides, ServingPlan

COMPILE_DEFAULT = (
    "eager by default: torch.compile costs a long warmup and needs Triton; enable with --compile or ENABLE_COMPILE=1"
)
CPU_COMPILE_ON = (
    "on: decode steps run as one torch.compile'd graph of the whole model (the eager step spends as long "
    "dispatching small ops as in its matmuls); compiled at first start (a minute or two on a few cores, "
    "cached after) and kept only where warmup measures it faster than eager; off with --no-compile or "
    "ENABLE_COMPILE=0"
)
CPU_COMPILE_NO_CXX = "eager: torch.compile on CPU needs a C++ compiler and none was found (g++, c++, clang++ or $CXX)"
CPU_COMPILE_NF4 = "eager: bitsandbytes' 4-bit CPU layers are not compiled; int4, int8, bf16 and fp32 plans compile"


def cpu_compile_default(quantized: bool) -> tuple[bool, str]:
    """Compile a CPU plan's decode step unless its weights are NF4 or no C++ compiler is installed."""
    if quantized:
        return False, CPU_COMPILE_NF4
    names = [os.environ.get("CXX") or "", "g++", "c++", "clang++"]
    if not any(name and shutil.which(name) for name in names):
        return False, CPU_COMPILE_NO_CXX
    return True, CPU_COMPILE_ON


class PlanBuilder:
    def __init__(
        self,
        shape: ModelShape,
        overrides: PlanOverrides,
        chunk: int,
        chunk_why: str,
        ignored: frozenset[str] = frozenset(),
    ) -> None:
        self.shape, self.overrides = shape, overrides
        self.chunk, self.chunk_why = chunk, chunk_why
        self.ignored = ignored  # forced fields that have no effect on this kind of plan (not listed as forced)
        self.reasons: dict[str, str] = {}

    def forced(self, field: str, value: str) -> str:
        """'<value>, forced by --flag x' for a reason."""
        return f"{value}, {describe(self.overrides, field)}"

    @property
    def activation_context(self) -> int:
        """The context the activation peak is sized for: the longest the plan may choose (window or forced)."""
        return context_bound(self.shape, self.overrides)

    @property
    def activation_batch(self) -> int:
        """The decode rows whose logits the activation peak holds: the most the plan may run at once."""
        return batch_bound(self.overrides)

    def choose_dtype(self, default: str, why: str) -> str:
        """The forced dtype, else `default`; records the reason."""
        if self.overrides.dtype is not None:
            self.reasons["dtype"] = self.forced("dtype", self.overrides.dtype)
            return self.overrides.dtype
        self.reasons["dtype"] = f"{default}: {why}"
        return default

    def explain_quantization(self, quantized: bool, why: str) -> None:
        """The quantization reason: the forced value, else `why`."""
        if self.overrides.quantization is not None:
            self.reasons["quantization"] = self.forced("quantization", "NF4" if quantized else "none")
        else:
            self.reasons["quantization"] = why

    def _size_kv_cache(
        self, kv_room: int, kv_per_token: int, on_cpu: bool, fmt: str, format_ms: dict[str, float]
    ) -> tuple[int, int, int]:
        """(batch, context, pool tokens) for `kv_room` bytes left after weights and reserve; `fmt` names the
        CPU weight format whose measured decode steps (`format_ms`) set the batch."""
        pool = size_pool(kv_room, kv_per_token, self.shape, self.overrides, on_cpu)
        batch, why_b = choose_batch(pool, on_cpu, fmt, format_ms, self.overrides)
        self.reasons["max_batch"] = why_b
        self.reasons["max_context"] = f"{pool.context}: {pool.why_context}"
        self.reasons["kv_cache_tokens"] = pool.why_tokens
        layer_block = KV_BLOCK_SIZE * kv_per_token // self.shape.num_layers
        self.reasons["kv_block_size"] = (
            f"{KV_BLOCK_SIZE} tokens on every device: vLLM's default; prefixes are reused in {KV_BLOCK_SIZE}-token "
            f"steps; one layer's block (K and V) is {fb(layer_block)}, so gathering by block is a plain memcpy"
        )
        return batch, pool.context, pool.tokens

    def _explain_prefix_caching(self) -> bool:
        if self.overrides.prefix_caching is False:
            self.reasons["prefix_caching"] = "off: " + describe(self.overrides, "prefix_caching").replace(
                "forced by", "forced off by", 1
            )
            return False
        self.reasons["prefix_caching"] = (
            f"on: full {KV_BLOCK_SIZE}-token blocks keyed by a hash chain of token ids, reused across requests "
            "(shared only among requests with the same cache_salt), LRU-evicted only when the pool needs them"
            + (f" ({describe(self.overrides, 'prefix_caching')})" if self.overrides.prefix_caching else "")
            + "; --no-prefix-caching turns it off"
        )
        return True

    def _explain_compile(self, default: tuple[bool, str]) -> bool:
        compile_ = self.overrides.compile
        if compile_ is not None:
            self.reasons["compile"] = self.forced("compile", "torch.compile on" if compile_ else "eager")
        else:
            compile_, self.reasons["compile"] = default
        self.reasons["prefill_chunk"] = f"{self.chunk} prompt tokens per step: {self.chunk_why}"
        return bool(compile_)

    def overridden(self) -> list[str]:
        """Every field a flag or env var forced, in PlanOverrides order, less those this plan ignores."""
        return [f for f in FIELDS if getattr(self.overrides, f) is not None and f not in self.ignored]

    def build(
        self,
        *,
        device: str,
        dtype: str,
        quantized: bool,
        weights_bytes: int,
        kv_room: int,
        kv_per_token: int,
        reserve_bytes: int,
        budget_bytes: int,
        max_memory=None,
        weight_format: str | None = None,
        compile_default: tuple[bool, str] = (False, COMPILE_DEFAULT),
        **fields,
    ) -> ServingPlan:
        """Size the KV pool, context and batch from `kv_room`, then the ServingPlan. `quantized`: NF4;
        `weight_format`: "int8" or "int4" weight-only linears (CPU). `compile_default`: (on, why) when no flag
        decides. `max_memory` may be a function of the KV cache bytes (a whole-GPU plan gives accelerate what the
        KV cache leaves); `fields` are the rest (offload, device_map, offload_bytes, cuda_graphs, kv_dtype,
        cpu_format_ms)."""
        fmt = weight_format or ("nf4" if quantized else dtype)
        batch, ctx, kv_tokens = self._size_kv_cache(
            kv_room, kv_per_token, device == "cpu", fmt, fields.get("cpu_format_ms") or {}
        )
        prefix_caching = self._explain_prefix_caching()
        compile_ = self._explain_compile(compile_default)
        kv_cache_bytes = kv_tokens * kv_per_token
        if callable(max_memory):
            max_memory = max_memory(kv_cache_bytes)
        return ServingPlan(
            device=device,
            dtype=dtype,
            quantization="nf4" if quantized else weight_format,
            double_quant=quantized,
            max_batch=batch,
            max_context=ctx,
            kv_cache_tokens=kv_tokens,
            weights_bytes=weights_bytes,
            compile=compile_,
            prefill_chunk=self.chunk,
            kv_block_size=KV_BLOCK_SIZE,
            prefix_caching=prefix_caching,
            reasons=self.reasons,
            overridden=self.overridden(),
            max_memory=max_memory,
            kv_bytes_per_token=kv_per_token,
            kv_cache_bytes=kv_cache_bytes,
            reserve_bytes=reserve_bytes,
            budget_bytes=budget_bytes,
            total_params=self.shape.total_params,
            model=self.shape.name,
            **{"offload": False, "device_map": None, **fields},
        )
