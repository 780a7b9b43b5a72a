"""GET /metrics on a real server: vLLM's series with model_name and engine labels, kiln's own, the
process collectors, every refusal counted by HTTP status and reason (a 429 storm included), and the
prefix cache's hits counted when a prompt comes again. (The same series from given engine stats, with no
model: tests/test_app_scripted_engine.py.)"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request

import aiohttp
import pytest

from tests.conftest import running_server
from tests.http_client import run

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "SmolLM2-135M-Instruct"
ENGINE = {"model_name": MODEL, "engine": "engine-0"}


@pytest.fixture(scope="module")
def server(default_model_path):
    """A running batch of one and a context of 64 tokens: a burst of long requests fills the admission
    queue (9 requests per place in the batch, or 3× the KV pool in tokens of work), so it gets 429s."""
    yield from running_server("--max-context", "64", "--max-batch", "1", env={"KILN_API_KEY": KEY})


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} from the server's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse_exposition(response.read().decode())


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} from the text exposition."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = frozenset(tuple(part.split("=", 1)) for part in _split_labels(labels.rstrip("}")))
        samples[name, frozenset((k, json.loads(v)) for k, v in pairs)] = float(value)
    return samples


def engine_info(server) -> dict:
    """engine-0's entry in /info (which needs the API key)."""
    request = urllib.request.Request(server.url + "/info", headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["engines"][0]


def _split_labels(text: str) -> list[str]:
    parts, current, quoted = [], "", False
    for char in text:
        if char == '"' and not current.endswith("\\"):
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + ([current] if current else [])


def value(samples, name: str, **labels) -> float:
    """The sum over every series of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def has(samples, name: str, **labels) -> bool:
    wanted = set(labels.items())
    return any(n == name and wanted <= ls for n, ls in samples)


async def _request(session, method: str, path: str, url: str, body=None, headers=None) -> int:
    data = body if body is None or isinstance(body, (bytes, str)) else json.dumps(body)
    async with session.request(method, url + path, data=data, headers=headers) as response:
        await response.read()
        return response.status


def test_vllm_series_with_model_and_engine_labels(server):
    before = scrape(server.url)

    async def load():
        async with aiohttp.ClientSession(headers=AUTH) as session:
            assert (
                await _request(
                    session,
                    "POST",
                    "/generate",
                    server.url,
                    {"prompt": "Hello", "max_new_tokens": 6, "ignore_eos": True},
                )
                == 200
            )
            assert (
                await _request(
                    session,
                    "POST",
                    "/v1/completions",
                    server.url,
                    {"prompt": "Hi", "max_tokens": 4, "stream": True, "ignore_eos": True},
                )
                == 200
            )

    run(load())
    after = scrape(server.url)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("vllm:request_success_total", finished_reason="length", **ENGINE) == 2
    for reason in ("stop", "length", "abort", "error"):  # every reason is there from the start, as in vLLM
        assert has(after, "vllm:request_success_total", finished_reason=reason, **ENGINE)
    assert delta("vllm:generation_tokens_total", **ENGINE) == 10
    assert delta("vllm:prompt_tokens_total", **ENGINE) >= 2
    assert delta("vllm:request_generation_tokens_count", **ENGINE) == 2
    assert delta("vllm:request_generation_tokens_sum", **ENGINE) == 10
    assert delta("vllm:request_params_max_tokens_sum", **ENGINE) == 10
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_time_per_output_token_seconds",
    ):
        assert delta(name + "_count", **ENGINE) == 2, name
        assert delta(name + "_bucket", le="+Inf", **ENGINE) == 2, name
    # inter-token latency: one observation per gap between tokens (5 + 3), sum = decode time
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert delta(name + "_count", **ENGINE) == 8, name
        assert delta(name + "_bucket", le="+Inf", **ENGINE) == 8, name
        assert delta(name + "_sum", **ENGINE) == pytest.approx(delta("vllm:request_decode_time_seconds_sum", **ENGINE))
    # the engine's own queue and prefill durations arrive with each request's first output
    for name in (
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:time_per_prefill_token_request_seconds",
    ):
        assert delta(name + "_count", **ENGINE) == 2, name
    assert (
        0
        < delta("vllm:request_prefill_time_seconds_sum", **ENGINE)
        < delta("vllm:time_to_first_token_seconds_sum", **ENGINE)
    )  # prefill is part of time to first token
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
    ):
        assert has(after, name, **ENGINE), name
        assert 0 <= value(after, name, **ENGINE) < math.inf
    assert value(after, "vllm:prefix_cache_queries_total", **ENGINE) >= 2  # every prompt is looked up
    assert value(after, "kiln_engine_kv_slots", engine="engine-0") == 1
    assert value(after, "kiln_engine_kv_blocks", engine="engine-0") > 0
    assert value(after, "kiln_engine_kv_block_size", engine="engine-0") > 0
    for name in ("kiln_engine_kv_blocks_used", "kiln_engine_kv_blocks_cached"):
        assert has(after, name, engine="engine-0"), name
    assert value(after, "kiln_engine_served_total", engine="engine-0") >= 2  # a counter now
    assert value(after, "kiln_engines_ready") == 1
    # the frontend's own process, and the engine process it started
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_cpu_seconds_total") > 0
    assert has(after, "python_info")
    assert value(after, "kiln_engine_process_resident_memory_bytes", engine="engine-0") > 0
    assert value(after, "kiln_engine_process_cpu_seconds_total", engine="engine-0") > 0


def test_every_refusal_is_counted_by_status_and_reason(server):
    before = scrape(server.url)

    async def refusals():
        async with aiohttp.ClientSession() as session:
            return [
                await _request(session, "POST", "/generate", server.url, {"prompt": "x"}),  # no key
                await _request(session, "POST", "/generate", server.url, b"{not json", AUTH),
                await _request(session, "POST", "/generate", server.url, {"prompt": "x", "top_p": 7}, AUTH),
                await _request(session, "GET", "/no/such/route", server.url, headers=AUTH),
                await _request(session, "GET", "/generate", server.url, headers=AUTH),
                await _request(session, "POST", "/v1/completions", server.url, {"model": "other", "prompt": "x"}, AUTH),
            ]

    assert run(refusals()) == [401, 400, 400, 404, 405, 404]
    after = scrape(server.url)

    def delta(**labels):
        return value(after, "kiln_refused_requests_total", **labels) - value(
            before, "kiln_refused_requests_total", **labels
        )

    assert delta(status="401", reason="unauthorized") == 1
    assert delta(status="400", reason="invalid_request") == 2
    assert delta(status="404", reason="not_found") == 1
    assert delta(status="405", reason="method_not_allowed") == 1
    assert delta(status="404", reason="model_not_found") == 1
    assert delta() == 6


def test_a_429_storm_is_counted_and_kv_usage_is_a_ratio(server):
    """A burst far beyond a running batch of one: the admitted streams hold KV blocks while they run (KV usage
    = used blocks / blocks, above 0), every other request gets a 429, and each 429 is counted, so an
    error-rate panel sees the storm."""
    before = scrape(server.url)
    body = {"prompt": "Tell me a story", "max_new_tokens": 60, "ignore_eos": True}
    usage_seen = []

    async def one(session, release: asyncio.Event, statuses: list[int]) -> None:
        async with session.post(server.url + "/generate_stream", json=body) as response:
            statuses.append(response.status)  # a stream's headers come before its first token
            if response.status == 200:
                await release.wait()  # admitted: hold the stream open until the storm is over
            else:
                await response.read()

    async def storm() -> list[int]:
        release, statuses = asyncio.Event(), []
        async with aiohttp.ClientSession(headers=AUTH) as session:
            tasks = [asyncio.create_task(one(session, release, statuses)) for _ in range(30)]
            try:
                deadline = time.monotonic() + 120
                while len(statuses) < len(tasks) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                while time.monotonic() < deadline:  # the admitted streams hold the engine's only slot
                    samples = await asyncio.to_thread(scrape, server.url)
                    usage = value(samples, "vllm:kv_cache_usage_perc", **ENGINE)
                    if usage > 0:
                        used, total = (
                            value(samples, f"kiln_engine_kv_blocks{suffix}", engine="engine-0")
                            for suffix in ("_used", "")
                        )
                        usage_seen.append((usage, used, total))
                        break
                    await asyncio.sleep(0.2)
            finally:
                release.set()  # leaving closes the admitted streams: the server aborts them
                await asyncio.gather(*tasks, return_exceptions=True)
        return statuses

    statuses = run(storm())
    refused = statuses.count(429)
    assert refused >= 1 and set(statuses) <= {200, 429}, statuses
    after = scrape(server.url)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("kiln_refused_requests_total", status="429", reason="overloaded") == refused
    assert usage_seen, "no KV usage seen while streams ran"
    usage, used, total = usage_seen[0]
    assert 0 < usage <= 1 and usage == used / total, usage_seen  # one scrape: the same engine stats


# 37 tokens with the default tokenizer: two full blocks of 16 (the default block size) and a partial one, under
# the 64-token context
LONG_PROMPT = (
    "You are a careful assistant for a small bakery in the old town. Answer in one short sentence, politely, "
    "and never invent prices or opening hours. Question: which of your breads is"
)


def test_a_prompt_sent_again_is_found_in_the_prefix_cache(server):
    """The second identical prompt's full blocks come from the prefix cache: vllm:prefix_cache_hits_total
    rises by at least one block, and the greedy answer is the same."""
    block_size = engine_info(server)["kv_block_size"]
    body = {"prompt": LONG_PROMPT, "max_new_tokens": 4, "temperature": 0}
    before = scrape(server.url)

    async def twice():
        async with aiohttp.ClientSession(headers=AUTH) as session:
            answers = []
            for _ in range(2):
                async with session.post(server.url + "/generate", json=body) as response:
                    assert response.status == 200, await response.text()
                    answers.append(await response.json())
            return answers

    first, second = run(twice())
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert prompt_tokens > block_size, "the prompt must fill at least one block for this test to mean anything"
    after = scrape(server.url)
    delta = lambda name: value(after, name, **ENGINE) - value(before, name, **ENGINE)  # noqa: E731
    hits, queries = delta("vllm:prefix_cache_hits_total"), delta("vllm:prefix_cache_queries_total")
    assert block_size <= hits <= prompt_tokens, (hits, block_size, prompt_tokens)
    assert queries >= prompt_tokens + hits  # both prompts were looked up; hits are some of those tokens
    assert second["text"] == first["text"]
    info = engine_info(server)
    assert info["prefix_cache_hits"] >= hits and info["prefix_caching"] is True
