"""The CPU weight format and each phase's path, read from probe timings (injected as data, as the probe caches them)."""

from __future__ import annotations

import pytest

from hardware.profile import HardwareProfile
from planning.cpu_dtype import (
    cpu_dtype_default,
    describe_cpu_formats,
    fastest_cpu_format,
    int8_dequant_from_rows,
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
