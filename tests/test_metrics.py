"""GET /metrics on a real server: vLLM's series with model_name and engine labels, kiln's own, the
process collectors, and every refusal counted by HTTP status and reason (a 429 storm included)."""

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
    """One slot of 64 tokens: three long requests fill the admission queue, so a burst gets 429s."""
    yield from running_server("--max-context", "64", "--max-batch", "1", env={"KILN_API_KEY": KEY})


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} from the text exposition."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = frozenset(tuple(part.split("=", 1)) for part in _split_labels(labels.rstrip("}")))
        samples[name, frozenset((k, json.loads(v)) for k, v in pairs)] = float(value)
    return samples


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
    ):
        assert has(after, name, **ENGINE), name
        assert 0 <= value(after, name, **ENGINE) < math.inf
    assert value(after, "kiln_engine_kv_slots", engine="engine-0") == 1
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
    """A burst far beyond one 64-token slot: the admitted streams hold the slot (KV usage 1.0 while they
    run), every other request gets a 429, and each 429 is counted, so an error-rate panel sees the storm."""
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
                        usage_seen.append((usage, value(samples, "kiln_engine_kv_slots_used", engine="engine-0")))
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
    assert usage_seen and usage_seen[0] == (1.0, 1.0), usage_seen  # one slot of one held: 100 %
