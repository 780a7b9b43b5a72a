"""Small aiohttp helpers for the end-to-end tests: JSON posts and an SSE reader."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from bench.sse import SSEDecoder


async def post_json(session: aiohttp.ClientSession, url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with session.post(url, data=data) as response:
        return response.status, await response.json(content_type=None)


async def stream_events(session: aiohttp.ClientSession, url: str, body: dict, max_events: int | None = None):
    """POST and return the decoded `data:` JSON of each SSE event (stop early after `max_events`)."""
    events = []
    decoder = SSEDecoder()
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for chunk in response.content.iter_any():
            for event in decoder.feed(chunk):
                events.append(event.data if event.data == "[DONE]" else json.loads(event.data))
                if max_events is not None and len(events) >= max_events:
                    return events
    return events


async def generate(url: str, body) -> tuple[int, dict]:
    """One POST /generate on its own session: (status, JSON)."""
    async with aiohttp.ClientSession() as session:
        return await post_json(session, url + "/generate", body)


def run(coroutine):
    return asyncio.run(coroutine)
