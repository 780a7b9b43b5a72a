"""The HTTP app in-process, over real HTTP on loopback and real ZeroMQ, against a scripted engine (no model):
what the routes send the engine (`cache_salt`), what they refuse, and what /metrics and /info show of the
engine's KV pool and prefix cache, from stats the engine reports. The engine's side is
tests/test_engine_client.py's `ScriptedEngine`; the tokenizer and chat template are the default model's.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile

import aiohttp
import msgspec
import pytest
import zmq.asyncio
from aiohttp import web
from tokenizers import Tokenizer

from frontend.api import MAX_CACHE_SALT_CHARS
from frontend.app import build_app
from frontend.chat_template import ChatTemplate
from frontend.router import EngineClient
from ipc.messages import EngineStats, FinishReason, Heartbeat, Request, RequestOutput
from tests.http_client import run
from tests.test_engine_client import PLAN, ScriptedEngine, until
from tests.test_metrics import has, parse_exposition, value

MODEL = "m"  # the scripted engine's model name
ENGINE = {"model_name": MODEL, "engine": "scripted"}
SALT = "tenant-a"
# every route that takes a salt, with a body that is valid without one
ROUTES = {
    "/generate": {"prompt": "Hello", "max_new_tokens": 2},
    "/generate_stream": {"prompt": "Hello", "max_new_tokens": 2},
    "/v1/completions": {"prompt": "Hello", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
}


@pytest.fixture(scope="module")
def model_files(default_model_path) -> tuple[Tokenizer, ChatTemplate | None]:
    return Tokenizer.from_file(f"{default_model_path}/tokenizer.json"), ChatTemplate.from_folder(default_model_path)


@contextlib.asynccontextmanager
async def serving(model_files, plan=PLAN):
    """(base url, scripted engine, client): the app on a free loopback port, one scripted engine attached."""
    tokenizer, template = model_files
    with tempfile.TemporaryDirectory(prefix="kiln-test-") as folder:
        client = EngineClient([f"ipc://{folder}/input"], [f"ipc://{folder}/output"], MODEL)
        await client.start()
        context = zmq.asyncio.Context()
        engine = ScriptedEngine(context, folder, plan=plan)
        runner = web.AppRunner(build_app(client, tokenizer, MODEL, template), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()  # a port of the system's choosing
        port = runner.addresses[0][1]
        try:
            await engine.attach(client)
            yield f"http://127.0.0.1:{port}", engine, client
        finally:
            await runner.cleanup()
            await engine.close()
            await client.close()
            context.term()


async def answer_one(engine: ScriptedEngine) -> Request:
    """The next request the engine receives, finished at once with two tokens."""
    request = await engine.next_input()
    assert isinstance(request, Request), request
    await engine.step(RequestOutput(request.request_id, [42, 43], FinishReason.LENGTH), served=1)
    return request


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, str]:
    async with session.post(url, json=body) as response:
        return response.status, await response.text()


async def sent_to_engine(url: str, engine: ScriptedEngine, path: str, body: dict) -> Request:
    """POST body, answer it from the engine, and return the Request the engine got."""
    async with aiohttp.ClientSession() as session:
        reply = asyncio.ensure_future(post(session, url + path, body))
        request = await answer_one(engine)
        status, text = await reply
    assert status == 200, (path, text)
    return request


@pytest.mark.parametrize("stream", [False, True])
def test_the_cache_salt_reaches_the_engine_from_every_route(model_files, stream):
    async def scenario():
        seen = {}
        async with serving(model_files) as (url, engine, _):
            for path, body in ROUTES.items():
                if path.startswith("/v1/"):
                    body = {**body, "stream": stream}
                salted = await sent_to_engine(url, engine, path, {**body, "cache_salt": SALT})
                plain = await sent_to_engine(url, engine, path, body)
                null = await sent_to_engine(url, engine, path, {**body, "cache_salt": None})
                seen[path] = (salted.cache_salt, plain.cache_salt, null.cache_salt)
            longest = "é" * MAX_CACHE_SALT_CHARS  # the limit counts characters, not bytes
            seen["longest"] = (
                await sent_to_engine(url, engine, "/generate", {**ROUTES["/generate"], "cache_salt": longest})
            ).cache_salt
        return seen, longest

    seen, longest = run(scenario())
    assert seen.pop("longest") == longest
    assert seen == {path: (SALT, None, None) for path in ROUTES}


def test_n_choices_all_carry_the_salt(model_files):
    async def scenario():
        async with serving(model_files) as (url, engine, _):
            async with aiohttp.ClientSession() as session:
                reply = asyncio.ensure_future(
                    post(
                        session, url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": 3, "cache_salt": SALT}
                    )
                )
                requests = [await answer_one(engine) for _ in range(3)]
                status, text = await reply
        assert status == 200, text
        return [r.cache_salt for r in requests]

    assert run(scenario()) == [SALT] * 3


@pytest.mark.parametrize("salt", ["", "x" * (MAX_CACHE_SALT_CHARS + 1), 7, ["a"], {"a": 1}])
def test_a_bad_cache_salt_is_a_400_naming_it_on_every_route(model_files, salt):
    async def scenario():
        answers = {}
        async with serving(model_files) as (url, engine, _):
            async with aiohttp.ClientSession() as session:
                for path, body in ROUTES.items():
                    async with session.post(url + path, json={**body, "cache_salt": salt}) as response:
                        answers[path] = (response.status, await response.json())
            reached_engine = await engine.has_input()
        return answers, reached_engine

    answers, reached_engine = run(scenario())
    assert not reached_engine
    for path, (status, body) in answers.items():
        assert status == 400, (path, body)
        error = body["error"]
        assert error["field"] == "cache_salt" and "cache_salt" in error["message"], (path, error)
        if path.startswith("/v1/"):
            assert error["param"] == "cache_salt", (path, error)


def test_a_tgi_body_keeps_refusing_fields_tgi_does_not_have(model_files):
    """TGI has no cache_salt; its dialect stays strict (a 400 naming the field), not silently unsalted."""

    async def scenario():
        async with serving(model_files) as (url, engine, _):
            async with aiohttp.ClientSession() as session:
                status, text = await post(
                    session, url + "/generate", {"inputs": "Hello", "parameters": {"cache_salt": SALT}}
                )
            return status, msgspec.json.decode(text), await engine.has_input()

    status, body, reached_engine = run(scenario())
    assert status == 400 and body["field"] == "parameters.cache_salt" and not reached_engine


# ---- /metrics and /info from the engine's stats ----------------------------------------------------

POOL_PLAN = msgspec.structs.replace(PLAN, kv_block_size=32, prefix_caching=False)  # not the defaults: read from it
POOL_STATS = EngineStats(
    running=3,
    kv_slots_used=3,
    kv_blocks_total=200,
    kv_blocks_used=50,
    kv_blocks_cached=70,
    prefix_cache_queries=1000,
    prefix_cache_hits=640,
    preemptions=4,
)


async def scrape_and_info(url: str) -> tuple[dict, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as response:
            assert response.status == 200
            samples = parse_exposition(await response.text())
        async with session.get(url + "/info") as response:
            return samples, await response.json()


def with_stats(model_files, stats: EngineStats, plan=POOL_PLAN) -> tuple[dict, dict]:
    """(/metrics samples, /info) once the scripted engine has reported `stats` in a heartbeat."""

    async def scenario():
        async with serving(model_files, plan) as (url, engine, client):
            await engine.send(Heartbeat(engine.engine_id, stats))
            await until(lambda: client.engines[engine.engine_id].stats == stats, "the heartbeat's stats to arrive")
            return await scrape_and_info(url)

    return run(scenario())


def test_metrics_show_the_pool_the_prefix_cache_and_preemptions(model_files):
    samples, _ = with_stats(model_files, POOL_STATS)
    kiln = {"engine": "scripted", "device": "cpu"}
    assert value(samples, "vllm:kv_cache_usage_perc", **ENGINE) == 50 / 200  # used blocks / blocks
    assert value(samples, "vllm:gpu_cache_usage_perc", **ENGINE) == 50 / 200
    assert value(samples, "vllm:prefix_cache_queries_total", **ENGINE) == 1000  # counters, in tokens
    assert value(samples, "vllm:prefix_cache_hits_total", **ENGINE) == 640
    assert value(samples, "vllm:num_preemptions_total", **ENGINE) == 4
    assert value(samples, "kiln_engine_kv_cache_usage_ratio", **kiln) == 50 / 200
    assert value(samples, "kiln_engine_kv_blocks", **kiln) == 200
    assert value(samples, "kiln_engine_kv_blocks_used", **kiln) == 50
    assert value(samples, "kiln_engine_kv_blocks_cached", **kiln) == 70
    assert value(samples, "kiln_engine_kv_block_size", **kiln) == 32  # the plan's
    assert value(samples, "kiln_engine_kv_slots_used", **kiln) == 3  # sequences holding KV
    assert value(samples, "kiln_engine_kv_slots", **kiln) == POOL_PLAN.max_batch


def test_info_shows_each_engines_pool(model_files):
    _, info = with_stats(model_files, POOL_STATS)
    (engine,) = info["engines"]
    shown = {key: engine[key] for key in POOL_FIELDS}
    assert shown == {
        "kv_slots_used": 3,
        "kv_blocks_total": 200,
        "kv_blocks_used": 50,
        "kv_blocks_cached": 70,
        "kv_blocks_free": 150,
        "kv_block_size": 32,
        "prefix_caching": False,
        "prefix_cache_queries": 1000,
        "prefix_cache_hits": 640,
        "preemptions": 4,
    }


POOL_FIELDS = (
    "kv_slots_used",
    "kv_blocks_total",
    "kv_blocks_used",
    "kv_blocks_cached",
    "kv_blocks_free",
    "kv_block_size",
    "prefix_caching",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "preemptions",
)


def test_an_engine_without_a_pool_reports_kv_usage_as_slots_held(model_files):
    """An older engine sends no block counts (0): usage falls back to sequences held / max_batch."""
    samples, info = with_stats(model_files, EngineStats(running=1, kv_slots_used=1), plan=PLAN)
    assert value(samples, "vllm:kv_cache_usage_perc", **ENGINE) == 1 / PLAN.max_batch
    assert has(samples, "vllm:prefix_cache_hits_total", **ENGINE)  # at zero, from the first scrape
    assert value(samples, "vllm:prefix_cache_hits_total", **ENGINE) == 0
    assert info["engines"][0]["kv_blocks_total"] == 0
