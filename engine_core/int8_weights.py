"""int8 weight-only linears for CPU decode: half the bytes of bf16 per step, computed by torch's own
int8-weight kernel (`aten._weight_int8pack_mm`: bf16 activations, int8 weights, one bf16 scale per
output row).

A decode step on CPU streams every weight once per step, so at small batches its time follows the
bytes read. Each row is quantized symmetrically to its largest magnitude (scale = max|w| / 127):
no zero point, no per-step activation quantization, the activations stay bf16. Whether this is the
fastest format on a given CPU is measured (engine_core/cpu_formats.py), never assumed: where the
kernel has no fast path it loses, and the plan keeps bf16 or fp32.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATION_DTYPE = torch.bfloat16  # the kernel's fast path; its scales take the activations' dtype


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scale) with weight ≈ int8 * scale[:, None], within half a step: the rows are
    rounded against the scale as stored (bf16), not the exact one, whose rounding would add up to 127 ×
    2^-8 of a step at the row's largest values."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(ACTIVATION_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear at inference: same in/out features and bias, int8 weights."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().to(ACTIVATION_DTYPE), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != ACTIVATION_DTYPE:
            rows = rows.to(ACTIVATION_DTYPE)
        out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: nn.Module) -> str:
    """Swap every nn.Linear of the decoder layers and the LM head for an Int8Linear, in place (the input
    embedding, norms and attention stay bf16); returns what was done, for the log."""
    swapped, saved = 0, 0
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear))
        saved += linear.weight.numel() * (linear.weight.element_size() - 1)
        swapped += 1
    return f"int8 weights: {swapped} linears quantized per row, {saved / 2**20:.0f} MiB less to read per step"
