"""`python -m bench.gpu OUTDIR --cpu`: the GPU check script at CPU scale, so it cannot rot between GPU runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.gpu import Deadline, OutOfTime, Result, gpu_side_plan_bytes, nf4_ratio, table_rows
from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_cpu_mode_passes_every_scenario(tmp_path, default_model_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu", str(tmp_path), "--cpu", "--budget-s", "300"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    statuses = {name: s["status"] for name, s in report["scenarios"].items()}
    assert statuses and all(status == "PASS" for status in statuses.values()), (statuses, done.stdout[-3000:])
    assert set(statuses) == {"tiny-fp32-exact", "serve-default", "plan-search", "speed"}
    assert done.returncode == 0
    assert (tmp_path / "gpu_report.md").read_text().startswith("# kiln GPU checks (cpu mode)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_report.json", "gpu_report.md"]


def test_offload_plans_count_only_the_gpu_share_of_weights():
    plan = {"device": "cuda:0", "weights_bytes": 100, "kv_cache_bytes": 10, "reserve_bytes": 1, "offload": True,
            "max_memory": {"0": 40, "cpu": 60}}
    assert gpu_side_plan_bytes(plan) == 51
    assert gpu_side_plan_bytes({**plan, "offload": False}) == 111
    assert gpu_side_plan_bytes({**plan, "device": "cpu"}) is None


def test_nf4_ratio_prefers_step_time_measurements():
    speed, bf16, nf4 = Result("speed"), Result("sc2-3b-bf16"), Result("sc2-3b-nf4")
    bf16.numbers["weights_measured_bytes"], nf4.numbers["weights_measured_bytes"] = 1000, 500
    results = {"speed": speed, "sc2-3b-bf16": bf16, "sc2-3b-nf4": nf4}
    assert nf4_ratio(results)["ok"] is False and nf4_ratio(results)["ratio"] == 0.5
    speed.numbers["step_time_bfloat16"] = {"weights_bytes_planned": 1, "weights_bytes_measured": 1000}
    speed.numbers["step_time_nf4"] = {"weights_bytes_measured": 280}
    assert nf4_ratio(results)["ok"] is True and nf4_ratio(results)["ratio"] == 0.28
    assert nf4_ratio({})["ok"] is None


def test_step_rows_keyed_by_batch_become_a_table():
    assert table_rows({"steps": {"1": {"ms_p50": 2.0}, "4": {"ms_p50": 3.0}}}) == [
        {"batch": "1", "ms_p50": 2.0}, {"batch": "4", "ms_p50": 3.0}]


def test_a_spent_deadline_refuses_more_work():
    with pytest.raises(OutOfTime):
        Deadline.after(0).box(10)
    assert Deadline.after(100).box(10) == 10
