"""The paged KV pool end to end: a served pool far smaller than the concurrent work preempts and
resumes sequences without losing or repeating a token, and a repeated prompt is answered from the
prefix cache with the same tokens. Real `cli.py serve`, float32 so greedy tokens do not depend on
which requests shared a step."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import get_json, running_server
from tests.http_client import generate, run, stream_events

pytestmark = pytest.mark.slow

POOL_TOKENS = 512  # 32 blocks: two of the requests below fill it
NEW_TOKENS = 96


@pytest.fixture(scope="module")
def server():
    yield from running_server(
        "--dtype", "float32", "--kv-cache-tokens", str(POOL_TOKENS), "--max-context", "512", "--max-batch", "8"
    )


def prompt(i: int) -> str:
    return f"Request {i}. " + " ".join(f"item {i}-{k}" for k in range(40)) + "\nSummary:"


def counters(server) -> dict:
    (engine,) = get_json(server.url + "/info")["engines"]
    return engine


async def streamed(url: str, bodies: list[dict]) -> list[list[dict]]:
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(stream_events(session, url + "/generate_stream", b) for b in bodies))


def test_a_dry_pool_preempts_and_every_stream_gets_exactly_its_tokens(server):
    bodies = [
        {"prompt": prompt(i), "max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True} for i in range(6)
    ]
    before = counters(server)["preemptions"]
    streams = run(streamed(server.url, bodies))
    assert counters(server)["preemptions"] > before, "the pool never ran dry: the test does not test preemption"
    for body, events in zip(bodies, streams):
        tokens = [t for e in events for t in e.get("token_ids", [])]
        assert "error" not in events[-1] and events[-1]["finish_reason"] == "length"
        assert len(tokens) == NEW_TOKENS == events[-1]["usage"]["completion_tokens"]
        status, alone = run(generate(server.url, body))  # the same request with the pool to itself
        assert status == 200 and alone["token_ids"] == tokens  # nothing lost, repeated or reordered
    engine = counters(server)
    assert engine["kv_blocks_used"] == 0 and engine["kv_slots_used"] == 0  # every block came back


def test_a_repeated_prompt_hits_the_cache_and_answers_the_same(server):
    body = {"prompt": prompt(99), "max_new_tokens": 8, "temperature": 0}
    first = run(generate(server.url, body))[1]
    hits_before = counters(server)["prefix_cache_hits"]
    second = run(generate(server.url, body))[1]
    hits = counters(server)["prefix_cache_hits"] - hits_before
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert hits >= prompt_tokens - 16 and hits < prompt_tokens  # all full blocks but the last token's
    assert second["token_ids"] == first["token_ids"]
    salted = run(generate(server.url, {**body, "cache_salt": "someone else"}))[1]
    assert counters(server)["prefix_cache_hits"] - hits_before == hits  # another salt shares nothing
    assert salted["token_ids"] == first["token_ids"]
