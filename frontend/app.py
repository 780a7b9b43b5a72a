"""HTTP routes: /generate, /generate_stream (SSE), /health, /info, /metrics (+ the OpenAI-style /v1 routes,
and TGI's dialect: POST /, and TGI bodies on /generate and /generate_stream).

A handler validates, tokenizes, hands the request to an engine and turns the engine's token ids
into text as they arrive. Leaving a handler for any reason (client gone, stop string, error)
aborts the request in the engine, which frees its KV blocks within a step.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging

from aiohttp import web
from aiohttp_sse import sse_response
from tokenizers import Tokenizer

from frontend.api import (
    ApiError,
    GenerateRequest,
    GenerateResponse,
    StreamPiece,
    native_logprobs,
    parse_generate_request,
)
from frontend.chat_template import ChatTemplate
from frontend.context import (
    BODY_TIMEOUT_S,
    CLIENT,
    GUIDE_CHECKS,
    HEAP_TRIM,
    JSON,
    MAX_BODY_BYTES,
    METRICS,
    MODEL_NAME,
    PROMPT_ENCODER,
    REQUEST_IDS,
    TOKENIZER,
    api_errors,
    json_response,
    read_body,
    request_id,
    tag_response,
)
from frontend.generation import EngineError, Generation
from frontend.guide_checks import GuideChecks
from frontend.metrics import Metrics
from frontend.openai_api import add_openai_routes
from frontend.prompt_encoder import PromptEncoder
from frontend.router import EngineClient
from frontend.structured import has_guide, native_guide
from frontend.supervisor import EngineSupervisor
from frontend.tgi_api import add_tgi_routes, handle_tgi, is_tgi_body
from hardware.heap import TrimAfterBursts

log = logging.getLogger("kiln.frontend")

SUPERVISOR = web.AppKey("supervisor", EngineSupervisor)
DRAINING = web.AppKey("draining", asyncio.Event)  # set on SIGTERM: refuse new work, let open streams end


async def _native_request(request: web.Request, body: bytes) -> GenerateRequest:
    """kiln's own body, its structured-output fields checked too (a 400 names the field), off the loop."""
    native = parse_generate_request(body)
    await request.app[GUIDE_CHECKS].run(native_guide, native, off_loop=has_guide(native))
    return native


async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    if is_tgi_body(body):  # the body's shape picks the dialect: TGI's has `inputs`
        return await handle_tgi(request, body, "/generate")
    generation = Generation(request.app, await _native_request(request, body))
    try:
        await generation.start()
        async for _ in generation.pieces():
            pass
    except EngineError as exc:
        error = exc.api_error()
        return json_response(error.body(), error.status)
    finally:
        await generation.close()
    asked = generation.body
    return json_response(
        GenerateResponse(
            text=generation.detok.text,
            finish_reason=generation.finish_reason,
            usage=generation.usage(),
            timings=generation.timings(),
            token_ids=generation.token_ids,
            engine=generation.engine_id,
            logprobs=native_logprobs(generation.logprobs) if asked.logprobs is not None else None,
            prompt_logprobs=native_logprobs(generation.prompt_logprobs or [])
            if asked.prompt_logprobs is not None
            else None,
        )
    )


async def generate_stream(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    if is_tgi_body(body):
        return await handle_tgi(request, body, "/generate_stream")
    generation = Generation(request.app, await _native_request(request, body))
    try:
        await generation.start()  # errors before the stream starts are plain 4xx JSON
        async with sse_response(request, allow_all_methods=True) as sse:
            try:
                first = True
                async for text, token_ids in generation.pieces():
                    piece = StreamPiece(text=text, token_ids=token_ids)
                    if generation.body.logprobs is not None and token_ids:
                        piece.logprobs = native_logprobs(generation.logprobs[-len(token_ids) :])
                    if first and generation.body.prompt_logprobs is not None:
                        piece.prompt_logprobs = native_logprobs(generation.prompt_logprobs or [])
                    first = False
                    if generation.finish_reason is not None:
                        piece.finish_reason = generation.finish_reason
                        piece.usage = generation.usage()
                        piece.timings = generation.timings()
                        piece.engine = generation.engine_id
                    await sse.send(JSON.encode(piece).decode())
            except EngineError as exc:
                await sse.send(JSON.encode(exc.api_error().body()).decode())
            return sse
    except (ConnectionResetError, asyncio.CancelledError):
        log.info("client of %s (request id %s) went away; aborting", generation.request_id, request_id(request))
        raise
    finally:
        await generation.close()


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].exposition(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Format": "prometheus-0.0.4"},
    )


async def health(request: web.Request) -> web.Response:
    """200 while it can serve; 503 with the reason otherwise: draining, restarting, loading, failed."""
    client = request.app[CLIENT]
    supervisor = request.app.get(SUPERVISOR)
    restarting = supervisor.restarting() if supervisor is not None else {}
    if request.app[DRAINING].is_set():
        return json_response({"status": "draining", "requests_in_flight": len(client.streams)}, 503)
    if client.ready_engines():
        return json_response(
            {
                "status": "ok",
                "engines": len(client.ready_engines()),
                **({"restarting": restarting} if restarting else {}),
            }
        )
    if restarting:
        return json_response(
            {
                "status": "restarting",
                "restarting": restarting,
                "reason": "; ".join(f"{e}: {r['reason']}" for e, r in restarting.items()),
            },
            503,
        )
    return json_response(
        {"status": "loading" if not client.failures else "failed", "failures": list(client.failures)}, 503
    )


async def info(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    engines = list(client.engines.values())
    return json_response(
        {
            "model": request.app[MODEL_NAME],
            "plan": engines[0].hello.plan if engines else None,
            "engines": [dict(e.describe(), plan=e.hello.plan) for e in engines],
            "requests_in_flight": len(client.streams),
        }
    )


OPEN_PATHS = ("/health", "/metrics")  # probes and scrapers do not carry the key


@web.middleware
async def refuse_while_draining(request: web.Request, handler):
    if request.method == "POST" and request.app[DRAINING].is_set():
        raise ApiError(503, "the server is shutting down; retry on another instance", kind="shutting_down")
    return await handler(request)


def require_api_key(api_key: str):
    """Bearer-token check on every route but the probes, compared in constant time (like vLLM's --api-key)."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(
                    401,
                    "missing or wrong API key: send `Authorization: Bearer <key>`",
                    "Authorization",
                    kind="unauthorized",
                )
        return await handler(request)

    return check


async def _close_guide_checks(app: web.Application) -> None:
    app[GUIDE_CHECKS].close()


DEFAULT_BODY_TIMEOUT_S = 30.0  # a 4 MiB body at about 1 Mbit/s


def build_app(
    client: EngineClient,
    tokenizer: Tokenizer,
    model_name: str,
    chat_template: ChatTemplate | None = None,
    api_key: str | None = None,
    supervisor: EngineSupervisor | None = None,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> web.Application:
    middlewares = [api_errors] + ([require_api_key(api_key)] if api_key else []) + [refuse_while_draining]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(tag_response)  # X-Request-Id on every answer
    app[CLIENT] = client
    app[DRAINING] = asyncio.Event()
    app[BODY_TIMEOUT_S] = body_timeout_s
    if supervisor is not None:
        app[SUPERVISOR] = supervisor
    app[TOKENIZER] = tokenizer
    app[PROMPT_ENCODER] = PromptEncoder(tokenizer)
    app[GUIDE_CHECKS] = GuideChecks()
    app[HEAP_TRIM] = TrimAfterBursts()
    app.on_cleanup.append(_close_guide_checks)
    app[MODEL_NAME] = model_name
    app[REQUEST_IDS] = itertools.count()
    app[METRICS] = Metrics(client, model_name)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
    add_openai_routes(app, chat_template)
    add_tgi_routes(app)  # POST /; /generate and /generate_stream also take TGI's body
    return app
