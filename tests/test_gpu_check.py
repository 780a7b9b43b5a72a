"""`python -m bench.gpu OUTDIR --cpu`: the GPU check script at CPU scale, so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.gpu import Deadline, OutOfTime, Result, gpu_side_plan_bytes
from bench.gpu_report import nf4_ratio, table_rows
from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_cpu_mode_passes_every_scenario(tmp_path, default_model_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", str(tmp_path), "--cpu", "--budget-s", "300"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    statuses = {name: s["status"] for name, s in report["scenarios"].items()}
    assert statuses and all(status == "PASS" for status in statuses.values()), (statuses, done.stdout[-3000:])
    assert set(statuses) == {"tiny-fp32-exact", "serve-default", "plan-search", "speed"}
    assert done.returncode == 0
    assert (tmp_path / "gpu_report.md").read_text().startswith("# kiln GPU checks (cpu mode)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_report.json", "gpu_report.md"]


def test_offload_plans_count_only_the_gpu_share_of_weights():
    plan = {
        "device": "cuda:0",
        "weights_bytes": 100,
        "kv_cache_bytes": 10,
        "reserve_bytes": 1,
        "offload": True,
        "max_memory": {"0": 40, "cpu": 60},
    }
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
        {"batch": "1", "ms_p50": 2.0},
        {"batch": "4", "ms_p50": 3.0},
    ]


def test_a_spent_deadline_refuses_more_work():
    with pytest.raises(OutOfTime):
        Deadline.after(0).box(10)
    assert Deadline.after(100).box(10) == 10


def test_gpu_report_renders_every_section(tmp_path):
    """The GPU-only paths (memory check against an offload plan, NF4 ratio, step-time and bench tables)
    on made-up numbers: a rendering slip must not surface first on the borrowed machine."""
    from bench.gpu import Session, check_memory
    from bench.gpu_report import acceptance, markdown, write_report

    session = Session(
        outdir=tmp_path,
        workdir=tmp_path,
        tokenizer_dir=tmp_path,
        cpu=False,
        budget=Deadline.after(100),
        device={
            "mode": "gpu",
            "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": "81559", "driver": "580"}],
            "cpu": "x86_64",
            "cores": 16,
            "python": "3.12",
            "versions": {"torch": "2.11"},
        },
    )
    plan = {
        "device": "cuda:0",
        "dtype": "bfloat16",
        "quantization": None,
        "offload": True,
        "max_batch": 2,
        "max_context": 2048,
        "weights_bytes": 16 * 2**30,
        "kv_cache_bytes": 2**30,
        "reserve_bytes": 2**30,
        "budget_bytes": 14 * 2**30,
        "offload_bytes": 4 * 2**30,
        "max_memory": {"0": 12 * 2**30, "cpu": 2**36},
        "device_map": {f"model.layers.{i}": 0 if i < 24 else "cpu" for i in range(32)},
    }
    info = {"plan": plan, "engines": [{"pid": 1, "gpu_peak_bytes": 14 * 2**30, "gpu_allocated_bytes": 13 * 2**30}]}
    for name in ("sc2-3b-bf16", "sc2-3b-nf4", "llama8b-offload", "speed"):
        session.results[name] = Result(name, status="PASS")
    offload = session.results["llama8b-offload"]
    check_memory(session, offload, info, smi_mib=15000)
    assert offload.checks[-1]["ok"] and offload.numbers["plan_gpu_bytes"] == 14 * 2**30
    from bench.gpu import plan_numbers

    offload.numbers["plan"] = plan_numbers(plan)
    session.results["sc2-3b-bf16"].numbers["weights_measured_bytes"] = 6 * 2**30
    session.results["sc2-3b-nf4"].numbers["weights_measured_bytes"] = 2**30
    speed = session.results["speed"]
    speed.numbers["step_time_bfloat16"] = {
        "weights_bytes_measured": 6 * 2**30,
        "roofline_ms": 2.1,
        "steps": {"1": {"ms_p50": 9.5}, "16": {"ms_p50": 11.0}},
    }
    speed.numbers["bench"] = {
        "ours": {"output_tokens_per_s": 900.0, "ttft_p50": 0.05, "completed": 10, "failed": 0},
        "baseline": {"output_tokens_per_s": 40.0, "ttft_p50": 1.2, "completed": 10},
        "ratios": {"throughput": 22.5, "ttft_p50": 24.0},
        "dtype": "bfloat16",
    }
    nf4 = next(a for a in acceptance(session) if a["name"].startswith("NF4"))
    assert nf4["ok"] is True and "serving" in nf4["detail"]  # step_time has bf16 only: no mixing
    speed.numbers["step_time_nf4"] = {"weights_bytes_measured": 2**30}
    nf4 = next(a for a in acceptance(session) if a["name"].startswith("NF4"))
    assert nf4["ok"] is True and "step_time" in nf4["detail"]
    write_report(session)
    text = (tmp_path / "gpu_report.md").read_text()
    assert "NVIDIA H100" in text and "| 16 | 11 |" in text and "22.50x" in text and "peak 14.00 GiB" in text
    assert json.loads((tmp_path / "gpu_report.json").read_text())["scenarios"]["speed"]["status"] == "PASS"
    assert markdown(json.loads((tmp_path / "gpu_report.json").read_text())) == text


def test_a_background_build_is_waited_for(tmp_path, default_model_path):
    from bench.gpu import Session, build_model, start_background_build
    from bench.random_model import tiny_config, write_config_dir

    session = Session(
        outdir=tmp_path, workdir=tmp_path, tokenizer_dir=default_model_path, cpu=True, budget=Deadline.after(120)
    )
    config = write_config_dir(tiny_config("llama"), tmp_path / "config")
    start_background_build(session, "tiny", config, dtype="float32")
    res = Result("x")
    out = build_model(session, res, "tiny", config, Deadline.after(100))
    assert (out / "model.safetensors").is_file() and not session.background and "build_tiny_s" in res.numbers
    assert build_model(session, res, "tiny", config, Deadline.after(100)) == out  # built once per run
