"""A pathological guide fails (or finishes) only its own request (issue 22): while an unguided stream runs
on /generate_stream of a real server, guides as hard as a client can make them (bench/guided_isolation.py's,
each measured there against the grammar library) are sent on /generate; each gets a clear answer, and the
stream completes with every token it asked for. How long the stream waited between tokens meanwhile is a
wall-clock figure, measured by `python -m bench.guided_isolation`, not asserted here.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from bench.guided_isolation import pathological_requests, send_attack
from bench.sse import SSEDecoder

pytestmark = pytest.mark.slow

STREAM_TOKENS = 48
STREAM = {"prompt": "Count slowly:", "max_new_tokens": STREAM_TOKENS, "ignore_eos": True, "temperature": 0}
FIELDS = ("json_schema", "regex", "grammar")


async def _stream(session: aiohttp.ClientSession, url: str, started: asyncio.Event) -> list[dict]:
    """The stream's events; `started` is set at its first token."""
    events, decoder = [], SSEDecoder()
    async with session.post(url + "/generate_stream", json=STREAM) as response:
        assert response.status == 200, await response.text()
        async for chunk in response.content.iter_any():
            for event in decoder.feed(chunk):
                events.append(json.loads(event.data))
                started.set()
    return events


async def _beside_a_stream(url: str, names: list[str]) -> tuple[list[dict], list[dict]]:
    attacks = pathological_requests()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = asyncio.Event()
        stream = asyncio.create_task(_stream(session, url, started))
        await asyncio.wait_for(started.wait(), 60)
        answers = [await send_attack(session, url, name, attacks[name]) for name in names]
        return await stream, answers


def test_pathological_guides_fail_only_their_own_request(server):
    names = list(pathological_requests())
    events, answers = asyncio.run(_beside_a_stream(server.url, names))
    for answer in answers:
        if answer["status"] == 400:  # refused by the frontend (naming the field) or the engine (its compile)
            assert any(f"`{field}" in answer["said"] for field in FIELDS) or "guide" in answer["said"], answer
        else:  # or served: a complete, short answer in its grammar
            assert answer["status"] == 200 and answer["finish_reason"] in ("stop", "length"), answer
    tokens = [t for event in events for t in event.get("token_ids", [])]
    assert len(tokens) == STREAM_TOKENS and events[-1]["finish_reason"] == "length", events[-1]
    assert all("error" not in event for event in events)
