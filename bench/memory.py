"""Measure the weight memory of a model loaded 16-bit, NF4 and NF4 + double quantization.

    python -m bench.memory [--model PATH] [--dtype bfloat16]

Loads the model each way (bitsandbytes' 4-bit path also runs on CPU), walks the modules and sums
the bytes really held: every parameter and buffer once (tied weights share storage, counted once),
and for each bitsandbytes `Linear4bit` the packed uint8 weight plus its `quant_state`: absmax
(fp32, or uint8 under double quantization), the 16-entry NF4 code, and for double quantization the
nested state2 (fp32 absmax per 256 absmax values + its 256-entry code) and the offset.
`model.get_memory_footprint()` counts parameters and buffers only, so it misses the quant_state.

The bytes are broken down by layer kind: embeddings (with a tied lm_head), decoder linear layers
(the only ones bitsandbytes quantizes), norms, and the rest (rotary buffers, biases). Then the
planner's own arithmetic (planning.memory.weight_bytes) gives the same ratios for fixture configs
of 7-8B models, where the decoder linear layers are almost all of the parameters.

This file loads weights itself, so it imports torch/transformers; it does not import engine internals.
"""

from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

from planning.dtypes import torch_dtype

KINDS = ("embeddings + lm_head", "decoder linear", "norms", "other")
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs"
NF4_PLAIN_BYTES_PER_PARAM = 0.5 + 4 / 64  # two codes per byte + one fp32 absmax per 64 weights


def _kind(module_name: str, module) -> str:
    from torch import nn

    cls = type(module).__name__
    if isinstance(module, nn.Embedding) or module_name.endswith("lm_head"):
        return "embeddings + lm_head"
    if "norm" in cls.lower():
        return "norms"
    if ".layers." in f".{module_name}." and (isinstance(module, nn.Linear) or "Linear" in cls):
        return "decoder linear"
    return "other"


def _quant_state_tensors(weight) -> list:
    """The tensors a bitsandbytes Params4bit keeps beside its packed data."""
    import torch

    qs = getattr(weight, "quant_state", None)
    if qs is None:
        return []
    out = [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        out += [t for t in (s2.absmax, s2.code) if isinstance(t, torch.Tensor)]
    return out


def weight_breakdown(model) -> dict[str, int]:
    """Bytes held per layer kind, each storage counted once (tied embeddings are one tensor)."""
    seen: set[int] = set()
    sizes = dict.fromkeys(KINDS, 0)
    for name, module in model.named_modules():
        kind = _kind(name, module)
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for p in list(module.parameters(recurse=False)):
            tensors += _quant_state_tensors(p)
        for t in tensors:
            if t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            sizes[kind] += t.untyped_storage().nbytes()
    return sizes


def load(path: str, dtype, mode: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype, "low_cpu_mem_usage": True}
    if mode != "16bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=(mode == "nf4+dq"),
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval(), torch


def count_params(model) -> dict[str, int]:
    """Parameter counts per kind on the 16-bit model (tied storage once)."""
    seen: set[int] = set()
    counts = dict.fromkeys(KINDS, 0)
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            counts[_kind(name, module)] += p.numel()
    return counts


def mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def measure(path: str, dtype_name: str) -> None:

    dtype = torch_dtype(dtype_name)
    columns: dict[str, dict[str, int]] = {}
    params: dict[str, int] = {}
    for mode in ("16bit", "nf4", "nf4+dq"):
        model, _ = load(path, dtype, mode)
        if mode == "16bit":
            params = count_params(model)
        columns[mode] = weight_breakdown(model)
        del model
        gc.collect()
    total_params = sum(params.values())
    print(f"\nWeight memory of {Path(path).name} on CPU ({total_params / 1e6:.1f}M params), MiB, measured:")
    print(f"| layer kind | params | {dtype_name} | NF4 | NF4 + double quant | 16-bit / NF4+DQ |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in (*KINDS, "total"):
        if kind == "total":
            row = {m: sum(c.values()) for m, c in columns.items()}
            n = total_params
        else:
            row = {m: c[kind] for m, c in columns.items()}
            n = params[kind]
        if n == 0 and row["16bit"] == 0:
            continue
        ratio = f"{row['16bit'] / row['nf4+dq']:.2f}x" if row["nf4+dq"] else "-"
        label = f"**{kind}**" if kind == "total" else kind
        print(
            f"| {label} | {n / 1e6:.1f}M | {mib(row['16bit'])} | {mib(row['nf4'])} | {mib(row['nf4+dq'])} | {ratio} |"
        )
    lin = params["decoder linear"]
    if lin:
        print(
            f"\nbytes/param on decoder linear weights: NF4 {columns['nf4']['decoder linear'] / lin:.4f}, "
            f"NF4+DQ {columns['nf4+dq']['decoder linear'] / lin:.4f} (16-bit: 2)"
        )


def planner_table() -> None:
    from model.shape import load_model_shape
    from planning.memory import weight_bytes

    print("\nThe planner's arithmetic (planning.memory.weight_bytes, bf16 for what stays unquantized), GiB:")
    print("| model | params | linear share | fp32 | bf16 | NF4 | NF4 + DQ | fp32 / NF4+DQ | bf16 / NF4+DQ |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("starcoder2-7b", "llama-3.1-8b"):
        if not (FIXTURES / name).is_dir():
            continue
        s = load_model_shape(FIXTURES / name)
        fp32 = s.total_params * 4
        bf16 = weight_bytes(s, "bfloat16", False)
        dq = weight_bytes(s, "bfloat16", True)
        kept = s.embedding_params + s.lm_head_params + s.other_params
        nf4 = kept * 2 + math.ceil(NF4_PLAIN_BYTES_PER_PARAM * s.decoder_linear_params)
        g = 2**30
        print(
            f"| {s.name} | {s.total_params / 1e9:.2f}B | {s.decoder_linear_params / s.total_params:.1%} | "
            f"{fp32 / g:.2f} | {bf16 / g:.2f} | {nf4 / g:.2f} | {dq / g:.2f} | {fp32 / dq:.2f}x | {bf16 / dq:.2f}x |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="the 16-bit dtype")
    p.add_argument("--planner-only", action="store_true", help="skip loading; only the planner's arithmetic")
    args = p.parse_args(argv)
    if not args.planner_only:
        from model.source import resolve_model

        measure(args.model or resolve_model(None).path, args.dtype)
    planner_table()


if __name__ == "__main__":
    main()
