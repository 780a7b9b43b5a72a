"""The CPU weight-format probe: a real run on this machine, caching, and when the engine measures."""

from __future__ import annotations

import json

import pytest
import torch

from engine_core import cpu_formats
from engine_core.cpu_formats import measure_cpu_formats, with_measured_cpu_formats
from hardware import profile as hp
from model.shape import shape_from_config
from planning.cpu_dtype import CPU_WEIGHT_FORMATS, INT4_DEQUANT, INT8_DEQUANT, fastest_cpu_format, phase_paths
from planning.overrides import overrides_from_flags
from planning.plan import PlanOverrides
from tests.conftest import SMOL_LIKE, TIMINGS


def cpu_profile(timings=None):
    return hp.HardwareProfile(8 << 30, 8 << 30, 2, [], "none (test)", False, dict(timings or {}))


def refuse_to_measure(*args, **kwargs):
    raise AssertionError("measured although it should not have")


def test_real_probe_times_every_candidate():
    threads = torch.get_num_threads()
    ms = measure_cpu_formats(shape_from_config(SMOL_LIKE))
    rows = (*cpu_formats.PROBE_BATCHES, *cpu_formats.PROBE_CHUNKS)
    chunks = {f"{path}@{r}" for path in (INT8_DEQUANT, INT4_DEQUANT) for r in cpu_formats.PROBE_CHUNKS}
    assert set(ms) == {f"{fmt}@{r}" for fmt in CPU_WEIGHT_FORMATS for r in rows} | chunks
    assert all(v > 0 for v in ms.values())
    assert torch.get_num_threads() == threads  # the probe's single thread is not left behind
    chunk = max(cpu_formats.PROBE_CHUNKS)
    assert f"per {chunk} rows" in phase_paths(ms, fastest_cpu_format(ms))  # the plan can say how prompts run


def test_probe_stops_at_the_minimum_rounds_once_past_its_time_budget(monkeypatch):
    """What keeps the first start short (~0.6 s here): rounds past the minimum only start within the budget."""
    calls = []
    monkeypatch.setattr(cpu_formats, "time_linears", lambda pool, shape, timing, inputs: calls.append(timing) or [1.0])
    measure_cpu_formats(shape_from_config(SMOL_LIKE), formats=("float32",), budget_s=0.0)
    assert len(calls) == cpu_formats.MIN_ROUNDS * (len(cpu_formats.PROBE_BATCHES) + len(cpu_formats.PROBE_CHUNKS))


def test_big_matrices_are_timed_on_a_slice_and_scaled():
    pool = cpu_formats.WeightPool(cpu_formats.random_flat(1 << 20))
    x = torch.rand(1, 1024)
    assert cpu_formats.time_linear(pool, x, 1024, 4096) > 0  # 4M weights > half the 1M pool: 512 rows, × 8
    assert pool.offset == 512 * 1024


def test_prompt_chunks_time_the_layers_without_lm_head_and_decode_steps_with_it():
    shape = shape_from_config(SMOL_LIKE)
    chunk, step = cpu_formats.Timing("bfloat16@256", "bfloat16", 256), cpu_formats.Timing("bfloat16@8", "bfloat16", 8)
    layer = hp.decoder_linear_shapes(shape)
    assert chunk.linears(shape) == layer and step.linears(shape) == [*layer, (576, 49152)]
    assert chunk.ms(shape, [0.001] * len(layer)) == pytest.approx(7 * 30)  # 7 linears × 30 layers, 1 ms each
    assert step.ms(shape, [0.001] * (len(layer) + 1)) == pytest.approx(7 * 30 + 1)


def test_probe_times_int8_dequantized_at_prompt_chunks_only():
    taken = cpu_formats.timings_to_take(("float32", "int8"), (1, 8), (64, 256))
    dequant = [t for t in taken if t.dequant]
    assert [(t.key, t.fmt, t.rows) for t in dequant] == [
        ("int8-dequant@64", "int8", 64),
        ("int8-dequant@256", "int8", 256),
    ]
    assert not any(t.dequant for t in cpu_formats.timings_to_take(("float32", "bfloat16"), (1, 8), (64, 256)))


def test_int8_dequantized_timing_matches_what_the_layer_runs(monkeypatch):
    """The probe times the same function Int8Linear calls for many rows (not a stand-in)."""
    calls = []
    monkeypatch.setattr(cpu_formats, "dequantized_linear", lambda x, w, s: calls.append(x.shape) or x)
    pool = cpu_formats.WeightPool((cpu_formats.random_flat(1 << 20) * 127).to(torch.int8))
    cpu_formats.time_linear(pool, torch.rand(256, 64).bfloat16(), 64, 128, dequant=True)
    assert calls == [(256, 64)]


def test_engine_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    shape = shape_from_config(SMOL_LIKE)
    monkeypatch.setattr(cpu_formats, "measure_cpu_formats", lambda s: dict(TIMINGS))
    measured = with_measured_cpu_formats(cpu_profile(), shape, PlanOverrides(), tmp_path)
    assert measured.cpu_format_ms == TIMINGS
    assert hp.read_cpu_format_ms(shape, tmp_path) == TIMINGS
    monkeypatch.setattr(cpu_formats, "measure_cpu_formats", refuse_to_measure)
    cached = cpu_profile(hp.read_cpu_format_ms(shape, tmp_path))
    assert with_measured_cpu_formats(cached, shape, PlanOverrides(), tmp_path) is cached


@pytest.mark.parametrize("overrides", [overrides_from_flags(dtype="bf16"), overrides_from_flags(quantization="nf4")])
def test_no_measurement_when_the_user_chose_the_format(tmp_path, monkeypatch, overrides):
    monkeypatch.setattr(cpu_formats, "measure_cpu_formats", refuse_to_measure)
    profile = cpu_profile()
    assert with_measured_cpu_formats(profile, shape_from_config(SMOL_LIKE), overrides, tmp_path) is profile


def test_a_failed_probe_leaves_the_flags_guess(tmp_path, monkeypatch):
    def broken(shape):
        raise RuntimeError("no oneDNN today")

    monkeypatch.setattr(cpu_formats, "measure_cpu_formats", broken)
    profile = cpu_profile()
    assert with_measured_cpu_formats(profile, shape_from_config(SMOL_LIKE), PlanOverrides(), tmp_path) is profile
    assert not (tmp_path / "cpu-formats").exists()


def test_build_plan_measures_at_first_start_and_plans_with_it(tmp_path, monkeypatch):
    from engine_core.main import build_plan

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOL_LIKE))
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_formats, "measure_cpu_formats", lambda s: dict(TIMINGS))
    plan = build_plan(str(folder), None, PlanOverrides())
    assert plan.cpu_format_ms == TIMINGS and plan.dtype == "bfloat16"  # 22.8 vs 31.4 / 60.5: ≥10% faster at both
    assert "measured" in plan.reasons["dtype"] and plan.kv_dtype == "float32"
    monkeypatch.setattr(cpu_formats, "measure_cpu_formats", refuse_to_measure)
    assert build_plan(str(folder), None, PlanOverrides()).cpu_format_ms == TIMINGS  # from the cache


def test_an_int8_plan_says_how_it_computes_prompts(tmp_path, monkeypatch):
    from engine_core.main import build_plan

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOL_LIKE))
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    timings = {
        **TIMINGS,
        "float32@64": 180.0,
        "float32@256": 620.0,
        "bfloat16@64": 50.0,
        "bfloat16@256": 140.0,
        "int8@1": 12.0,
        "int8@8": 20.0,
        "int8@64": 100.0,
        "int8@256": 400.0,
        "int8-dequant@64": 65.0,
        "int8-dequant@256": 155.0,
    }
    monkeypatch.setattr(cpu_formats, "measure_cpu_formats", lambda s: dict(timings))
    plan = build_plan(str(folder), None, PlanOverrides())
    assert plan.quantization == "int8" and plan.cpu_format_ms == timings
    assert "int8 kernel for decode (12.0 ms per step at batch 1)" in plan.reasons["dtype"]
    assert "calls of 64+ rows (prompt chunks) dequantized to bf16 (155.0 ms per 256 rows)" in plan.reasons["dtype"]
    assert "int8-dequant 65.0 / 155.0 ms per prompt chunk of 64 / 256 rows" in plan.reasons["cpu_formats"]


def test_probe_times_int4_dequantized_where_its_layout_is_known():
    taken = cpu_formats.timings_to_take(("float32", "int8", "int4"), (1, 8), (64, 256))
    assert [t.key for t in taken if t.dequant] == [
        "int8-dequant@64",
        "int8-dequant@256",
        "int4-dequant@64",
        "int4-dequant@256",
    ]
    unknown_layout = cpu_formats.timings_to_take(("float32", "int4"), (1, 8), (64, 256), dequantized=("int8",))
    assert not any(t.dequant for t in unknown_layout)


def int4_pool():
    return cpu_formats.WeightPool(cpu_formats.pool_flat(cpu_formats.random_flat(1 << 20), "int4"))


def test_int4_timings_call_what_the_layer_runs(monkeypatch):
    """The kernel for few rows, the unpacking path for many: the functions Int4Linear calls, on whole row blocks
    of the pool (two weights a byte) with their scales and zeros."""
    from engine_core import int4_weights

    calls = []
    for name in ("int4_kernel_linear", "dequantized_linear"):
        monkeypatch.setattr(int4_weights, name, lambda x, w, sz, name=name: calls.append((name, w.shape, sz.shape)))
    pool = int4_pool()
    cpu_formats.time_linear(pool, torch.rand(8, 576).bfloat16(), 576, 1536)
    cpu_formats.time_linear(pool, torch.rand(256, 576).bfloat16(), 576, 49152, dequant=True)
    assert calls[0] == ("int4_kernel_linear", (1536, 288), (18, 1536, 2))
    name, weight, scales = calls[1]  # 49152 x 576 in 4 bits is 14 MiB, more than half the 1 MiB pool: a slice
    assert name == "dequantized_linear" and weight[0] % 64 == 0 and scales == (18, weight[0], 2)


def test_an_int4_decode_step_times_the_lm_head_in_int8(monkeypatch):
    shape = shape_from_config(SMOL_LIKE)
    pool = int4_pool()
    pool.head = cpu_formats.WeightPool((cpu_formats.random_flat(1 << 20) * 127).to(torch.int8))
    used = []
    monkeypatch.setattr(cpu_formats, "time_linear", lambda p, x, i, o, dequant=False: used.append(p) or 1.0)
    cpu_formats.time_linears(pool, shape, cpu_formats.Timing("int4@1", "int4", 1), {})
    assert used[:-1] == [pool] * 7 and used[-1] is pool.head  # the layer's 7 linears in int4, lm_head in int8


def test_int4_is_timed_only_where_the_model_has_its_shapes():
    assert "int4" in cpu_formats.loadable_formats(CPU_WEIGHT_FORMATS, shape_from_config(SMOL_LIKE))
    odd = shape_from_config({**SMOL_LIKE, "intermediate_size": 1540})  # down_proj's 1540 inputs: not whole groups
    assert cpu_formats.loadable_formats(CPU_WEIGHT_FORMATS, odd) == ["float32", "bfloat16", "int8"]


def test_timings_cached_before_int4_was_timed_are_measured_again(tmp_path, monkeypatch):
    """The cache key holds the probe's version: a machine that cached fp32/bf16/int8 timings times int4 too."""
    shape = shape_from_config(SMOL_LIKE)
    hp.write_cpu_format_ms(shape, TIMINGS, tmp_path)
    monkeypatch.setattr(hp, "CPU_FORMAT_PROBE_VERSION", hp.CPU_FORMAT_PROBE_VERSION - 1)
    assert hp.read_cpu_format_ms(shape, tmp_path) == {}
