"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

So that existing clients (the `openai` SDK, LangChain, curl recipes) work unchanged. Each request
is translated into the native `GenerateRequest` and runs through the same `Generation` as
/generate; streaming answers are SSE chunks ending with `data: [DONE]`, as OpenAI sends them.
"""
from __future__ import annotations

import time
from typing import Annotated

import msgspec
from aiohttp import web
from aiohttp_sse import sse_response

from frontend.api import MAX_STOP_STRINGS, ApiError, GenerateRequest, MaxTokens, Seed, Temperature, TopK, TopP, decode_body
from frontend.chat_template import ChatTemplate, ChatTemplateError, PromptPiece
from frontend.generation import CLIENT, JSON, MODEL_NAME, EngineError, Generation, json_response, read_body

CHAT_TEMPLATE = web.AppKey("chat_template", ChatTemplate)
# `tool` and `developer` are left out: tool calls and their results are not supported, and not every
# template knows a developer turn.
CHAT_ROLES = ("system", "user", "assistant")
MAX_SHOWN_ROLE_CHARS = 32
UNLIMITED = 1 << 30  # no max_tokens: generate until end of sequence or the context window

Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None


class _Sampling(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0  # an extension, as in vLLM
    stop: Stop = None
    seed: Seed | None = None
    stream: bool = False
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1  # one choice per request
    ignore_eos: bool = False  # an extension, as in vLLM

    def native(self, prompt: str, max_tokens: int | None) -> GenerateRequest:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerateRequest(prompt=prompt, max_new_tokens=max_tokens or UNLIMITED, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, stop=stop, seed=self.seed,
                               ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str
    max_tokens: MaxTokens | None = 16  # OpenAI's default for completions


class ChatMessage(msgspec.Struct):
    role: str
    content: str


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None


def check_roles(messages: list[ChatMessage]) -> None:
    """Only the roles chat templates are written for; anything else is a 400 naming the message."""
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            shown = message.role[:MAX_SHOWN_ROLE_CHARS] + ("…" if len(message.role) > MAX_SHOWN_ROLE_CHARS else "")
            raise ApiError(400, f"messages[{index}].role is {shown!r}; it must be one of {', '.join(CHAT_ROLES)}",
                           f"messages[{index}].role")


def _usage(generation: Generation) -> dict:
    usage = generation.usage()
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _check_model(request: web.Request, body: _Sampling) -> None:
    served = request.app[MODEL_NAME]
    if body.model not in (None, "", served):
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves {served!r}", "model",
                       kind="model_not_found")


async def _respond(request: web.Request, native: GenerateRequest, prompt_field: str, stream: bool,
                   object_name: str, choice, first_chunk: dict | None = None,
                   pieces: list[PromptPiece] | None = None) -> web.StreamResponse:
    """Run the generation; `choice(text, finish_reason, final)` shapes one choice of a response or chunk.
    A chat prompt comes as the template's `pieces`, special tokens included: no BOS is added."""
    generation = Generation(request.app, native)
    try:
        await generation.start(field=prompt_field, pieces=pieces)
        request_id = f"{'chatcmpl' if 'chat' in object_name else 'cmpl'}-{generation.request_id}"
        envelope = {"id": request_id, "object": object_name, "created": int(time.time()),
                    "model": request.app[MODEL_NAME]}
        if not stream:
            try:
                async for _ in generation.pieces():
                    pass
            except EngineError as exc:
                return json_response(ApiError(500, str(exc), kind="engine_error").body(openai=True), 500)
            return json_response({**envelope, "choices": [choice(generation.detok.text, generation.finish_reason,
                                                                  True)], "usage": _usage(generation)})
        chunk_envelope = {**envelope, "object": object_name + ".chunk" if "chat" in object_name else object_name}
        async with sse_response(request, allow_all_methods=True) as sse:
            if first_chunk is not None:
                await sse.send(JSON.encode({**chunk_envelope, "choices": [first_chunk]}).decode())
            try:
                async for text, _ in generation.pieces():
                    final = generation.finish_reason is not None
                    chunk = {**chunk_envelope, "choices": [choice(text, generation.finish_reason, False)]}
                    if final:
                        chunk["usage"] = _usage(generation)
                    await sse.send(JSON.encode(chunk).decode())
            except EngineError as exc:
                await sse.send(JSON.encode(ApiError(500, str(exc), kind="engine_error").body(openai=True)).decode())
            await sse.send("[DONE]")
            return sse
    finally:
        await generation.close()


async def completions(request: web.Request) -> web.StreamResponse:
    body = decode_body(await read_body(request), CompletionRequest)
    _check_model(request, body)
    native = body.native(body.prompt, body.max_tokens)

    def choice(text: str, finish_reason: str | None, final: bool) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    return await _respond(request, native, "prompt", body.stream, "text_completion", choice)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = decode_body(await read_body(request), ChatRequest)
    _check_model(request, body)
    template = request.app.get(CHAT_TEMPLATE)
    if template is None:
        raise ApiError(400, f"{request.app[MODEL_NAME]} has no chat template; use /v1/completions", "messages")
    check_roles(body.messages)
    try:
        pieces = template.render_pieces([msgspec.structs.asdict(m) for m in body.messages])
    except ChatTemplateError as exc:
        raise ApiError(400, f"the chat template rejected the messages: {exc}", "messages") from None
    native = body.native("".join(piece.text for piece in pieces), body.max_completion_tokens or body.max_tokens)

    def choice(text: str, finish_reason: str | None, final: bool) -> dict:
        if final:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}

    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    return await _respond(request, native, "messages", body.stream, "chat.completion", choice, first, pieces)


async def models(request: web.Request) -> web.Response:
    engines = request.app[CLIENT].ready_engines()
    data = [{"id": request.app[MODEL_NAME], "object": "model", "owned_by": "kiln",
             "max_model_len": engines[0].hello.plan.max_context if engines else None}]
    return json_response({"object": "list", "data": data})


def add_openai_routes(app: web.Application, chat_template: ChatTemplate | None) -> None:
    if chat_template is not None:
        app[CHAT_TEMPLATE] = chat_template
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
