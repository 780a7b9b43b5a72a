"""One request's life inside the frontend, shared by the native and the OpenAI-style routes:
tokenize, admit (context and overload checks), stream token ids from an engine, detokenize,
count the outcome, and abort in the engine whichever way the handler leaves.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time

import msgspec
from aiohttp import web
from tokenizers import Tokenizer

from frontend.api import ApiError, GenerateRequest, Timings, Usage
from frontend.detokenizer import IncrementalDetokenizer
from frontend.metrics import Metrics
from ipc.engine_client import EngineClient, NoEngineAvailable

CLIENT = web.AppKey("client", EngineClient)
TOKENIZER = web.AppKey("tokenizer", Tokenizer)
MODEL_NAME = web.AppKey("model_name", str)
METRICS = web.AppKey("metrics", Metrics)
REQUEST_IDS = web.AppKey("request_ids", itertools.count)
JSON = msgspec.json.Encoder()
LONG_PROMPT_CHARS = 4096


def json_response(payload, status: int = 200) -> web.Response:
    return web.Response(body=JSON.encode(payload), status=status, content_type="application/json")


@web.middleware
async def api_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.body(), exc.status)


class Generation:
    """One request's life: admission, the engine stream, detokenization, timings."""

    def __init__(self, app: web.Application, body: GenerateRequest, prompt_ids: list[int]):
        self.client = app[CLIENT]
        self.metrics = app[METRICS]
        self.body = body
        self.request_id = f"{os.getpid()}-{next(app[REQUEST_IDS])}"
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_ids = prompt_ids
        self.detok = IncrementalDetokenizer(app[TOKENIZER], self.prompt_ids, body.stop)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stream = None
        self.closed = False

    async def start(self) -> None:
        if not self.prompt_ids:
            raise ApiError(400, "`prompt` encodes to no tokens", "prompt")
        try:
            engine = self.client.pick_engine()
        except NoEngineAvailable:
            raise ApiError(503, "no engine is ready yet; retry shortly", kind="unavailable") from None
        if self.client.overloaded():
            raise ApiError(429, "server overloaded: too many requests waiting; retry later", kind="overloaded")
        context = engine.hello.plan.max_context
        if len(self.prompt_ids) >= context:
            raise ApiError(400, f"prompt is {len(self.prompt_ids)} tokens; the context window is {context} "
                                f"tokens (prompt + generated), so the prompt must be shorter", "prompt")
        # generation stops at the context window: finish_reason "length", as if max_new_tokens were smaller
        budget = min(self.body.max_new_tokens, context - len(self.prompt_ids))
        try:
            self.stream = await self.client.submit(self.request_id, self.prompt_ids,
                                                   self.body.sampling_params(budget), engine)
        except NoEngineAvailable as exc:
            raise ApiError(503, str(exc), kind="unavailable") from None

    async def pieces(self):
        """Yield (text, token_ids) as tokens arrive; sets finish_reason at the end."""
        while self.finish_reason is None:
            output = await self.stream.queue.get()
            if output.finish_reason == "error":
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
                self.finish_reason = output.finish_reason
            if self.finish_reason is not None:
                text += self.detok.flush()
            if text or output.new_token_ids:
                yield text, output.new_token_ids

    async def close(self) -> None:
        """Abort in the engine unless it already finished (idempotent); count the outcome."""
        if self.stream is None or self.closed:
            return
        self.closed = True
        await self.client.abort(self.request_id)
        timings = self.timings()
        self.metrics.observe(self.finish_reason or "abort", len(self.prompt_ids), len(self.token_ids),
                             timings.ttft_s, timings.total_s)

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


async def tokenize(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Short prompts inline; long ones in a thread (the Rust tokenizer releases the GIL) so one
    big prompt never stalls the event loop that streams everybody else's tokens."""
    if len(text) < LONG_PROMPT_CHARS:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    return (await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)).ids
