"""Command-line errors a user can hit before anything starts: clear message, non-zero exit, fast."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "cli.py"), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


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

    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO_ROOT / "cli.py"), "plan", "--gpu", "T4:16GiB:7.5", "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported
    plan = json.loads(result.stdout)
    assert plan["device"] == "cuda:0" and plan["dtype"] == "float16"
    for key in (
        "quantization",
        "double_quant",
        "offload",
        "device_map",
        "max_batch",
        "max_context",
        "kv_cache_tokens",
        "kv_block_size",
        "prefix_caching",
        "weights_bytes",
        "reasons",
    ):
        assert key in plan
    assert plan["kv_block_size"] == 16 and plan["prefix_caching"] is True


def test_pool_flags_reach_the_plan_and_travel_to_ray_engines():
    """The flags `serve --ray` hands every engine (overrides_as_flags) are ones `plan` (and `engine`) accept."""
    import json

    from frontend.ray_engines import overrides_as_flags
    from planning.overrides import overrides_from_flags

    forced = overrides_from_flags(kv_cache_tokens=16000, prefix_caching=False, max_batch=1024)
    flags = overrides_as_flags(forced)
    assert {"--kv-cache-tokens", "16000", "--no-prefix-caching", "--max-batch", "1024"} <= set(flags)
    result = cli("plan", "--cpu-only", "--ram", "24GiB", "--json", *flags)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["kv_cache_tokens"], plan["prefix_caching"], plan["max_batch"]) == (16000, False, 1024)
    assert {"kv_cache_tokens", "prefix_caching", "max_batch"} <= set(plan["overridden"])
    assert plan["reasons"]["prefix_caching"] == "off: forced off by --no-prefix-caching"


def test_a_pool_too_small_for_the_forced_context_is_one_line():
    result = cli("plan", "--cpu-only", "--ram", "24GiB", "--kv-cache-tokens", "4096", "--max-context", "8192")
    assert result.returncode == 2
    line = one_line(result)
    assert "--kv-cache-tokens 8192 or more" in line and "--max-context to 4096 or less" in line
    result = cli("plan", "--kv-cache-tokens", "100")
    assert result.returncode == 2 and "--kv-cache-tokens" in one_line(result)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The error the user sees: exactly one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def env_without(*names: str, **extra: str) -> dict:
    import os

    return {**{k: v for k, v in os.environ.items() if k not in names}, **extra}


def test_serve_with_a_missing_model_path_says_what_to_pass():
    result = cli("serve", "--model", "/nonexistent/model", "--port", "0")
    assert result.returncode == 2
    line = one_line(result)
    assert "/nonexistent/model" in line and "--model" in line and ".gguf" in line


def test_serve_with_a_hub_id_and_hub_offline_fails_at_once():
    import time

    started = time.monotonic()
    result = cli(
        "serve", "--model", "kiln-test/no-such-model", "--port", "0", env=env_without("KILN_DEBUG", HF_HUB_OFFLINE="1")
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    line = one_line(result)
    assert "kiln-test/no-such-model" in line and "HF_HUB_OFFLINE" in line


def test_serve_with_a_hub_id_without_network_fails_at_once():
    """Unreachable hub (no network here; a dead endpoint elsewhere): one line within seconds, no retries."""
    import time

    started = time.monotonic()
    result = cli(
        "serve",
        "--model",
        "kiln-test/no-such-model",
        "--port",
        "0",
        env=env_without("HF_HUB_OFFLINE", "KILN_DEBUG", HF_ENDPOINT="http://127.0.0.1:9"),
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    line = one_line(result)
    assert "kiln-test/no-such-model" in line and "no network" in line and "--model" in line


def test_serve_on_a_busy_port_says_so():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = cli("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    assert one_line(result).startswith(f"kiln: port {port} on 127.0.0.1 is in use (")


def test_bench_with_nothing_listening_says_so():
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago, nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = cli("bench", "--url", f"http://127.0.0.1:{port}", "--users", "1", "--requests", "1")
    assert result.returncode != 0
    assert "nothing answers at" in one_line(result)
    assert result.stdout.strip() == ""  # no table of zeros


def test_bad_flags_are_one_line():
    result = cli("serve", "--prot", "8000")
    assert result.returncode == 2
    line = one_line(result)
    assert "--prot" in line and "--help" in line


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import pytest

    import cli as kiln_cli
    import planning.report

    def broken(*args, **kwargs):
        raise RuntimeError("something broke\non two lines")

    monkeypatch.setattr(planning.report, "run_plan_command", broken)
    monkeypatch.delenv("KILN_DEBUG", raising=False)
    assert kiln_cli.main(["plan"]) == 1
    err = capsys.readouterr().err
    assert err == "kiln: RuntimeError: something broke on two lines (run with --debug for the traceback)\n"

    with pytest.raises(RuntimeError):
        kiln_cli.main(["--debug", "plan"])
    monkeypatch.delenv("KILN_DEBUG")
    monkeypatch.setenv("KILN_DEBUG", "1")
    with pytest.raises(RuntimeError):
        kiln_cli.main(["plan"])
