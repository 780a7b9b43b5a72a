"""Load the model exactly the way the plan says: dtype, bitsandbytes NF4, device map, compile."""

from __future__ import annotations

import logging

import torch

from hardware.heap import release_freed_memory
from planning.dtypes import torch_dtype
from planning.plan import ServingPlan, accelerate_max_memory

log = logging.getLogger("kiln.engine")


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
    if plan.quantization == "int8":
        from engine_core.int8_weights import quantize_linears

        log.info(quantize_linears(model, plan.cpu_format_ms))  # the timings say from how many rows to dequantize
    if plan.quantization == "int4":
        from engine_core.int4_weights import quantize_linears as to_int4

        log.info(to_int4(model, plan.cpu_format_ms, gguf_int4_codes(path, model)))
    if plan.quantization in ("int8", "int4"):
        own_the_rest(model)  # let go of the checkpoint's mapping: 2.9 GB of RSS for a 1.5B bf16 checkpoint
        release_freed_memory()  # the 16-bit linears just replaced: ~0.2 GB of RSS for the default model
    if plan.quantization == "nf4" and plan.offload:
        cast_offloaded_weights(model, dtype)
    if names := cpu_resident_modules(plan):
        keep_resident_on_cpu(model, names)
    if plan.device_map and plan.offload:
        log.info("offload: %s", describe_offload(model))
    return model


def gguf_int4_codes(path: str, model: torch.nn.Module):
    """The 4-bit codes a GGUF conversion kept beside the weights (model/gguf_int4.py), or None (any other
    checkpoint: its float weights are quantized instead). A tied LM head shares the embedding's codes."""
    from model.gguf_int4 import Int4Codes

    tied = getattr(model.config, "tie_word_embeddings", False)
    return Int4Codes.in_folder(path, {"lm_head": "model.embed_tokens"} if tied else None)


def own_the_rest(model: torch.nn.Module) -> int:
    """Copy the parameters a quantized plan keeps in float (norms, biases, an embedding it keeps) into the
    process's own memory; returns the bytes copied.

    transformers loads a safetensors checkpoint already in the plan's dtype as views of the file's memory map.
    While any tensor views it the whole mapping stays, and every page of it read while quantizing (all the float
    linears) counts in the engine's resident size as long as the process lives: 2.9 GB for a 1.5B bf16
    checkpoint whose int4 weights are 1 GB. Copies of the few small tensors left let the mapping go. Tied
    parameters stay one tensor."""
    copies: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in copies:
                copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            module._parameters[name] = copies[id(param)]
    return sum(p.numel() * p.element_size() for p in copies.values())


CPU_PLACEABLE = ("model.embed_tokens", "lm_head")  # what a GPU plan may keep in RAM and run on CPU


def cpu_resident_modules(plan: ServingPlan) -> list[str]:
    """The modules a GPU plan puts on "cpu" to run there (not accelerate's copy-to-GPU-per-forward offload)."""
    if plan.device == "cpu" or not plan.device_map:
        return []
    return [name for name in CPU_PLACEABLE if plan.device_map.get(name) == "cpu"]


def _hooks(module: torch.nn.Module) -> list:
    """accelerate hooks on `module` itself (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", None) or [hook])


def _offloaded_weight(hook, name: str) -> torch.Tensor | None:
    """The real tensor behind a meta parameter `name`, from an offload hook's weights_map."""
    weights = getattr(hook, "weights_map", None)
    if not getattr(hook, "offload", False) or weights is None:
        return None
    try:
        return weights[name]
    except KeyError:
        return None


def keep_resident_on_cpu(model: torch.nn.Module, names: list[str]) -> None:
    """Make `names` (embed_tokens / lm_head) live in RAM and run on CPU, called from GPU code unchanged.

    accelerate reads "cpu" in a GPU device_map as offload: weights on meta, copied to the GPU on every
    forward (a 1 GB embedding table per step, and GPU memory the plan did not budget). Here each such
    module loses that hook, gets its real weights back on CPU, and runs under a hook that moves its
    inputs to CPU and its outputs back to the caller's device. Tied weights stay one tensor.
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    for name in names:
        module = model.get_submodule(name)
        hooks = _hooks(module)
        for pname, param in list(module.named_parameters(recurse=False)):
            source = param
            if param.device.type == "meta":
                source = next((t for h in hooks if (t := _offloaded_weight(h, pname)) is not None), None)
                if source is None:
                    raise RuntimeError(f"{name}.{pname} is on meta and no offload hook holds its weights")
            module._parameters[pname] = torch.nn.Parameter(source.detach().to("cpu", param.dtype), requires_grad=False)
        remove_hook_from_module(module, recurse=True)
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    if set(CPU_PLACEABLE) <= set(names) and getattr(model.config, "tie_word_embeddings", False):
        # accelerate's meta/offload round trip leaves two parameters; tied weights are one tensor
        model.get_submodule("lm_head")._parameters["weight"] = model.get_submodule("model.embed_tokens").weight
    log.info("kept on CPU, run there: %s", ", ".join(names))


def cast_offloaded_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Offloaded floating weights in `dtype` (the compute dtype); returns how many were cast.

    bitsandbytes' llm_int8_enable_fp32_cpu_offload may leave offloaded layers fp32 (transformers 5.17
    on an H100 loaded them in the compute dtype already; older versions did not): a bf16 hidden state
    would then meet an fp32 weight, and each per-forward copy would move twice the bytes the plan
    counts. accelerate casts a weight to its meta parameter's dtype when it loads it, so both the
    meta parameter and the RAM copy in the hook's weights_map are cast.
    """
    cast = 0
    for module in model.modules():
        for hook in _hooks(module):
            for pname, param in list(module.named_parameters(recurse=False)):
                if param.device.type != "meta" or not param.is_floating_point() or param.dtype == dtype:
                    continue
                if _offloaded_weight(hook, pname) is None:
                    continue
                module._parameters[pname] = torch.nn.Parameter(param.to(dtype), requires_grad=False)
                _cast_in_weights_map(hook.weights_map, pname, dtype)
                cast += 1
    if cast:
        log.info("cast %d offloaded weights to %s (compute dtype)", cast, dtype)
    return cast


def _cast_in_weights_map(weights, name: str, dtype: torch.dtype) -> None:
    """Replace the RAM copy of `name` (a PrefixedDataset over accelerate's OffloadedWeightsLoader) by a cast one.

    Weights read from disk are not rewritten: accelerate casts them to the meta parameter's dtype on load.
    """
    loader, key = getattr(weights, "dataset", None), getattr(weights, "prefix", "") + name
    state = getattr(loader, "state_dict", None)
    if isinstance(state, dict) and key in state and state[key].is_floating_point():
        state[key] = state[key].to(dtype)


def offload_folder(path: str):
    """Where accelerate may write disk-offloaded weights: a folder per model under the kiln cache.

    A safetensors checkpoint needs none of it (the offloaded tensors are memory-mapped from the
    checkpoint itself); other formats are written there once per load.
    """
    import hashlib
    from pathlib import Path

    from model.source import cache_dir

    key = hashlib.sha256(str(Path(path).expanduser().resolve()).encode()).hexdigest()[:12]
    folder = cache_dir() / "offload" / f"{Path(path).name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def describe_offload(model: torch.nn.Module) -> str:
    """For the log: how many decoder layers hold their weights on `meta` (offloaded, read in per forward)."""
    layers = list(getattr(getattr(model, "model", None), "layers", []) or [])
    offloaded = [i for i, layer in enumerate(layers) if any(p.device.type == "meta" for p in layer.parameters())]
    where = getattr(model, "hf_device_map", None) or {}
    kinds = sorted({str(v) for v in where.values()})
    return (
        f"{len(offloaded)} of {len(layers)} decoder layers offloaded (weights loaded per forward by "
        f"accelerate hooks); devices in the map: {', '.join(kinds)}"
    )


def compile_model(model: torch.nn.Module) -> str:
    """Compile every decoder layer (regional compilation: the layers share one compiled graph, since
    torch inlines module parameters as inputs), fusing the norms, rotary and residual ops around the
    matmuls; on a GPU the decode graphs are then captured over the compiled kernels. Returns a log line."""
    try:
        import torch._dynamo

        # one entry per key span and batch shape, per layer code object: more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in model.model.layers:
            layer.compile(dynamic=None)
        return "torch.compile on every decoder layer (regional)"
    except Exception as exc:  # Triton missing, unsupported platform: eager still works
        return f"torch.compile unavailable ({exc!s:.120}); running eager"
