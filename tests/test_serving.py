"""End to end on the real path: `cli.py serve` → engine process → default model on CPU, over loopback HTTP."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.conftest import COMPILE_READY_TIMEOUT_S, ServerProcess, get_json, pid_alive, running_server
from tests.http_client import generate, post_json, run, stream_events

# the module's server compiles its decode step at start (a few minutes on a fresh 2-core machine), which
# pytest counts against the first test that uses it
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FIB = {"prompt": "def fibonacci(n):", "max_new_tokens": 48, "temperature": 0}
COMPILED = {"ENABLE_COMPILE": "1"}  # the default CPU plan: decode steps compiled (the suite's default is eager)


@pytest.fixture(scope="module")
def server(default_model_path):
    """This module's server runs the default plan as `serve` does, decode steps compiled."""
    yield from running_server("--max-context", "512", env=COMPILED)


def decode_path(proc: ServerProcess) -> str:
    """The engine's warmup verdict: which decode path it measured faster and kept."""
    lines = [line for line in proc.log_path.read_text().splitlines() if "decode steps: " in line]
    assert lines, "the engine did not compile and measure its decode step"
    return lines[-1]


async def _stream(url: str, body: dict, max_events=None) -> list[dict]:
    async with aiohttp.ClientSession() as session:
        return await stream_events(session, url + "/generate_stream", body, max_events)


def test_greedy_generate_matches_transformers(default_model_path):
    """Token for token, in float32: the setting where both sides compute the same numbers. (In the
    bf16 default our attention runs in fp32 on CPU, more precise than transformers' bf16 path,
    so a near-tie can resolve differently after a few dozen tokens.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = ServerProcess("--dtype", "float32", "--max-context", "256", "--max-batch", "2", env=COMPILED)
    try:
        proc.wait_ready(COMPILE_READY_TIMEOUT_S)
        status, body = run(generate(proc.url, FIB))
        plan = proc.info()["plan"]
        assert plan["dtype"] == "float32" and plan["compile"] is True
        print(decode_path(proc))  # compiled or eager, whichever measured faster here: the tokens must not care
    finally:
        proc.stop()
    assert status == 200, body
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    prompt = tokenizer(FIB["prompt"], return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model.generate(prompt, max_new_tokens=FIB["max_new_tokens"], do_sample=False)[0, prompt.shape[1] :]
    assert body["token_ids"] == expected.tolist()
    assert body["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": prompt.shape[1], "completion_tokens": len(expected)}
    assert "fibonacci" in body["text"] or "return" in body["text"]
    assert 0 < body["timings"]["ttft_s"] <= body["timings"]["total_s"]


def test_default_plan_greedy_is_coherent_and_repeatable(server):
    """Whatever weight format the default plan measured fastest here (fp32, bf16 or int8), compiled."""
    assert server.info()["plan"]["compile"] is True and decode_path(server)
    first, second = run(generate(server.url, FIB)), run(generate(server.url, FIB))
    assert first[1]["token_ids"] == second[1]["token_ids"]
    assert "fibonacci(n - 1)" in first[1]["text"]


def test_native_logprobs_in_full_and_streamed_answers(server):
    body = {**FIB, "max_new_tokens": 12, "logprobs": 2, "prompt_logprobs": 0}
    status, full = run(generate(server.url, body))
    assert status == 200, full
    entries = full["logprobs"]
    assert [e["token_id"] for e in entries] == full["token_ids"]
    for e in entries:  # greedy: the chosen token is the most likely, listed first
        assert e["logprob"] <= 0 and len(e["top"]) == 2 and e["top"][0]["token_id"] == e["token_id"]
        assert e["top"][0]["logprob"] == pytest.approx(e["logprob"]) and e["top"][1]["logprob"] <= e["logprob"]
    prompt = full["prompt_logprobs"]
    assert len(prompt) == full["usage"]["prompt_tokens"] - 1 and all("top" not in e for e in prompt)
    events = run(_stream(server.url, body))
    streamed = [e for ev in events for e in ev.get("logprobs", [])]
    assert [e["token_id"] for e in streamed] == full["token_ids"]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in entries], abs=1e-5)
    assert events[0]["prompt_logprobs"] == prompt and all("prompt_logprobs" not in ev for ev in events[1:])
    _, plain = run(generate(server.url, FIB))
    assert "logprobs" not in plain and "prompt_logprobs" not in plain  # only when asked


def test_native_sampling_controls(server):
    _, plain = run(generate(server.url, {**FIB, "max_new_tokens": 6}))
    _, biased = run(generate(server.url, {**FIB, "max_new_tokens": 6, "logit_bias": {"42": 100}}))
    assert biased["token_ids"] == [42] * 6 != plain["token_ids"]
    _, full = run(generate(server.url, FIB))
    _, penalized = run(generate(server.url, {**FIB, "repetition_penalty": 5.0}))
    assert penalized["token_ids"] != full["token_ids"]  # the plain answer repeats `fibonacci(n` from its prompt
    status, body = run(generate(server.url, {**FIB, "logit_bias": {"99999999": 1}}))
    assert status == 400 and body["error"]["field"] == "logit_bias"
    status, body = run(generate(server.url, {**FIB, "presence_penalty": 3}))
    assert status == 400 and body["error"]["field"] == "presence_penalty"


def test_stream_pieces_concatenate_to_generate_text(server):
    _, full = run(generate(server.url, FIB))
    events = run(_stream(server.url, FIB))
    assert len(events) > 5, "the stream should arrive piece by piece"
    assert "".join(e.get("text", "") for e in events) == full["text"]
    assert [t for e in events for t in e["token_ids"]] == full["token_ids"]
    assert all("finish_reason" not in e for e in events[:-1])
    assert events[-1]["finish_reason"] == full["finish_reason"]
    assert events[-1]["usage"] == full["usage"]


def test_concurrent_streams_share_batches(server):
    bodies = [
        {
            "prompt": f"Write a haiku about the number {i}.",
            "max_new_tokens": 24,
            "temperature": 0.7,
            "seed": i,
            "ignore_eos": True,
        }
        for i in range(10)
    ]

    async def all_streams():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(stream_events(session, server.url + "/generate_stream", b) for b in bodies))

    results = run(all_streams())
    for events in results:
        assert events[-1]["finish_reason"] == "length"
        assert sum(len(e["token_ids"]) for e in events) == 24
    engine = server.info()["engines"][0]
    assert engine["max_running_seen"] > 1, engine
    assert engine["running"] == 0 and engine["kv_slots_used"] == 0


def test_disconnected_stream_frees_its_slot(server):
    body = {"prompt": "Tell me a very long story.", "max_new_tokens": 400, "ignore_eos": True}
    events = run(_stream(server.url, body, max_events=3))  # leaving the `async with` closes the connection
    assert len(events) == 3
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        engine = server.info()["engines"][0]
        if engine["running"] == 0 and engine["kv_slots_used"] == 0:
            break
        time.sleep(0.1)
    assert engine["running"] == 0 and engine["kv_slots_used"] == 0, engine
    assert server.info()["requests_in_flight"] == 0


def test_non_ascii_round_trip(server):
    # a prompt the model answers with umlauts in every weight format (fp32, bf16, int8), the emoji stays in the prompt
    body = {
        "prompt": "🧀 Liste deutscher Wörter mit Umlauten: Käse, Müller, Größe,",
        "max_new_tokens": 40,
        "temperature": 0,
    }
    status, full = run(generate(server.url, body))
    assert status == 200
    events = run(_stream(server.url, body))
    streamed = "".join(e.get("text", "") for e in events)
    assert streamed == full["text"]
    assert "\ufffd" not in streamed
    assert any(ord(c) > 127 for c in streamed), "expected the model to answer with non-ASCII text"


def test_stop_string_never_leaks(server):
    _, full = run(generate(server.url, FIB))
    stop = full["text"][10:14]  # a string the greedy output is known to contain
    body = dict(FIB, stop=[stop])
    status, cut = run(generate(server.url, body))
    assert status == 200
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][: full["text"].index(stop)]
    events = run(_stream(server.url, body))
    assert "".join(e.get("text", "") for e in events) == cut["text"]
    assert events[-1]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(server):
    body = {
        "prompt": "Once upon a time",
        "max_new_tokens": 16,
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 50,
        "seed": 1234,
    }
    first, second = run(generate(server.url, body)), run(generate(server.url, body))
    assert first[1]["token_ids"] == second[1]["token_ids"]


@pytest.mark.parametrize(
    "payload, field",
    [
        (b"{not json", "body"),
        ({"max_new_tokens": 5}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": "ten"}, "max_new_tokens"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_k": -1}, "top_k"),
        ({"prompt": "hi", "top_k": 2**64}, "top_k"),
        ({"prompt": "hi", "max_new_tokens": 2**40}, "max_new_tokens"),
        (b'{"prompt": "\xff"}', "body"),
        ({"prompt": "hi", "stop": "x"}, "stop"),
        ({"prompt": "hi", "seed": 1.5}, "seed"),
        ({"prompt": "hi", "seed": 10**30}, "seed"),
        ([1, 2, 3], "body"),
    ],
)
@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
def test_bad_input_is_400_naming_the_field(server, payload, field, route):
    async def send():
        async with aiohttp.ClientSession() as session:
            return await post_json(session, server.url + route, payload)

    status, body = run(send())
    assert status == 400, body
    assert body["error"]["field"] == field, body


def test_prompt_longer_than_context_is_refused(server):
    context = server.info()["engines"][0]["max_context"]
    status, body = run(generate(server.url, {"prompt": "word " * (context + 10), "max_new_tokens": 4}))
    assert status == 400
    assert body["error"]["field"] == "prompt"
    assert str(context) in body["error"]["message"]


def test_health_and_info(server):
    health = get_json(server.url + "/health")  # a status other than 200 raises here
    assert health["status"] == "ok" and health["engines"] == 1, health
    info = server.info()
    assert info["model"] == "SmolLM2-135M-Instruct"
    engine = info["engines"][0]
    for key in ("id", "pid", "device", "running", "waiting", "max_running_seen", "kv_slots_used"):
        assert key in engine
    assert engine["device"] == "cpu"
    assert info["plan"]["max_context"] == 512  # the --max-context override reached the engine


def test_queue_beyond_slots_then_sigterm_stops_everything(default_model_path):
    dirs_before = _kiln_runtime_dirs()
    proc = ServerProcess("--max-batch", "2", "--max-context", "256")
    proc.wait_ready()

    async def burst():  # more requests than KV slots: the rest wait in the queue, none fails
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "Name a colour:", "max_new_tokens": 6, "ignore_eos": True}
            return await asyncio.gather(*(post_json(session, proc.url + "/generate", body) for _ in range(5)))

    assert all(status == 200 and body["usage"]["completion_tokens"] == 6 for status, body in run(burst()))
    assert proc.info()["engines"][0]["max_running_seen"] == 2
    engine_pids = proc.engine_pids()
    assert _kiln_runtime_dirs() - dirs_before, "the server should keep its sockets in a private folder"
    assert proc.stop() == 0
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in engine_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in engine_pids)
    assert not _kiln_runtime_dirs() - dirs_before, "the socket folder should be removed"


def _kiln_runtime_dirs():
    import tempfile
    from pathlib import Path

    return set(Path(tempfile.gettempdir()).glob("kiln-run-*"))


def test_metrics_count_requests_and_engine_load(server):
    import urllib.request

    run(generate(server.url, {"prompt": "Hello", "max_new_tokens": 3}))
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['kiln_requests_total{outcome="length"}'] >= 1
    assert samples["kiln_generation_tokens_total"] >= 3
    assert samples["kiln_time_to_first_token_seconds_count"] >= 1
    assert samples['kiln_engine_running{device="cpu",engine="engine-0"}'] == 0
    assert samples["kiln_engines_ready"] == 1


def test_a_killed_engine_comes_back_with_its_saved_graphs(server):
    """kill -9 of the engine: the supervisor starts another, which loads the decode graphs the first one
    traced and saved (engine_core/compiled_cache.py) instead of tracing for minutes, and answers the same.
    Last in the module: it replaces the module server's engine."""
    import os
    import signal

    from tests.polling import wait_for

    before = run(generate(server.url, FIB))[1]["token_ids"]
    assert "graphs traced" in decode_path(server) or "graphs loaded" in decode_path(server)
    victim = server.info()["engines"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(
        lambda: (e := server.info()["engines"]) and e[0]["pid"] != victim["pid"] and e[0]["ready"],
        COMPILE_READY_TIMEOUT_S,
        "the supervisor to restart the engine",
    )
    assert "graphs loaded from" in decode_path(server), decode_path(server)
    status, body = run(generate(server.url, FIB))
    assert status == 200 and body["token_ids"] == before
