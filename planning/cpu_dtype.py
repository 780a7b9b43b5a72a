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
# Weight formats the CPU loader can use, most exact first (the order of preference on a tie); measured by
# engine_core/cpu_formats.py. "int8": int8 weight-only linears (one scale per row) with bf16 activations
# (engine_core/int8_weights.py); int8 dynamic quantization (activations quantized per step) is left out: less
# exact, and no faster at decode sizes. "int4": int4 weight-only linears (a scale and zero per 32 weights) with
# bf16 activations (engine_core/int4_weights.py).
CPU_WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")
QUANTIZED_FORMATS = ("int8", "int4")  # weight-only formats: a plan names them in `quantization`, dtype bf16
INT8_COMPUTE_DTYPE = (
    "bfloat16"  # the dtype of everything an int8 or int4 plan keeps unquantized, and of its activations
)
CPU_FORMAT_MARGIN = 0.90  # another format replaces float32 only when it takes ≤ 90% of float32's time
# int4 rounds each weight to one of 16 levels per group of 32: it replaces the format otherwise chosen only when
# its decode steps take ≤ 95% of that format's (summed over the batch sizes timed), not on a near-tie
INT4_MARGIN = 0.95
# What the probe times, as "<format>@<rows>" keys: decode steps (ms per step: every linear + lm_head) at these
# batch sizes, and prompt chunks (ms per chunk: the decoder layers' linears only, a chunk's logits being its last
# row's) at these row counts. INT8_DEQUANT (INT4_DEQUANT) is the int8 (int4) format's other path, timed at prompt
# chunks only: the weights dequantized to bf16 per call and a bf16 matmul (engine_core/int8_weights.py,
# engine_core/int4_weights.py), for many rows.
DECODE_BATCHES = (1, 8)
PROMPT_CHUNKS = (64, 256)
INT8_DEQUANT = "int8-dequant"
INT4_DEQUANT = "int4-dequant"


def dequant_key(fmt: str) -> str:
    """The probe's name for `fmt`'s dequantized path: "int8-dequant", "int4-dequant"."""
    return f"{fmt}-dequant"


def format_timings(ms: dict[str, float]) -> dict[str, dict[int, float]]:
    """{"float32@1": 34.0, ...} -> {"float32": {1: 34.0}, ...}; keys without "<format>@<rows>" are skipped."""
    by_format: dict[str, dict[int, float]] = {}
    for key, value in ms.items():
        fmt, _, rows = key.partition("@")
        if rows.isdigit():
            by_format.setdefault(fmt, {})[int(rows)] = value
    return by_format


def is_prompt_chunk(rows: int) -> bool:
    return rows >= PROMPT_CHUNKS[0]


def decode_steps(timings: dict[int, float]) -> dict[int, float]:
    return {rows: v for rows, v in timings.items() if not is_prompt_chunk(rows)}


def int8_dequant_from_rows(ms: dict[str, float]) -> int | None:
    return dequant_from_rows(ms, "int8")


def dequant_from_rows(ms: dict[str, float], fmt: str) -> int | None:
    """The fewest rows from which `fmt` (int8 or int4) linears measured faster dequantized to bf16 than through
    their kernel, at that prompt chunk and every larger one timed; None when never (or not measured)."""
    timings = format_timings(ms)
    kernel, dequant = timings.get(fmt, {}), timings.get(dequant_key(fmt), {})
    threshold = None
    for rows in sorted((r for r in dequant if r in kernel and is_prompt_chunk(r)), reverse=True):
        if dequant[rows] >= kernel[rows]:
            break
        threshold = rows
    return threshold


def prompt_chunks(ms: dict[str, float], fmt: str) -> dict[int, float]:
    """ms per prompt chunk by rows for `fmt` as the loaded model computes it (int8, int4: by the path its rows take)."""
    timings = format_timings(ms)
    chunks = {rows: v for rows, v in timings.get(fmt, {}).items() if is_prompt_chunk(rows)}
    threshold = dequant_from_rows(ms, fmt) if fmt in QUANTIZED_FORMATS else None
    if threshold is not None:
        chunks.update({rows: v for rows, v in timings[dequant_key(fmt)].items() if rows >= threshold})
    return chunks


def _beats(candidate: dict[int, float], base: dict[int, float]) -> bool:
    """Measured at every batch size float32 was, and at least CPU_FORMAT_MARGIN faster at each."""
    return bool(base) and all(b in candidate and candidate[b] <= CPU_FORMAT_MARGIN * base[b] for b in base)


def _keeps_up(candidate: dict[int, float], base: dict[int, float]) -> bool:
    """Measured at every prompt chunk float32 was, and no slower at any."""
    return all(rows in candidate and candidate[rows] <= base[rows] for rows in base)


def fastest_cpu_format(ms: dict[str, float]) -> str | None:
    """The weight format to load on CPU given measured timings, or None when float32 was not measured.

    float32 unless another loadable format is at least 10% faster at every measured decode batch size and
    no slower at any measured prompt chunk: float32 is the exact one (token for token with transformers), so
    near-ties keep it, and a format that wins decode by its bytes but loses prompts (bf16 emulated without
    native dot products) would trade time to first token for it. Among those, the fastest at decode (summed
    over the batch sizes timed), except that int4, the least exact, must take at most INT4_MARGIN of the time
    of the fastest of the others."""
    timings = format_timings(ms)
    base = decode_steps(timings.get("float32", {}))
    if not base:
        return None
    base_prompt = prompt_chunks(ms, "float32")
    faster = [
        f
        for f in CPU_WEIGHT_FORMATS
        if f != "float32"
        and _beats(decode_steps(timings.get(f, {})), base)
        and _keeps_up(prompt_chunks(ms, f), base_prompt)
    ]

    def total(fmt: str) -> float:
        return sum(decode_steps(timings[fmt]).values())

    exact = min((f for f in faster if f != "int4"), key=total, default="float32")
    if "int4" in faster and total("int4") <= INT4_MARGIN * total(exact):
        return "int4"
    return exact


def passed_over(ms: dict[str, float], chosen: str) -> str:
    """Why each format faster at decode than `chosen` (summed over the batch sizes timed) was not taken, e.g.
    'int4 (slower than float32 at prompt chunks of 64 rows: 147.7 vs 119.7 ms)'; '' when none was."""
    timings = format_timings(ms)
    base = decode_steps(timings.get("float32", {}))
    base_prompt = prompt_chunks(ms, "float32")

    def total(fmt: str) -> float:
        return sum(decode_steps(timings.get(fmt, {})).values())

    reasons = []
    for fmt in CPU_WEIGHT_FORMATS:
        decode = decode_steps(timings.get(fmt, {}))
        if fmt in (chosen, "float32") or not decode or total(fmt) >= total(chosen) or set(decode) != set(base):
            continue
        slow = [b for b in sorted(base) if decode[b] > CPU_FORMAT_MARGIN * base[b]]
        chunks = prompt_chunks(ms, fmt)
        lost = [r for r in sorted(base_prompt) if r in chunks and chunks[r] > base_prompt[r]]
        if slow:
            why = f"not {1 - CPU_FORMAT_MARGIN:.0%} faster than float32 at batch {slow[0]}"
        elif lost:
            r = lost[0]
            why = f"slower than float32 at prompt chunks of {r} rows: {chunks[r]:.1f} vs {base_prompt[r]:.1f} ms"
        elif fmt == "int4":
            why = f"not {1 - INT4_MARGIN:.0%} faster than {chosen}: {total(fmt):.1f} vs {total(chosen):.1f} ms summed"
        else:
            continue
        reasons.append(f"{fmt} ({why})")
    return "; ".join(reasons)


def _per_format(timings: dict[str, dict[int, float]], rows: list[int]) -> str:
    return ", ".join(
        f"{fmt} {' / '.join(f'{t[b]:.1f}' if b in t else '-' for b in rows)}"
        for fmt, t in timings.items()
        if any(b in t for b in rows)
    )


def _timings_summary(timings: dict[str, dict[int, float]]) -> str:
    """'float32 34.0 / 63.6, bfloat16 20.7 / 25.8 ms per decode step at batch 1 / 8', then the prompt chunks'
    ('; float32 180.0 / 700.0, ... ms per prompt chunk of 64 / 256 rows') where they were timed."""
    every = sorted({b for t in timings.values() for b in t})
    decode, prompt = [b for b in every if not is_prompt_chunk(b)], [b for b in every if is_prompt_chunk(b)]
    summary = f"{_per_format(timings, decode)} ms per decode step at batch {' / '.join(map(str, decode))}"
    if prompt:
        paths = [f"{dequant_key(f)}: {f} weights dequantized to bf16 per call" for f in QUANTIZED_FORMATS]
        paths = [p for f, p in zip(QUANTIZED_FORMATS, paths) if dequant_key(f) in timings]
        summary += f"; {_per_format(timings, prompt)} ms per prompt chunk of {' / '.join(map(str, prompt))} rows"
        summary += f" ({', '.join(paths)})" if paths else ""
    return summary


def phase_paths(ms: dict[str, float], fmt: str) -> str:
    """How `fmt` computes each phase, with its measured times, e.g. 'int8 for decode (8.6 ms per step at
    batch 1), prompt chunks of 64+ rows dequantized to bf16 (45.2 ms per 256 rows)'; '' without prompt timings."""
    chunks = prompt_chunks(ms, fmt)
    if not chunks:
        return ""
    decode = decode_steps(format_timings(ms).get(fmt, {}))
    first = min(decode, default=None)
    rows = max(chunks)
    at_decode = f" ({decode[first]:.1f} ms per step at batch {first})" if first is not None else ""
    at_prompt = f"{chunks[rows]:.1f} ms per {rows} rows"
    if fmt not in QUANTIZED_FORMATS:
        return f"{fmt} for decode{at_decode} and prompt chunks ({at_prompt})"
    threshold = dequant_from_rows(ms, fmt)
    if threshold is None:
        return f"{fmt} kernel for decode{at_decode} and prompt chunks ({at_prompt}: faster than dequantizing to bf16)"
    return (
        f"{fmt} kernel for decode{at_decode}, calls of {threshold}+ rows (prompt chunks) dequantized to bf16 "
        f"({at_prompt})"
    )


def describe_cpu_formats(ms: dict[str, float]) -> str:
    """The cpu_formats reason: the measured timings and what they cover, or that none were measured yet."""
    timings = format_timings(ms)
    if not timings:
        return (
            "not measured on this machine for this model yet: the engine times each weight format on the "
            "model's own layer shapes at its first start and caches the result"
        )
    return (
        f"{_timings_summary(timings)} (random weights at this model's shapes, one thread); measured at an "
        "engine's first start, cached per machine and model"
    )


FORMAT_WHAT = {
    "int8": "int8 weight-only linears (one scale per row) computing in bf16, ",
    "int4": "int4 weight-only linears (a scale and zero per group of 32; LM head in int8) computing in bf16, ",
}


def cpu_dtype_default(profile: HardwareProfile) -> tuple[str, str]:
    """(format, why) for CPU weights: the measured fastest of CPU_WEIGHT_FORMATS, else a guess from the CPU
    flags (float32 or bfloat16: int8 and int4 are only ever chosen by measurement)."""
    measured = fastest_cpu_format(profile.cpu_format_ms)
    if measured is not None:
        summary = _timings_summary(format_timings(profile.cpu_format_ms))
        paths = phase_paths(profile.cpu_format_ms, measured)
        paths = f" So: {paths}." if paths else ""
        if passed := passed_over(profile.cpu_format_ms, measured):
            paths += f" Faster at decode but not taken: {passed}."
        if measured == "float32":
            return "float32", (
                f"measured on this CPU at this model's shapes, no other format is {1 - CPU_FORMAT_MARGIN:.0%} "
                f"faster at every decode batch size and as fast at prompt chunks, and fp32 is exact: {summary}.{paths}"
            )
        what = FORMAT_WHAT.get(measured, "")
        margin = (
            f" and at least {1 - INT4_MARGIN:.0%} faster than the fastest more exact format (summed over batch sizes)"
            if measured == "int4"
            else ""
        )
        return measured, (
            f"{what}measured on this CPU at this model's shapes, the fastest at decode, at least "
            f"{1 - CPU_FORMAT_MARGIN:.0%} faster than float32 at every batch size and no slower at prompt chunks"
            f"{margin}: {summary}.{paths}"
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
