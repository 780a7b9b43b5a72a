"""Load the model exactly the way the plan says: dtype, bitsandbytes NF4, device map, compile."""
from __future__ import annotations

import logging

import torch

from hardware.plan import ServingPlan, accelerate_max_memory

log = logging.getLogger("kiln.engine")


def torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model(path: str, plan: ServingPlan) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one log line per engine, not a progress bar per tensor
    dtype = torch_dtype(plan.dtype)
    kwargs: dict = {"dtype": dtype, "low_cpu_mem_usage": True}
    if plan.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=plan.double_quant,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_enable_fp32_cpu_offload=plan.offload,
        )
    if plan.device_map:
        kwargs["device_map"] = plan.device_map
        if max_memory := accelerate_max_memory(plan):
            kwargs["max_memory"] = max_memory
        if "disk" in plan.device_map.values():
            kwargs["offload_folder"] = str(offload_folder(path))
    elif plan.device != "cpu" or plan.quantization == "nf4":
        kwargs["device_map"] = {"": plan.device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    if plan.device_map and plan.offload:
        log.info("offload: %s", describe_offload(model))
    return model


def offload_folder(path: str):
    """Where accelerate may write disk-offloaded weights: a folder per model under the kiln cache.

    A safetensors checkpoint needs none of it (the offloaded tensors are memory-mapped from the
    checkpoint itself); other formats are written there once per load.
    """
    import hashlib
    from pathlib import Path

    from hardware.model_source import cache_dir

    key = hashlib.sha256(str(Path(path).expanduser().resolve()).encode()).hexdigest()[:12]
    folder = cache_dir() / "offload" / f"{Path(path).name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def describe_offload(model: torch.nn.Module) -> str:
    """For the log: how many decoder layers hold their weights on `meta` (offloaded, read in per forward)."""
    layers = list(getattr(getattr(model, "model", None), "layers", []) or [])
    offloaded = [i for i, layer in enumerate(layers)
                 if any(p.device.type == "meta" for p in layer.parameters())]
    where = getattr(model, "hf_device_map", None) or {}
    kinds = sorted({str(v) for v in where.values()})
    return (f"{len(offloaded)} of {len(layers)} decoder layers offloaded (weights loaded per forward by "
            f"accelerate hooks); devices in the map: {', '.join(kinds)}")


def compile_model(model: torch.nn.Module) -> str:
    """Compile each decoder layer's MLP (the bulk of the FLOPs); returns a line for the log."""
    try:
        for layer in model.model.layers:
            layer.mlp.forward = torch.compile(layer.mlp.forward, dynamic=True)
        return "torch.compile on every decoder layer's MLP"
    except Exception as exc:  # Triton missing, unsupported platform: eager still works
        return f"torch.compile unavailable ({exc!s:.120}); running eager"
