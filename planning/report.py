"""`cli.py plan`: print the plan as a three-column table or JSON, with no weights and no torch."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Sequence

import msgspec

from hardware.profile import HardwareProfile
from hardware.profile import format_bytes as fb
from planning.plan import PlanOverrides, ServingPlan

ROWS = (
    "device",
    "dtype",
    "cpu_formats",
    "kv_dtype",
    "quantization",
    "offload",
    "embed_lm_head",
    "max_batch",
    "max_context",
    "kv_cache_tokens",
    "kv_block_size",
    "prefix_caching",
    "weights_bytes",
    "compile",
    "cuda_graphs",
    "prefill_chunk",
)
GPU_ONLY_ROWS = {"embed_lm_head", "cuda_graphs"}  # on a CPU-only machine every weight is in RAM (or on disk)
CPU_ONLY_ROWS = {"cpu_formats"}  # GPU plans choose the dtype from the compute capability, nothing is timed


def _where(device: str | int | None) -> str:
    return {"cpu": "RAM", "disk": "disk"}.get(str(device), f"GPU {device}")


def _embed_lm_head(plan: ServingPlan) -> str:
    """Where the embedding table and lm_head live, from the device map (other code reads the same keys)."""
    dm = plan.device_map or {}
    embed = _where(dm.get("model.embed_tokens", dm.get("")))
    lm_head = _where(dm.get("lm_head", dm.get("")))
    if embed == lm_head:
        return f"both {'in' if embed == 'RAM' else 'on'} {embed}"
    return f"embed {embed}, lm_head {lm_head}"


def _value(plan: ServingPlan, key: str) -> str:
    if key == "quantization":
        if plan.quantization == "int8":
            return "int8 weight-only (per row)"
        if plan.quantization == "int4":
            return "int4 weight-only (groups of 32)"
        return f"nf4 (double quant: {'yes' if plan.double_quant else 'no'})" if plan.quantization else "none"
    if key == "offload":
        if not plan.offload or not plan.device_map:
            return "no"
        where = {"cpu": "in RAM", "disk": "on disk"}
        counts: dict[str, int] = {}
        for name, device in plan.device_map.items():
            if name.startswith("model.layers."):
                label = where.get(str(device), f"on GPU {device}")
                counts[label] = counts.get(label, 0) + 1
        return "yes: " + ", ".join(f"{n} layers {label}" for label, n in counts.items())
    if key == "weights_bytes":
        return fb(plan.weights_bytes)
    if key == "embed_lm_head":
        return _embed_lm_head(plan)
    if key == "kv_cache_tokens":
        return (
            f"{plan.kv_cache_tokens} ({fb(plan.kv_cache_bytes)})" if plan.kv_cache_bytes else str(plan.kv_cache_tokens)
        )
    if key == "kv_dtype":
        return plan.kv_dtype or plan.dtype
    if key == "kv_block_size":
        return f"{plan.kv_block_size} tokens"
    if key == "prefix_caching":
        return "on" if plan.prefix_caching else "off"
    if key == "cpu_formats":
        return "measured" if plan.cpu_format_ms else "not measured yet"
    if key in ("compile", "cuda_graphs"):
        return "yes" if getattr(plan, key) else "no"
    return str(getattr(plan, key))


def _reason(plan: ServingPlan, key: str) -> str:
    if key == "kv_dtype" and not plan.kv_dtype:
        return "the weight dtype"
    if key == "embed_lm_head" and key not in plan.reasons:
        return "on the GPU with every other weight"
    if key == "weights_bytes":
        params = f"{plan.total_params / 1e9:.2f}B params" if plan.total_params else "weights"
        held = {
            "nf4": f"NF4 + {plan.dtype}",
            "int8": f"int8 linears + {plan.dtype}",
            "int4": f"int4 linears + {plan.dtype}",
        }.get(plan.quantization, plan.dtype)
        return f"{params} at {held}; from the config's parameter counts"
    return plan.reasons.get(key, "")


def _shown(plan: ServingPlan, key: str) -> bool:
    on_cpu = plan.device == "cpu"
    return not (key in GPU_ONLY_ROWS and on_cpu or key in CPU_ONLY_ROWS and not on_cpu)


def format_plan_table(plan: ServingPlan, width: int | None = None) -> str:
    """decision | value | reason, the reason wrapped to the terminal width; forced rows marked '*'."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    rows = []
    for key in ROWS:
        if not _shown(plan, key):
            continue
        forced = key in plan.overridden or (
            key == "offload" and ("cpu_offload" in plan.overridden or "gpu_layers" in plan.overridden)
        )
        rows.append((key + (" *" if forced else ""), _value(plan, key), _reason(plan, key)))
    w0 = max(len("decision"), *(len(r[0]) for r in rows))
    w1 = min(28, max(len("value"), *(len(r[1]) for r in rows)))
    w2 = max(30, width - w0 - w1 - 4)
    lines = [f"{'decision':<{w0}}  {'value':<{w1}}  reason", f"{'-' * w0}  {'-' * w1}  {'-' * min(w2, 40)}"]
    for name, value, reason in rows:
        wrapped = textwrap.wrap(reason, w2) or [""]
        lines.append(f"{name:<{w0}}  {value:<{w1}}  {wrapped[0]}")
        lines.extend(f"{'':<{w0}}  {'':<{w1}}  {more}" for more in wrapped[1:])
    if plan.overridden:
        lines.append(f"* forced by a flag or env var: {', '.join(plan.overridden)}")
    return "\n".join(lines)


def plan_to_json(plan: ServingPlan) -> str:
    """The whole plan as JSON (quantization is "nf4", "int8", "int4" or null); keys are the ServingPlan field names."""
    return msgspec.json.format(msgspec.json.encode(plan).decode(), indent=2)


def _header(plan: ServingPlan, profile: HardwareProfile, source: str) -> str:
    gpus = (
        ", ".join(
            f"{g.name} {fb(g.total_bytes)} cc {g.compute_capability[0]}.{g.compute_capability[1]}" for g in profile.gpus
        )
        or "no GPU"
    )
    return (
        f"model: {plan.model} ({plan.total_params / 1e9:.2f}B params, from {source})\n"
        f"machine: {profile.cpu_cores} cores, {fb(profile.ram_available_bytes)} RAM available of "
        f"{fb(profile.ram_total_bytes)}; {gpus}\n"
    )


def run_plan_command(
    model: str | None,
    gpus: Sequence[str] = (),
    ram: str | None = None,
    cpu_only: bool = False,
    as_json: bool = False,
    overrides: PlanOverrides = PlanOverrides(),
    gpu_index: int | None = None,
) -> int:
    """Print the plan for `model` on this machine (or a simulated one); 0 on success, 2 with the reason on stderr."""
    from hardware.profile import detect_hardware, simulated_profile
    from model.shape import ModelConfigError, model_shape_for_spec
    from model.source import ModelNotFound
    from planning.planner import PlanError, make_plan

    try:
        shape = model_shape_for_spec(model)
        simulated = bool(gpus) or ram is not None or cpu_only
        profile = simulated_profile(gpus, ram, cpu_only, shape) if simulated else detect_hardware(shape)
        plan = make_plan(shape, profile, overrides, gpu_index=gpu_index)
    except (PlanError, ModelConfigError, ModelNotFound, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(plan_to_json(plan))
    else:
        print(_header(plan, profile, os.path.basename(shape.source) or shape.source))
        print(format_plan_table(plan))
        for note in shape.notes:
            print(f"note: {note}")
    return 0
