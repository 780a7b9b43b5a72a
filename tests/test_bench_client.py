"""The load generator and SSE client against real servers on loopback.

The naive baseline (a real `python -m bench.naive_server` child with the default model)
stands in for the server under test; tiny in-test aiohttp servers produce the failures a
benchmark must count (HTTP 500, an error event, a stream that ends or is cut mid-way) and
the /info that peak_running is read from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import aiohttp
import jsonschema
import pytest
from aiohttp import web

from bench.dialects import NATIVE, OPENAI
from bench.loadgen import run_load
from bench.records import LoadConfig
from bench.runner import run_benchmark
from bench.scenarios import WorkloadOptions, build_workload
from bench.server_proc import free_port, naive_command, running_server
from bench.sse import iter_events
from bench.stats import figures
from bench.workload import load_prompts


@pytest.fixture(scope="module")
def naive_url(default_model_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_server(naive_command(port, default_model_path, "float32"), url, name="naive", timeout_s=180):
        yield url


PERSON_SCHEMA = Path(__file__).parent / "fixtures" / "json_schemas" / "01_person.json"


def _cfg(**kw) -> LoadConfig:
    base = dict(users=2, requests=2, max_new_tokens=8, temperature=0.0, ignore_eos=True, stream=True, seed=0)
    return LoadConfig(**{**base, **kw})


# --- against the real naive server --------------------------------------------------------


@pytest.mark.slow
def test_streaming_load_records_every_token(naive_url):
    result = asyncio.run(run_load(naive_url, _cfg(), load_prompts(), progress=False))
    assert len(result.records) == 4
    for rec in result.records:
        assert rec.ok, rec.error
        assert rec.output_tokens == 8 and rec.finish_reason == "length"
        assert len(rec.itl_s) == 7 and all(g >= 0 for g in rec.itl_s)
        assert len(rec.token_times_s) == 8
        assert 0 < rec.ttft_s <= rec.e2e_s
    # one request at a time: the second user's first request waits for the first's
    assert max(r.ttft_s for r in result.records) > min(r.e2e_s for r in result.records) * 0.5
    assert result.peak_running is None  # the naive server has no /info
    f = figures(result)
    assert f.completed == 4 and f.failed == 0 and f.output_tokens == 32 and f.output_tokens_per_s > 0
    assert f.itl_p50 is not None and f.tpot_mean is not None


@pytest.mark.slow
def test_streaming_load_against_kiln(server):
    """The same client against our own server: every token counted, the engine's batch seen in /info."""
    # long enough for several /info polls (every 0.25 s) while the three streams share steps
    result = asyncio.run(
        run_load(server.url, _cfg(users=3, requests=1, max_new_tokens=96), load_prompts(), progress=False)
    )
    assert [rec.ok for rec in result.records] == [True] * 3, [rec.error for rec in result.records]
    assert all(rec.output_tokens == 96 and len(rec.itl_s) == 95 for rec in result.records)
    assert result.peak_running is not None and result.peak_running >= 2
    f = figures(result)
    assert f.completed == 3 and f.output_tokens == 288 and f.ttft_p50 <= f.e2e_p50


@pytest.mark.slow
def test_chat_and_shared_prefix_against_kiln(server, tmp_path):
    """The new workloads end to end, kept small: a 2-turn chat of 2 users, then a 64-token shared prefix
    (2 users x 2 requests), 4 tokens each; per-turn TTFT, and the engine's own prefix-cache counters."""
    out = tmp_path / "chat.json"
    assert run_benchmark(url=server.url, users=2, chat_turns=2, max_new_tokens=4, json_path=str(out)) == 0
    ours = json.loads(out.read_text())["ours"]
    assert (ours["completed"], ours["short"], ours["http_429"], ours["http_5xx"]) == (4, 0, 0, 0)
    turns = ours["ttft_by_turn"]
    assert [(t["turn"], t["completed"]) for t in turns] == [(1, 2), (2, 2)]
    assert turns[1]["prompt_tokens_p50"] > turns[0]["prompt_tokens_p50"] + 4  # the history came back
    assert run_benchmark(url=server.url, users=2, prefix_tokens=64, max_new_tokens=4, json_path=str(out)) == 0
    doc = json.loads(out.read_text())
    ours = doc["ours"]
    assert doc["config"]["workload"]["kind"] == "shared-prefix" and ours["completed"] == 4
    assert ours["prefix_cache_queries"] >= 4 * 64
    # each user's second request finds at least the prefix's first 3 blocks (of 16 tokens) cached
    assert ours["prefix_cache_hits"] >= 2 * 48, ours


def test_chat_sends_each_answer_back_in_the_next_turn(default_model_path, monkeypatch):
    """Against a server that answers every request with a unique text: a user's turn k+1 prompt holds
    its turn k answer, and records carry their turn."""
    monkeypatch.setenv("BASE_MODEL", default_model_path)
    prompts_by_answer: dict[str, str] = {}

    async def stream(request):
        body = await request.json()
        answer = f" reply-{len(prompts_by_answer)}"
        prompts_by_answer[answer] = body["prompt"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_event({"text": answer[:4], "token_ids": [1]}))
        usage = {"prompt_tokens": len(body["prompt"]) // 4, "completion_tokens": 2}
        await resp.write(_event({"text": answer[4:], "token_ids": [2], "finish_reason": "length", "usage": usage}))
        return resp

    async def go():
        app = web.Application()
        app.router.add_post("/generate_stream", stream)
        chat = build_workload(WorkloadOptions(chat_turns=3), 2, None)
        async with fake_server(app) as url:
            return await run_load(url, _cfg(users=2, requests=3, max_new_tokens=2), chat, progress=False)

    result = asyncio.run(go())
    assert len(result.records) == 6 and all(r.ok for r in result.records)
    for user in (0, 1):
        mine = [r for r in result.records if r.user == user]
        assert [r.turn for r in mine] == [1, 2, 3]
        prompts = [prompts_by_answer[r.text] for r in mine]
        for k in (1, 2):
            assert prompts[k].startswith(prompts[k - 1]) and mine[k - 1].text in prompts[k]
    turns = figures(result).ttft_by_turn
    assert [t.completed for t in turns] == [2, 2, 2]
    assert turns[0].prompt_tokens_p50 < turns[1].prompt_tokens_p50 < turns[2].prompt_tokens_p50


@pytest.mark.slow
def test_non_streaming_load_uses_server_ttft(naive_url):
    result = asyncio.run(run_load(naive_url, _cfg(requests=1, stream=False), load_prompts(), progress=False))
    assert [r.ok for r in result.records] == [True, True]
    for rec in result.records:
        assert rec.output_tokens == 8 and rec.itl_s == []
        assert 0 < rec.ttft_s < rec.e2e_s


@pytest.mark.slow
def test_sse_client_on_real_stream(naive_url):
    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "def fibonacci(n):", "max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
            async with s.post(naive_url + "/generate_stream", json=body) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                return [json.loads(e.data) async for e in iter_events(resp.content)]

    events = asyncio.run(go())
    assert sum(len(e["token_ids"]) for e in events) == 6
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 6
    assert all(isinstance(e["text"], str) for e in events)


@pytest.mark.slow
def test_bad_input_is_a_counted_failure(naive_url):
    result = asyncio.run(run_load(naive_url, _cfg(temperature=-1.0), load_prompts(), progress=False))
    assert len(result.records) == 4 and not any(r.ok for r in result.records)
    assert all(r.status == 400 and "temperature" in r.error for r in result.records)
    assert figures(result).failed == 4


@pytest.mark.slow
def test_run_benchmark_against_url_writes_json_and_plot(naive_url, tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    code = run_benchmark(
        url=naive_url, users=2, requests=1, max_new_tokens=4, stream=True, json_path=str(out), plot_path=str(png)
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert list(doc) == ["config", "ours", "baseline", "ratios", "pairs"]
    assert doc["ours"]["completed"] == 2 and doc["ours"]["output_tokens"] == 8
    assert doc["baseline"] is None and doc["ratios"] is None and doc["pairs"] is None
    assert doc["config"]["users"] == 2 and doc["config"]["max_new_tokens"] == 4
    assert png.stat().st_size > 1000
    assert "TTFT p50" in capsys.readouterr().out


# --- failures must be counted, never dropped ----------------------------------------------


@contextlib.asynccontextmanager
async def fake_server(app: web.Application):
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


def _flaky_app() -> web.Application:
    """Request n (per server) behaves as n % 5: fine, 500, error event, clean end without final, hard cut."""
    counter = {"n": 0}

    async def stream(request: web.Request) -> web.StreamResponse:
        mode = counter["n"] % 5
        counter["n"] += 1
        await request.read()
        if mode == 1:
            return web.json_response({"error": {"message": "engine died", "field": None}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": keep-alive comment\r\n\r\n")
        # a multi-line data field and an event split over two writes
        first = b'data: {"text": "a",\ndata:  "token_ids": [1, 2]}\n\n'
        await resp.write(first[:9])
        await asyncio.sleep(0.01)
        await resp.write(first[9:])
        await asyncio.sleep(0.02)
        await resp.write(_event({"text": "b", "token_ids": [3]}))
        if mode == 0:
            await resp.write(
                _event(
                    {
                        "text": "",
                        "token_ids": [],
                        "finish_reason": "length",
                        "usage": {"prompt_tokens": 2, "completion_tokens": 3},
                    }
                )
            )
        elif mode == 2:
            await resp.write(_event({"error": {"message": "engine died mid-stream"}}))
        elif mode == 4:
            await resp.write(b'data: {"text": "c", "tok')
            request.transport.close()  # the connection dies mid-event
        return resp  # mode 3: the body ends cleanly but no final event ever came

    async def generate(request: web.Request) -> web.Response:
        counter["n"] += 1
        if counter["n"] % 2 == 0:
            return web.Response(status=503, text="overloaded")
        return web.json_response(
            {"text": "abc", "finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
        )

    app = web.Application()
    app.router.add_post("/generate_stream", stream)
    app.router.add_post("/generate", generate)
    return app


def test_failed_stream_requests_are_counted_not_dropped():
    async def go():
        async with fake_server(_flaky_app()) as url:
            return await run_load(url, _cfg(users=1, requests=10), load_prompts(), progress=False)

    result = asyncio.run(go())
    assert len(result.records) == 10
    oks = [r.ok for r in result.records]
    assert oks == [True, False, False, False, False] * 2
    good = result.records[0]
    assert good.output_tokens == 3 and len(good.itl_s) == 2 and good.itl_s[0] == 0.0  # 2 ids in one chunk
    assert good.ttft_s is not None and good.e2e_s >= good.ttft_s
    errors = [r.error for r in result.records[1:5]]
    assert "500" in errors[0] and "engine died" in errors[0]
    assert "error event" in errors[1] and "mid-stream" in errors[1]
    assert "without a final event" in errors[2]
    assert errors[3]  # a cut connection: an aiohttp payload error or a cut event, but recorded
    f = figures(result)
    assert (f.completed, f.failed, f.output_tokens) == (2, 8, 6)


def test_failed_plain_requests_and_refused_connections_are_counted():
    async def go():
        async with fake_server(_flaky_app()) as url:
            flaky = await run_load(url, _cfg(users=1, requests=4, stream=False), load_prompts(), progress=False)
        dead = await run_load(f"http://127.0.0.1:{free_port()}", _cfg(), load_prompts(), progress=False)
        return flaky, dead

    flaky, dead = asyncio.run(go())
    assert [r.ok for r in flaky.records] == [True, False, True, False]
    assert flaky.records[1].status == 503 and "overloaded" in flaky.records[1].error
    assert flaky.records[0].ttft_s == flaky.records[0].e2e_s  # no server timings: TTFT is the response time
    assert len(dead.records) == 4 and all(not r.ok and "Connect" in r.error for r in dead.records)


def test_peak_running_from_info():
    async def go(rise: bool):
        polls = {"n": 0}

        async def info(request):
            polls["n"] += 1
            seen = 2 + (polls["n"] if rise else 0)
            return web.json_response(
                {
                    "engines": [
                        {"id": "e0", "running": 1, "max_running_seen": seen},
                        {"id": "e1", "running": 3, "max_running_seen": 4},
                    ]
                }
            )

        async def stream(request):
            await asyncio.sleep(0.6)  # long enough for a few /info polls
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(
                _event({"text": "x", "token_ids": [1], "finish_reason": "length", "usage": {"completion_tokens": 1}})
            )
            return resp

        app = web.Application()
        app.router.add_get("/info", info)
        app.router.add_post("/generate_stream", stream)
        async with fake_server(app) as url:
            return await run_load(url, _cfg(users=1, requests=1), load_prompts(), progress=False), polls["n"]

    flat, _ = asyncio.run(go(rise=False))
    assert flat.peak_running == 3  # max_running_seen did not rise: sampled `running`, largest engine
    risen, polls = asyncio.run(go(rise=True))
    assert polls >= 2 and risen.peak_running >= 4  # e0's max_running_seen rose past e1's running


def test_duration_mode_runs_until_the_deadline():
    async def stream(request):
        await asyncio.sleep(0.05)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_event({"text": "x", "token_ids": [1]}))
        await resp.write(_event({"text": "", "token_ids": [2], "finish_reason": "length"}))
        return resp

    async def go():
        app = web.Application()
        app.router.add_post("/generate_stream", stream)
        async with fake_server(app) as url:
            return await run_load(url, _cfg(users=2, requests=1, duration=0.5), load_prompts(), progress=False)

    result = asyncio.run(go())
    assert len(result.records) >= 4 and all(r.ok for r in result.records)
    assert {r.user for r in result.records} == {0, 1}
    assert all(r.output_tokens == 2 for r in result.records)  # no usage: counted from token_ids
    assert 0.5 <= result.wall_s < 30  # the duration, then the requests in flight finish (room for a busy machine)


def test_run_benchmark_rejects_bad_arguments(capsys):
    assert run_benchmark(url="http://127.0.0.1:9", users=0) == 2
    assert run_benchmark(url="http://127.0.0.1:9", baseline="vllm") == 2
    assert "baseline" in capsys.readouterr().err
    assert run_benchmark(url="http://127.0.0.1:9", pairs=3) == 2
    assert "--pairs needs a --baseline" in capsys.readouterr().err
    assert run_benchmark(url="http://127.0.0.1:9", prompt_tokens=100, chat_turns=2) == 2
    assert "excludes" in capsys.readouterr().err


def test_a_running_kiln_as_the_baseline_in_interleaved_pairs(server, tmp_path):
    """--baseline-url (a previous release, for the no-regression check): both sides measured in alternating
    pairs, each with its own figures and the ratios; a URL nothing answers at is refused before any load."""
    out = tmp_path / "pairs.json"
    code = run_benchmark(
        url=server.url, baseline_url=server.url, users=2, requests=1, max_new_tokens=4, pairs=2, json_path=str(out)
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["baseline"] == "kiln" and doc["config"]["baseline_url"] == server.url
    assert len(doc["pairs"]["pairs"]) == 2
    for pair in doc["pairs"]["pairs"]:
        assert pair["ours"]["completed"] == pair["baseline"]["completed"] == 2
        assert pair["ratios"]["throughput"] > 0 and pair["ratios"]["itl_p50"] > 0
    dead = f"http://127.0.0.1:{free_port()}"
    assert run_benchmark(url=server.url, baseline_url=dead, users=1, requests=1, max_new_tokens=2) == 1


# --- a JSON schema on every request (--json-schema) -------------------------------------------------


def test_a_json_schema_rides_on_every_request_in_both_dialects():
    """kiln's native body and llama-server's /v1/completions body carry the same `json_schema`; EOS is then
    respected in both (the grammar ends the answer), and a run without a schema is unchanged."""
    schema = json.loads(PERSON_SCHEMA.read_text())
    native = NATIVE.body(_cfg(json_schema=schema), "hi", 7)
    assert native == {
        "prompt": "hi",
        "temperature": 0.0,
        "ignore_eos": False,
        "seed": 7,
        "json_schema": schema,
        "max_new_tokens": 8,
    }
    llama = OPENAI.body(_cfg(json_schema=schema), "hi", 7)
    assert llama["json_schema"] == schema and llama["ignore_eos"] is False and llama["max_tokens"] == 8
    plain = NATIVE.body(_cfg(), "hi", 7)
    assert "json_schema" not in plain and plain["ignore_eos"] is True


def test_json_schema_option_refuses_what_cannot_run(tmp_path, capsys):
    dead = "http://127.0.0.1:9"
    not_a_schema = tmp_path / "list.json"
    not_a_schema.write_text("[1, 2]")
    assert run_benchmark(url=dead, json_schema=str(not_a_schema)) == 2
    assert "not a schema object" in capsys.readouterr().err
    assert run_benchmark(url=dead, json_schema=str(tmp_path / "missing.json")) == 2
    assert run_benchmark(url=dead, json_schema=str(PERSON_SCHEMA), baseline="naive") == 2
    assert "--baseline naive" in capsys.readouterr().err


@pytest.mark.slow
def test_a_json_schema_on_every_request_against_kiln(server, tmp_path):
    """Every answer validates against the schema and ends where its grammar does (stop, before the budget);
    the report counts no answer as short and records the schema in its config."""
    schema = json.loads(PERSON_SCHEMA.read_text())
    cfg = _cfg(users=2, requests=1, max_new_tokens=96, json_schema=schema)
    result = asyncio.run(run_load(server.url, cfg, load_prompts(), progress=False))
    for rec in result.records:
        assert rec.ok and rec.finish_reason == "stop", (rec.error, rec.text)
        jsonschema.validate(json.loads(rec.text), schema)
        assert 0 < rec.output_tokens < 96
    out = tmp_path / "schema.json"
    code = run_benchmark(
        url=server.url, users=2, requests=1, max_new_tokens=96, json_schema=str(PERSON_SCHEMA), json_path=str(out)
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["json_schema"] == schema and doc["config"]["ignore_eos"] is True
    assert doc["ours"]["completed"] == 2 and doc["ours"]["short"] is None
