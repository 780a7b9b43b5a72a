"""The CPU weight-format probe: a real run on this machine, caching, and when the engine measures."""

from __future__ import annotations

import json
import time

import pytest
import torch

from engine_core import cpu_formats
from engine_core.cpu_formats import measure_cpu_formats, with_measured_cpu_formats
from hardware import profile as hp
from model.shape import shape_from_config
from planning.cpu_dtype import CPU_WEIGHT_FORMATS
from planning.overrides import overrides_from_flags
from planning.plan import PlanOverrides
from tests.conftest import SMOL_LIKE, TIMINGS


def cpu_profile(timings=None):
    return hp.HardwareProfile(8 << 30, 8 << 30, 2, [], "none (test)", False, dict(timings or {}))


def refuse_to_measure(*args, **kwargs):
    raise AssertionError("measured although it should not have")


def test_real_probe_is_quick_and_times_every_candidate():
    threads = torch.get_num_threads()
    started = time.perf_counter()
    ms = measure_cpu_formats(shape_from_config(SMOL_LIKE))
    took = time.perf_counter() - started
    assert set(ms) == {f"{fmt}@{b}" for fmt in CPU_WEIGHT_FORMATS for b in cpu_formats.PROBE_BATCHES}
    assert all(v > 0 for v in ms.values())
    assert took < 3.0, took  # ~0.3 s here; generous for a shared, noisy machine
    assert torch.get_num_threads() == threads  # the probe's single thread is not left behind


def test_big_matrices_are_timed_on_a_slice_and_scaled():
    pool = cpu_formats.WeightPool(cpu_formats.random_flat(1 << 20))
    x = torch.rand(1, 1024)
    assert cpu_formats.time_linear(pool, x, 1024, 4096) > 0  # 4M weights > half the 1M pool: 512 rows, × 8
    assert pool.offset == 512 * 1024


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
