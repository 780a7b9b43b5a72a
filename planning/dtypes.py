"""Dtype names as the plan spells them, the spellings accepted on input, and their sizes: the one table.

Torch-free: `torch_dtype` imports torch only when called (the engine and the bench call it).
"""

from __future__ import annotations

DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def normalize_dtype(value: str) -> str:
    """'bf16' / 'torch.bfloat16' / 'BFloat16' -> 'bfloat16'; ValueError for anything else."""
    key = value.strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {value!r}: use bfloat16, float16 or float32")
    return DTYPE_ALIASES[key]


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def torch_dtype(name: str):
    """The torch dtype for a plan's dtype name (imports torch)."""
    import torch

    return getattr(torch, normalize_dtype(name))
