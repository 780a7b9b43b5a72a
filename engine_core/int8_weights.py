"""int8 weight-only linears for CPU: half the bytes of bf16 per decode step, computed by torch's own
int8-weight kernel (`aten._weight_int8pack_mm`: bf16 activations, int8 weights, one bf16 scale per
output row) for few rows, and by a bf16 matmul over weights dequantized per call for many.

A decode step on CPU streams every weight once per step, so at small batches its time follows the
bytes read. Each row is quantized symmetrically to its largest magnitude (scale = max|w| / 127):
no zero point, no per-step activation quantization, the activations stay bf16. Whether this is the
fastest format on a given CPU is measured (engine_core/cpu_formats.py), never assumed: where the
kernel has no fast path it loses, and the plan keeps bf16 or fp32.

That kernel is built for a few rows: at a prompt chunk's hundreds of rows the step is compute-bound
and a bf16 matmul (oneDNN, native bf16 dot products where the CPU has them) is several times faster.
So from `dequant_from_rows` rows on (measured per machine by the same probe), a call converts the
int8 weights to bf16 (exact: |q| <= 127 fits bf16's 8-bit significand), multiplies, and scales the
output columns; the bf16 copy lives for one call, in blocks of at most DEQUANT_BLOCK_ELEMENTS
weights, so memory does not grow. Compiled graphs (the decode step) always take the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planning.cpu_dtype import int8_dequant_from_rows

ACTIVATION_DTYPE = torch.bfloat16  # the kernel's fast path; its scales take the activations' dtype
DEQUANT_BLOCK_ELEMENTS = 1 << 22  # weights dequantized at once (8 MiB of bf16): an LM head goes by row blocks


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


QUANTIZE_ROWS = 8192  # rows quantized at once: a 150k-row LM head never has a float32 copy of itself whole


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scale) with weight ≈ int8 * scale[:, None], within half a step: the rows are
    rounded against the scale as stored (bf16), not the exact one, whose rounding would add up to 127 ×
    2^-8 of a step at the row's largest values. Done in blocks of QUANTIZE_ROWS rows (each row on its own)."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=ACTIVATION_DTYPE)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        w = weight[start : start + QUANTIZE_ROWS].detach().float()
        s = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(ACTIVATION_DTYPE)
        q[start : start + QUANTIZE_ROWS] = torch.round(w / s.float()[:, None]).clamp_(-127, 127)
        scale[start : start + QUANTIZE_ROWS] = s
    return q, scale


def int8_kernel_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (rows, in) bf16 @ (weight_int8 * scale[:, None]).T by torch's int8-weight kernel: fastest for a few rows."""
    return torch.ops.aten._weight_int8pack_mm(x, weight_int8, scale)


def dequantized_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same product as int8_kernel_linear through a bf16 matmul: weights converted to bf16 per call
    (in row blocks, so the transient copy stays small), output columns scaled after. Fastest for many rows."""
    step = max(1, DEQUANT_BLOCK_ELEMENTS // weight_int8.shape[1])
    blocks = [
        F.linear(x, weight_int8[start : start + step].to(ACTIVATION_DTYPE)).mul_(scale[start : start + step])
        for start in range(0, weight_int8.shape[0], step)
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)


class WeightOnlyLinear(nn.Module):
    """What the weight-only formats share: bf16 activations in, a kernel for few rows, weights dequantized
    to bf16 per call from `dequant_from_rows` rows on (None: never), bias added after. Subclasses hold the
    weights and say how each path computes (`_kernel`, `_dequantized`)."""

    in_features: int
    out_features: int
    dequant_from_rows: int | None
    bias: nn.Parameter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != ACTIVATION_DTYPE:
            rows = rows.to(ACTIVATION_DTYPE)
        out = self._dequantized(rows) if self._dequantize(rows.shape[0]) else self._kernel(rows.contiguous())
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def _dequantize(self, rows: int) -> bool:
        """Whether `rows` go through the dequantized path; never while compiling, so a compiled graph (the
        decode step) holds no guard on its row count and always takes the kernel."""
        if torch.compiler.is_compiling() or self.dequant_from_rows is None:
            return False
        return rows >= self.dequant_from_rows

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dequant_from_rows={self.dequant_from_rows}"
        )


def as_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().to(ACTIVATION_DTYPE), requires_grad=False)


class Int8Linear(WeightOnlyLinear):
    """A drop-in for nn.Linear at inference: same in/out features and bias, int8 weights.

    `dequant_from_rows`: calls with at least this many rows go through dequantized_linear (None: never)."""

    def __init__(self, linear: nn.Linear, dequant_from_rows: int | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dequant_from_rows = dequant_from_rows
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.bias = as_bias(linear.bias)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return int8_kernel_linear(rows, self.weight_int8, self.scale)

    def _dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantized_linear(rows, self.weight_int8, self.scale)


def quantize_linears(model: nn.Module, cpu_format_ms: dict[str, float] | None = None) -> str:
    """Swap every nn.Linear of the decoder layers and the LM head for an Int8Linear, in place (the input
    embedding, norms and attention stay bf16); returns what was done, for the log. `cpu_format_ms` (the
    plan's probe timings) says from how many rows a call is faster dequantized to bf16."""
    dequant_from_rows = int8_dequant_from_rows(cpu_format_ms or {})
    swapped, saved = 0, 0
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear, dequant_from_rows))
        saved += linear.weight.numel() * (linear.weight.element_size() - 1)
        swapped += 1
    prompt = (
        f"calls of {dequant_from_rows}+ rows dequantized to bf16 (measured faster)"
        if dequant_from_rows is not None
        else "every call through the int8 kernel"
    )
    return f"int8 weights: {swapped} linears quantized per row, {saved / 2**20:.0f} MiB less to read per step; {prompt}"
