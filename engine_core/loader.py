"""Load the model exactly the way the plan says: dtype, bitsandbytes NF4, device map, compile."""
from __future__ import annotations

import logging

import torch

from hardware.plan import ServingPlan

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
        max_memory = getattr(plan, "max_memory", None)
        if max_memory:
            kwargs["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in max_memory.items()}
    elif plan.device != "cpu" or plan.quantization == "nf4":
        kwargs["device_map"] = {"": plan.device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model


def compile_model(model: torch.nn.Module) -> str:
    """Compile each decoder layer's MLP (the bulk of the FLOPs); returns a line for the log."""
    try:
        for layer in model.model.layers:
            layer.mlp.forward = torch.compile(layer.mlp.forward, dynamic=True)
        return "torch.compile on every decoder layer's MLP"
    except Exception as exc:  # Triton missing, unsupported platform: eager still works
        return f"torch.compile unavailable ({exc!s:.120}); running eager"
