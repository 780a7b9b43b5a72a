"""One request's life inside the frontend, shared by the native and the OpenAI-style routes:
admit (cheap refusals first, then tokenize off the loop, then the context check), stream token
ids from an engine, detokenize, count the outcome, and abort in the engine whichever way the
handler leaves. Handlers wrap everything from `start` on in try/finally `close`, so any failure
at any stage leaves nothing registered.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
import uuid

import msgspec
from aiohttp import web
from tokenizers import Tokenizer

from frontend.api import ApiError, GenerateRequest, Timings, Usage
from frontend.chat_template import PromptPiece
from frontend.detokenizer import IncrementalDetokenizer
from frontend.metrics import Metrics
from frontend.prompt_encoder import PromptEncoder
from ipc.engine_client import EngineClient, NoEngineAvailable
from ipc.messages import FinishReason

log = logging.getLogger("kiln.frontend")

CLIENT = web.AppKey("client", EngineClient)
TOKENIZER = web.AppKey("tokenizer", Tokenizer)
PROMPT_ENCODER = web.AppKey("prompt_encoder", PromptEncoder)
MODEL_NAME = web.AppKey("model_name", str)
METRICS = web.AppKey("metrics", Metrics)
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)
REQUEST_IDS = web.AppKey("request_ids", itertools.count)
JSON = msgspec.json.Encoder()
# Bounds the work and memory one request can cost before validation; any prompt that fits a context
# window of 8192 tokens (and far more, for most text) fits, and prompt length is checked after.
MAX_BODY_BYTES = 4 * 1024 * 1024


def too_large() -> ApiError:
    return ApiError(413, f"request body is larger than the {MAX_BODY_BYTES // 1024} KiB limit; a prompt "
                         "must fit the context window anyway", "body", kind="request_too_large")


async def read_body(request: web.Request) -> bytes:
    """The whole body, refused unread when its Content-Length is over the limit, and within a deadline,
    so that a client trickling bytes (slowloris) holds its connection for a bounded time only."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large()
    deadline = request.app[BODY_TIMEOUT_S]
    try:
        async with asyncio.timeout(deadline):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {deadline:g} s", "body",
                       kind="request_timeout") from None


def json_response(payload, status: int = 200) -> web.Response:
    return web.Response(body=JSON.encode(payload), status=status, content_type="application/json")


REQUEST_ID_HEADER = "X-Request-Id"
# A client's id is echoed when it is 1 to 128 printable ASCII characters without spaces; else one is made.
_CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_PREPARED = "kiln_response_prepared"
MAX_SHOWN_PATH_CHARS = 100


def request_id(request: web.Request) -> str:
    """This request's id: the client's `X-Request-Id` if it sent a sane one, else a fresh uuid4 hex."""
    rid = request.get(REQUEST_ID_HEADER)
    if rid is None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        rid = request[REQUEST_ID_HEADER] = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return rid


async def tag_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer (errors, SSE streams, aiohttp's own) carries the request id."""
    response.headers[REQUEST_ID_HEADER] = request_id(request)
    request[_PREPARED] = True


def is_openai_route(request: web.Request) -> bool:
    return request.path == "/v1" or request.path.startswith("/v1/")


def http_error(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (no such route, wrong method, ...) as an ApiError."""
    path = request.path
    shown = f"{request.method} {path[:MAX_SHOWN_PATH_CHARS]}{'…' if len(path) > MAX_SHOWN_PATH_CHARS else ''}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return ApiError(405, f"method not allowed ({shown}); this route takes {allowed}",
                        kind="method_not_allowed", headers={"Allow": exc.headers.get("Allow", allowed)})
    if exc.status == 404:
        return ApiError(404, f"no such route ({shown})", kind="not_found")
    return ApiError(exc.status, f"{exc.reason} ({shown})", kind=exc.reason.lower().replace(" ", "_"))


@web.middleware
async def api_errors(request: web.Request, handler):
    """ApiError → its JSON; an oversized body → a JSON 413 naming the limit; aiohttp's 404, 405 and other
    refusals, and an unexpected exception (a 500), → the same JSON shape. On /v1 routes `type` is
    OpenAI's name for it. Every refusal is counted. A body left unread (too large, too slow) ends the
    connection after the answer. Nothing is converted once a response (a stream) has started."""
    try:
        return await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPRequestEntityTooLarge:
        error = too_large()
    except web.HTTPException as exc:
        if exc.status < 400 or request.get(_PREPARED):
            raise
        error = http_error(request, exc)
    except ConnectionError:  # the client is gone: nobody to answer
        raise
    except Exception:
        if request.get(_PREPARED):
            raise
        log.exception("unexpected error in %s %s (request id %s)", request.method, request.path, request_id(request))
        error = ApiError(500, "internal server error", kind="internal_error")
    request.app[METRICS].refused.labels(error.kind).inc()
    response = json_response(error.body(openai=is_openai_route(request)), error.status)
    response.headers.update(error.headers)
    if error.status in (408, 413):
        response.force_close()
    return response


class Generation:
    """One request's life: admission, the engine stream, detokenization, timings."""

    def __init__(self, app: web.Application, body: GenerateRequest):
        self.app = app
        self.client = app[CLIENT]
        self.metrics = app[METRICS]
        self.body = body
        self.request_id = f"{os.getpid()}-{next(app[REQUEST_IDS])}"
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_ids: list[int] = []
        self.detok: IncrementalDetokenizer | None = None
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stream = None
        self.closed = False

    async def start(self, add_special_tokens: bool = True, field: str = "prompt",
                    pieces: list[PromptPiece] | None = None, prompt_ids: list[int] | None = None) -> None:
        """Refuse early and cheaply, then tokenize, then hand the request to an engine. `field`: what
        the client sent the prompt as (OpenAI chat: `messages`), for error messages; `pieces`: the
        prompt as template and client text (a chat), so client text cannot become control tokens;
        `prompt_ids`: the prompt as token ids, not tokenized again."""
        engine = self._pick_engine()
        encoder = self.app[PROMPT_ENCODER]
        encoder.check_length(self.body.prompt, engine.hello.plan.max_context, field)
        if prompt_ids is not None:  # the client sent token ids (OpenAI completions): used as they are
            self.prompt_ids = list(prompt_ids)
        elif pieces is None:
            self.prompt_ids = await encoder.encode(self.body.prompt, add_special_tokens)
        else:
            self.prompt_ids = await encoder.encode_pieces(pieces)
        if not self.prompt_ids:
            raise ApiError(400, f"`{field}` encodes to no tokens", field)
        self.detok = IncrementalDetokenizer(self.app[TOKENIZER], self.prompt_ids, self.body.stop)
        engine = self._pick_engine()  # again: engines may have come or gone while tokenizing
        context = engine.hello.plan.max_context
        if len(self.prompt_ids) >= context:
            raise ApiError(400, f"{field} is {len(self.prompt_ids)} tokens; the context window is {context} "
                                f"tokens (prompt + generated), so the prompt must be shorter", field)
        # generation stops at the context window: finish_reason "length", as if max_new_tokens were smaller
        budget = min(self.body.max_new_tokens, context - len(self.prompt_ids))
        try:
            self.stream = await self.client.submit(self.request_id, self.prompt_ids,
                                                   self.body.sampling_params(budget), engine)
        except NoEngineAvailable as exc:
            raise ApiError(503, str(exc), kind="unavailable") from None

    def _pick_engine(self):
        try:
            engine = self.client.pick_engine()
        except NoEngineAvailable:
            raise ApiError(503, "no engine is ready yet; retry shortly", kind="unavailable") from None
        if self.client.overloaded():
            raise ApiError(429, "server overloaded: too many requests waiting; retry later", kind="overloaded")
        return engine

    async def pieces(self):
        """Yield (text, token_ids) as tokens arrive; sets finish_reason at the end."""
        while self.finish_reason is None:
            output = await self.stream.queue.get()
            if output.finish_reason == FinishReason.ERROR:
                self.finish_reason = "error"
                raise EngineError(output.error or "engine error")
            if self.first_token_at is None and output.new_token_ids:
                self.first_token_at = time.perf_counter()
            self.token_ids += output.new_token_ids
            text = self.detok.push(output.new_token_ids)
            if self.detok.stopped:
                self.finish_reason = "stop"
                await self.client.abort(self.request_id)
            else:
                self.finish_reason = None if output.finish_reason is None else str(output.finish_reason)
            if self.finish_reason is not None:
                text += self.detok.flush()
            if text or output.new_token_ids:
                yield text, output.new_token_ids

    async def close(self) -> None:
        """Abort in the engine unless it already finished (idempotent); count the outcome."""
        if self.stream is None or self.closed:
            return
        self.closed = True
        timings = self.timings()
        self.metrics.observe(self.finish_reason or "abort", len(self.prompt_ids), len(self.token_ids),
                             timings.ttft_s, timings.total_s)
        await self.client.abort(self.request_id)

    @property
    def engine_id(self) -> str:
        """The engine that served it (a request moved off a lost engine reports the new one)."""
        return self.stream.engine_id

    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.token_ids))

    def timings(self) -> Timings:
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        return Timings(ttft_s=ttft, total_s=time.perf_counter() - self.started)


class EngineError(Exception):
    pass
