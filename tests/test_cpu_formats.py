"""The CPU weight-format probe: a real run on this machine, caching, and when the engine measures."""

from __future__ import annotations

import json

import pytest
import torch

from engine_core import cpu_formats
from engine_core.cpu_formats import measure_cpu_formats, with_measured_cpu_formats
from hardware import profile as hp
from model.shape import shape_from_config
from planning.cpu_dtype import CPU_WEIGHT_FORMATS, INT8_DEQUANT, fastest_cpu_format, phase_paths
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
    chunks = {f"{INT8_DEQUANT}@{r}" for r in cpu_formats.PROBE_CHUNKS}
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
