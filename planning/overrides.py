"""User overrides from env vars (QUANTIZATION, ENABLE_COMPILE) and CLI flags, flags winning.

Values are normalized here so the planner sees one spelling ("nf4"/"none", "bfloat16"...),
and `PlanOverrides.sources` remembers who forced what so each reason can say so.
"""

from __future__ import annotations

from collections.abc import Mapping

from planning.dtypes import normalize_dtype
from planning.plan import PlanOverrides

_QUANT = {
    "nf4": "nf4",
    "4bit": "nf4",
    "4-bit": "nf4",
    "bnb-4bit": "nf4",
    "bnb4": "nf4",
    "int4": "int4",
    "q4": "int4",
    "int8": "int8",
    "q8": "int8",
    "none": "none",
    "no": "none",
    "off": "none",
    "16bit": "none",
    "false": "none",
    "0": "none",
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
# what --quantization offers (QUANTIZATION accepts every alias above); int8 and int4 are kiln's CPU weight-only
# formats (engine_core/int8_weights.py, int4_weights.py), otherwise chosen by measurement; nf4 is bitsandbytes'
QUANTIZATIONS = ("nf4", "4bit", "int8", "int4", "none")
# Bounds of the numeric overrides, (min, max or None), inclusive: the click options in cli.py and the
# checks here both read them. max_batch may exceed the planner's own choice (at most 256) when forced.
BOUNDS: dict[str, tuple[int | float, int | float | None]] = {
    "max_batch": (1, 1024),
    "max_context": (16, None),
    "kv_cache_tokens": (256, None),
    "gpu_memory_fraction": (0.05, 1.0),
    "gpu_layers": (0, None),
}
FIELDS = (
    "dtype",
    "quantization",
    "max_batch",
    "max_context",
    "gpu_memory_fraction",
    "cpu_offload",
    "compile",
    "prefix_caching",
    "kv_cache_tokens",
    "gpu_layers",
)


def normalize_quantization(value: str) -> str:
    """'4bit' / 'nf4' -> 'nf4'; 'int8', 'int4' (CPU weight-only formats); 'None' / 'none' -> 'none' (forces 16-bit)."""
    key = value.strip().lower()
    if key not in _QUANT:
        raise ValueError(f"unknown quantization {value!r}: use nf4 (alias 4bit), int8, int4 (CPU) or none")
    return _QUANT[key]


def check_bounds(field: str, value: int | float | None, name: str) -> None:
    """ValueError naming `name` when `value` is outside BOUNDS[field]; None passes."""
    lo, hi = BOUNDS[field]
    if value is None or (lo <= value and (hi is None or value <= hi)):
        return
    raise ValueError(f"{name} must be at least {lo}" if hi is None else f"{name} must be in [{lo}, {hi}]")


def overrides_from_env(environ: Mapping[str, str]) -> PlanOverrides:
    """QUANTIZATION=4bit|nf4|int8|int4|None|none, ENABLE_COMPILE=1|0 and GPU_LAYERS=N (decoder layers on the GPU, or
    in RAM on a CPU-only machine; the rest are offloaded); unset or empty means no override."""
    fields: dict = {}
    sources: dict[str, str] = {}
    if q := environ.get("QUANTIZATION", "").strip():
        fields["quantization"] = normalize_quantization(q)
        sources["quantization"] = f"QUANTIZATION={q}"
    if g := environ.get("GPU_LAYERS", "").strip():
        if not g.isdigit():
            raise ValueError(f"GPU_LAYERS={g!r}: use a layer count (0 or more)")
        check_bounds("gpu_layers", int(g), "GPU_LAYERS")
        fields["gpu_layers"] = int(g)
        sources["gpu_layers"] = f"GPU_LAYERS={g}"
    if c := environ.get("ENABLE_COMPILE", "").strip().lower():
        if c not in _TRUE | _FALSE:
            raise ValueError(f"ENABLE_COMPILE={c!r}: use 1 or 0")
        fields["compile"] = c in _TRUE
        sources["compile"] = f"ENABLE_COMPILE={c}"
    return PlanOverrides(**fields, sources=sources)


def overrides_from_flags(
    *,
    dtype: str | None = None,
    quantization: str | None = None,
    max_batch: int | None = None,
    max_context: int | None = None,
    gpu_memory_fraction: float | None = None,
    cpu_offload: bool | None = None,
    compile: bool | None = None,
    prefix_caching: bool | None = None,
    kv_cache_tokens: int | None = None,
    gpu_layers: int | None = None,
) -> PlanOverrides:
    """CLI flag values (None = flag not given), validated; sources read '--flag'."""
    for field, value in (
        ("max_batch", max_batch),
        ("max_context", max_context),
        ("gpu_memory_fraction", gpu_memory_fraction),
        ("kv_cache_tokens", kv_cache_tokens),
        ("gpu_layers", gpu_layers),
    ):
        check_bounds(field, value, "--" + field.replace("_", "-"))
    values = {
        "dtype": normalize_dtype(dtype) if dtype is not None else None,
        "quantization": normalize_quantization(quantization) if quantization is not None else None,
        "max_batch": max_batch,
        "max_context": max_context,
        "gpu_memory_fraction": gpu_memory_fraction,
        "cpu_offload": cpu_offload,
        "compile": compile,
        "prefix_caching": prefix_caching,
        "kv_cache_tokens": kv_cache_tokens,
        "gpu_layers": gpu_layers,
    }
    given = {k: v for k, v in values.items() if v is not None}
    sources = {k: _flag_text(k, v) for k, v in given.items()}
    return PlanOverrides(**given, sources=sources)


def _flag_text(field: str, value) -> str:
    flag = "--" + field.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + field.replace("_", "-")
    return f"{flag} {value}"


def merge_overrides(flags: PlanOverrides, env: PlanOverrides) -> PlanOverrides:
    """Flag values win over env values, field by field."""
    merged, sources = {}, {}
    for name in FIELDS:
        for layer in (flags, env):
            value = getattr(layer, name)
            if value is not None:
                merged[name] = value
                sources[name] = layer.sources.get(name, "override")
                break
    return PlanOverrides(**merged, sources=sources)


def resolve_overrides(environ: Mapping[str, str], **flags) -> PlanOverrides:
    """What `cli.py` calls: env overrides, then the given flag values (keyword args of overrides_from_flags) on top."""
    return merge_overrides(overrides_from_flags(**flags), overrides_from_env(environ))


def describe(overrides: PlanOverrides, field: str) -> str:
    """'forced by --max-batch 8' style text for a reason."""
    return "forced by " + overrides.sources.get(field, "override")
