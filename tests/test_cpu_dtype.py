"""The CPU weight format and each phase's path, read from probe timings (injected as data, as the probe caches them)."""

from __future__ import annotations

import pytest

from hardware.profile import HardwareProfile
from planning.cpu_dtype import (
    cpu_dtype_default,
    dequant_from_rows,
    describe_cpu_formats,
    fastest_cpu_format,
    int8_dequant_from_rows,
    passed_over,
    phase_paths,
    prompt_chunks,
)

DECODE = {"float32@1": 36.0, "float32@8": 68.0, "bfloat16@1": 27.0, "bfloat16@8": 28.0, "int8@1": 12.0, "int8@8": 20.0}
PROMPT = {"float32@64": 180.0, "float32@256": 620.0, "bfloat16@64": 50.0, "bfloat16@256": 140.0}
INT8_KERNEL = {"int8@64": 100.0, "int8@256": 400.0}
# as measured on a 2-core EPYC with avx512_bf16 (rounded): the int8 kernel 2.6x slower than dequantizing at 256 rows
MEASURED = {**DECODE, **PROMPT, **INT8_KERNEL, "int8-dequant@64": 65.0, "int8-dequant@256": 155.0}


def cpu(timings: dict[str, float]) -> HardwareProfile:
    return HardwareProfile(8 << 30, 8 << 30, 2, [], "none (test)", True, timings)


@pytest.mark.parametrize(
    "dequant, expected",
    [
        ({"int8-dequant@64": 65.0, "int8-dequant@256": 155.0}, 64),  # faster at both chunks: from 64 rows
        ({"int8-dequant@64": 120.0, "int8-dequant@256": 155.0}, 256),  # only at 256
        ({"int8-dequant@64": 65.0, "int8-dequant@256": 450.0}, None),  # not at the largest: never
        ({"int8-dequant@64": 100.0, "int8-dequant@256": 400.0}, None),  # a tie keeps the kernel
        ({}, None),  # not measured (a cache from before prompt chunks were timed)
    ],
)
def test_int8_dequantizes_from_the_fewest_rows_it_measured_faster_at(dequant, expected):
    assert int8_dequant_from_rows({**MEASURED, **dequant} if dequant else {**DECODE, **INT8_KERNEL}) == expected


def test_int8_prompt_chunks_take_the_path_their_rows_take():
    assert prompt_chunks(MEASURED, "int8") == {64: 65.0, 256: 155.0}
    only_256 = {**MEASURED, "int8-dequant@64": 120.0}
    assert prompt_chunks(only_256, "int8") == {64: 100.0, 256: 155.0}
    assert prompt_chunks(MEASURED, "bfloat16") == {64: 50.0, 256: 140.0}


def test_int8_wins_decode_and_dequantizing_keeps_it_ahead_of_float32_at_prompts():
    assert fastest_cpu_format(MEASURED) == "int8"
    slow_kernel = {**MEASURED, "int8@256": 700.0, "int8-dequant@256": 720.0}  # neither path keeps up with fp32
    assert fastest_cpu_format(slow_kernel) == "bfloat16"


def test_a_format_slower_than_float32_at_prompt_chunks_is_not_chosen():
    emulated_bf16 = {**DECODE, **PROMPT, "bfloat16@64": 200.0, "bfloat16@256": 700.0}  # decode by bytes, prompts lost
    emulated_bf16 = {k: v for k, v in emulated_bf16.items() if not k.startswith("int8")}
    assert fastest_cpu_format(emulated_bf16) == "float32"
    assert fastest_cpu_format({**emulated_bf16, "bfloat16@64": 170.0, "bfloat16@256": 600.0}) == "bfloat16"


def test_decode_only_timings_choose_as_before():
    assert fastest_cpu_format(DECODE) == "int8"  # no prompt chunk measured: nothing to keep up with
    assert fastest_cpu_format({k: v for k, v in DECODE.items() if not k.startswith("int8")}) == "bfloat16"


def test_the_reasons_say_how_each_phase_is_computed():
    fmt, why = cpu_dtype_default(cpu(MEASURED))
    assert fmt == "int8"
    assert "int8 kernel for decode (12.0 ms per step at batch 1), calls of 64+ rows (prompt chunks) dequantized" in why
    assert "(155.0 ms per 256 rows)" in why and "int8 12.0 / 20.0 ms per decode step at batch 1 / 8" in why
    summary = describe_cpu_formats(MEASURED)
    assert "float32 180.0 / 620.0, bfloat16 50.0 / 140.0, int8 100.0 / 400.0, int8-dequant 65.0 / 155.0" in summary
    assert "ms per prompt chunk of 64 / 256 rows" in summary and "int8-dequant" not in summary.split(";")[0]
    kernel_only = {**MEASURED, "int8-dequant@64": 120.0, "int8-dequant@256": 450.0}
    assert "int8 kernel for decode" in phase_paths(kernel_only, "int8") and "dequantized" not in phase_paths(
        kernel_only, "int8"
    )
    assert phase_paths(MEASURED, "bfloat16") == "bfloat16 for decode (27.0 ms per step at batch 1) and prompt " + (
        "chunks (140.0 ms per 256 rows)"
    )
    assert phase_paths(DECODE, "int8") == ""  # no prompt chunk timed: nothing to say


# int4 as measured on the same kind of machine, rounded: a quarter of bf16's bytes at decode, its kernel even
# slower than int8's at prompt rows, its dequantized path (unpacking 4-bit codes) slower than int8's
INT4 = {"int4@1": 8.0, "int4@8": 15.0, "int4@64": 110.0, "int4@256": 430.0, "int4-dequant@64": 95.0}


@pytest.mark.parametrize(
    "dequant, expected",
    [
        ({"int4-dequant@256": 160.0}, 64),  # faster at both chunks
        ({"int4-dequant@256": 500.0}, None),  # not at the largest: never
        ({}, None),  # only at 64 timed: the largest chunk decides, and it was not timed
    ],
)
def test_int4_dequantizes_from_the_fewest_rows_it_measured_faster_at(dequant, expected):
    ms = {**MEASURED, **INT4, **dequant}
    if not dequant:
        ms = {k: v for k, v in ms.items() if k != "int4-dequant@256"} | {"int4-dequant@64": 500.0}
    assert dequant_from_rows(ms, "int4") == expected
    assert dequant_from_rows(ms, "int8") == int8_dequant_from_rows(ms) == 64  # each format by its own timings


def test_int4_wins_when_clearly_fastest_and_its_prompts_keep_up():
    ms = {**MEASURED, **INT4, "int4-dequant@256": 160.0}
    assert fastest_cpu_format(ms) == "int4"  # 23 vs int8's 32 ms summed, prompts 95 / 160 vs fp32's 180 / 620
    assert prompt_chunks(ms, "int4") == {64: 95.0, 256: 160.0}
    assert "int4 kernel for decode (8.0 ms per step at batch 1), calls of 64+ rows" in phase_paths(ms, "int4")
    fmt, why = cpu_dtype_default(cpu(ms))
    assert fmt == "int4" and "LM head in int8" in why and "int4-dequant 95.0 / 160.0" in why
    assert fastest_cpu_format({**ms, "int4@1": 11.0, "int4@8": 19.5}) == "int8"  # 30.5 vs 32: under 5% faster
    slow_prompts = {**ms, "int4@256": 700.0, "int4-dequant@256": 700.0}  # 256 rows slower than fp32 either way
    assert fastest_cpu_format(slow_prompts) == "int8"


def test_the_reason_says_why_a_faster_format_was_passed_over():
    """`plan` says what was measured and why a format faster at decode than the chosen one was not taken."""
    lost_prompts = {**MEASURED, **INT4}  # int4's 64-row chunks: kernel 110 vs dequantized 95, fp32 180: keeps up...
    lost_prompts["int4@256"] = lost_prompts["int4-dequant@256"] = 700.0  # ...but not at 256 rows
    fmt, why = cpu_dtype_default(cpu(lost_prompts))
    assert fmt == "int8"
    assert (
        "Faster at decode but not taken: int4 (slower than float32 at prompt chunks of 256 rows: 700.0 vs 620.0" in why
    )
    near_tie = {**MEASURED, **INT4, "int4@1": 11.0, "int4@8": 19.5, "int4-dequant@256": 160.0}
    assert passed_over(near_tie, "int8") == "int4 (not 5% faster than int8: 30.5 vs 32.0 ms summed)"
    assert passed_over(near_tie, "int4") == "" and passed_over(MEASURED, "int8") == ""
    close_to_fp32 = {**MEASURED, "bfloat16@1": 5.0, "bfloat16@8": 66.0, "int8@1": 40.0, "int8@8": 40.0}
    assert fastest_cpu_format(close_to_fp32) == "float32"
    assert passed_over(close_to_fp32, "float32") == (
        "bfloat16 (not 10% faster than float32 at batch 8); int8 (not 10% faster than float32 at batch 1)"
    )
