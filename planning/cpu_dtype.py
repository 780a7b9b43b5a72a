"""Dtypes on CPU: the weight format from timings measured on this machine (else a guess from the CPU
flags), and K/V kept in float32."""

from __future__ import annotations

from hardware.profile import HardwareProfile

CPU_KV_DTYPE = "float32"
# K/V stay fp32 on CPU: torch's CPU attention kernels are far slower in bf16 (decode at 160 cached tokens,
# batch 10: 780 vs 120 µs per layer on a 2-core EPYC), worth twice the KV bytes of a small model.
CPU_KV_REASON = (
    "float32 on CPU: torch's CPU attention kernels are not reliably faster in bf16 (on some CPUs several "
    "times slower at decode) and fp32 keeps the attention exact, so K/V stay fp32 whatever the weight dtype"
)
# Weight formats the CPU loader can use, in order of preference on a tie; measured by engine_core/cpu_formats.py.
# "int8": int8 weight-only linears (one scale per row) with bf16 activations (engine_core/int8_weights.py); int8
# dynamic quantization (activations quantized per step) is left out: less exact, and no faster at decode sizes.
CPU_WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
INT8_COMPUTE_DTYPE = "bfloat16"  # the dtype of everything an int8 plan keeps unquantized, and of its activations
CPU_FORMAT_MARGIN = 0.90  # another format replaces float32 only when it takes ≤ 90% of float32's time


def format_timings(ms: dict[str, float]) -> dict[str, dict[int, float]]:
    """{"float32@1": 34.0, ...} -> {"float32": {1: 34.0}, ...}; keys without "<format>@<rows>" are skipped."""
    by_format: dict[str, dict[int, float]] = {}
    for key, value in ms.items():
        fmt, _, rows = key.partition("@")
        if rows.isdigit():
            by_format.setdefault(fmt, {})[int(rows)] = value
    return by_format


def _beats(candidate: dict[int, float], base: dict[int, float]) -> bool:
    """Measured at every batch size float32 was, and at least CPU_FORMAT_MARGIN faster at each."""
    return bool(base) and all(b in candidate and candidate[b] <= CPU_FORMAT_MARGIN * base[b] for b in base)


def fastest_cpu_format(ms: dict[str, float]) -> str | None:
    """The weight format to load on CPU given measured timings, or None when float32 was not measured.

    float32 unless another loadable format is at least 10% faster at every measured batch size:
    float32 is the exact one (token for token with transformers), so near-ties keep it."""
    timings = format_timings(ms)
    base = timings.get("float32")
    if not base:
        return None
    faster = [f for f in CPU_WEIGHT_FORMATS if f != "float32" and _beats(timings.get(f, {}), base)]
    return min(faster, key=lambda f: sum(timings[f].values()), default="float32")


def _timings_summary(timings: dict[str, dict[int, float]]) -> str:
    """'float32 34.0 / 63.6, bfloat16 20.7 / 25.8 ms per decode step at batch 1 / 8'."""
    rows = sorted({b for t in timings.values() for b in t})
    per_format = ", ".join(
        f"{fmt} {' / '.join(f'{t[b]:.1f}' if b in t else '-' for b in rows)}" for fmt, t in timings.items()
    )
    return f"{per_format} ms per decode step at batch {' / '.join(map(str, rows))}"


def describe_cpu_formats(ms: dict[str, float]) -> str:
    """The cpu_formats reason: the measured timings and what they cover, or that none were measured yet."""
    timings = format_timings(ms)
    if not timings:
        return (
            "not measured on this machine for this model yet: the engine times each weight format on the "
            "model's own layer shapes at its first start and caches the result"
        )
    return (
        f"{_timings_summary(timings)} (every linear + lm_head, random weights at this model's shapes, one "
        "thread); measured at an engine's first start, cached per machine and model"
    )


def cpu_dtype_default(profile: HardwareProfile) -> tuple[str, str]:
    """(format, why) for CPU weights: the measured fastest of CPU_WEIGHT_FORMATS, else a guess from the CPU
    flags (float32 or bfloat16: int8 is only ever chosen by measurement)."""
    measured = fastest_cpu_format(profile.cpu_format_ms)
    if measured is not None:
        summary = _timings_summary(format_timings(profile.cpu_format_ms))
        if measured == "float32":
            return "float32", (
                f"measured on this CPU at this model's shapes, no other format is {1 - CPU_FORMAT_MARGIN:.0%} "
                f"faster at every batch size, and fp32 is exact: {summary}"
            )
        what = "int8 weight-only linears (one scale per row) computing in bf16, " if measured == "int8" else ""
        return measured, (
            f"{what}measured on this CPU at this model's shapes, the fastest and at least "
            f"{1 - CPU_FORMAT_MARGIN:.0%} faster than float32 at every batch size: {summary}"
        )
    guess = "not measured yet, so a guess from the CPU flags (the engine measures at its first start)"
    if profile.cpu_bf16:
        return "bfloat16", (
            f"{guess}: this CPU computes bf16 natively (avx512_bf16/amx_bf16), and bf16 weights are "
            "half the memory traffic of fp32 per decode step"
        )
    return (
        "float32",
        f"{guess}: no native bf16 (no avx512_bf16/amx_bf16), so bf16 matmuls may be emulated, slower than fp32",
    )


def cpu_plan_fields(reasons: dict[str, str], profile: HardwareProfile) -> dict:
    """What every CPU plan adds (K/V dtype, the measured format timings), with their reasons."""
    reasons["kv_dtype"] = CPU_KV_REASON
    reasons["cpu_formats"] = describe_cpu_formats(profile.cpu_format_ms)
    return {"kv_dtype": CPU_KV_DTYPE, "cpu_format_ms": dict(profile.cpu_format_ms)}
