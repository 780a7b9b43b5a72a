"""Command-line errors a user can hit before anything starts: clear message, non-zero exit, fast."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env=env)


def test_engine_on_a_missing_gpu_is_refused():
    result = cli("engine", "--gpu", "7")
    assert result.returncode != 0
    assert "no GPU 7 on this machine" in result.stderr


def test_serve_on_missing_gpus_is_refused():
    result = cli("serve", "--gpus", "5,6")
    assert result.returncode != 0
    assert "--gpus" in result.stderr and "no GPU" in result.stderr


def test_serve_on_a_folder_without_tokenizer_is_refused(tmp_path):
    (tmp_path / "config.json").write_text((REPO_ROOT / "tests/fixtures/configs/starcoder2-3b/config.json").read_text())
    result = cli("serve", "--model", str(tmp_path), "--port", "0")
    assert result.returncode == 2
    assert "no tokenizer.json" in result.stderr and "Traceback" not in result.stderr


def test_tcp_engines_need_a_secret():
    import os

    env = {k: v for k, v in os.environ.items() if k != "KILN_SECRET"}
    result = cli("serve", "--engine-port", "5557", env=env)
    assert result.returncode == 2
    assert "--secret" in result.stderr


def test_engine_without_a_server_says_so():
    result = cli("engine", "--cpu", "--frontend", "1")
    assert result.returncode != 0
    assert "no running `cli.py serve`" in result.stderr


def test_plan_command_loads_no_torch_and_prints_json():
    import json

    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO_ROOT / "cli.py"), "plan",
                             "--gpu", "T4:16GiB:7.5", "--json"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported
    plan = json.loads(result.stdout)
    assert plan["device"] == "cuda:0" and plan["dtype"] == "float16"
    for key in ("quantization", "double_quant", "offload", "device_map", "max_batch", "max_context",
                "kv_cache_tokens", "weights_bytes", "reasons"):
        assert key in plan
