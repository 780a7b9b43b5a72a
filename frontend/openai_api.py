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
from frontend.context import CLIENT, JSON, MODEL_NAME, TOKENIZER, json_response, read_body
from frontend.generation import EngineError, Generation

CHAT_TEMPLATE = web.AppKey("chat_template", ChatTemplate)
# `tool` and `developer` are left out: tool calls and their results are not supported, and not every
# template knows a developer turn.
CHAT_ROLES = ("system", "user", "assistant")
MAX_SHOWN_ROLE_CHARS = 32
UNLIMITED = 1 << 30  # no max_tokens: generate until end of sequence or the context window

Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False  # one extra final chunk, `choices: []` and `usage`
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels: nothing to pad here


def _refuse(field: str, what: str) -> ApiError:
    return ApiError(400, f"`{field}` {what} is not supported by this server", field)


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields kiln implements, then fields accepted only at their "off" value (refused otherwise by
    `check_unsupported`), then optional fields OpenAI documents that change nothing about the
    output, accepted and ignored. Any other field is a 400 naming it."""
    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0  # an extension, as in vLLM
    stop: Stop = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] = 1  # one choice per request
    ignore_eos: bool = False  # an extension, as in vLLM
    # accepted at their default only
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # optional and harmless: accepted, ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check_unsupported(self) -> None:
        if self.n > 1:
            raise _refuse("n", f"= {self.n} (several choices per request)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise _refuse(name, "other than 0")
        if self.logit_bias:
            raise _refuse("logit_bias", "(non-empty)")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def native(self, prompt: str, max_tokens: int | None) -> GenerateRequest:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerateRequest(prompt=prompt, max_new_tokens=max_tokens or UNLIMITED, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, stop=stop, seed=self.seed,
                               ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[str | int]  # text, a list of one text, or token ids
    max_tokens: MaxTokens | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs is not None:
            raise _refuse("logprobs", "(token log probabilities)")
        if self.echo:
            raise _refuse("echo", "= true")
        if self.best_of is not None and self.best_of > 1:
            raise _refuse("best_of", f"= {self.best_of}")
        if self.suffix:
            raise _refuse("suffix", "(insertion)")

    def prompt_text_or_ids(self, vocab_size: int) -> tuple[str, list[int] | None]:
        """(text, None) for a text prompt, ("", ids) for token ids; a 400 for anything else."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt, None
        if not prompt:
            raise ApiError(400, "`prompt` is an empty list", "prompt")
        if all(isinstance(item, str) for item in prompt):
            if len(prompt) > 1:
                raise ApiError(400, f"`prompt` is a list of {len(prompt)} prompts; send one prompt per request",
                               "prompt")
            return prompt[0], None
        if not all(isinstance(item, int) for item in prompt):
            raise ApiError(400, "`prompt` mixes text and token ids; send a string or a list of token ids", "prompt")
        bad = next((item for item in prompt if not 0 <= item < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"`prompt` holds token id {bad}; ids must be in [0, {vocab_size})", "prompt")
        return "", list(prompt)


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # optional and harmless: accepted, not shown to the template
    refusal: str | None = None  # echoed back in an assistant turn by some clients: ignored
    tool_calls: list | None = None  # refused unless empty: no tool calling
    tool_call_id: str | None = None
    function_call: dict | None = None


class ChatRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs:
            raise _refuse("logprobs", "= true (token log probabilities)")
        if self.top_logprobs:
            raise _refuse("top_logprobs", "(token log probabilities)")
        if self.tools:
            raise _refuse("tools", "(tool calling)")
        if self.tool_choice not in (None, "none"):
            raise _refuse("tool_choice", "other than \"none\" (tool calling)")
        if self.functions:
            raise _refuse("functions", "(function calling)")
        if self.function_call not in (None, "none"):
            raise _refuse("function_call", "other than \"none\" (function calling)")
        if self.response_format not in (None, {"type": "text"}):
            raise _refuse("response_format", "other than {\"type\": \"text\"} (JSON mode, structured output)")


def check_messages(messages: list[ChatMessage]) -> list[dict]:
    """Only the roles chat templates are written for, text content only; anything else is a 400 naming
    the message. Returns the messages as the template takes them: `{role, content}` with text content
    (text parts joined by newlines, an assistant's null content as "")."""
    rendered = []
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            shown = message.role[:MAX_SHOWN_ROLE_CHARS] + ("…" if len(message.role) > MAX_SHOWN_ROLE_CHARS else "")
            raise ApiError(400, f"messages[{index}].role is {shown!r}; it must be one of {', '.join(CHAT_ROLES)}",
                           f"messages[{index}].role")
        for name in ("tool_calls", "tool_call_id", "function_call"):
            if getattr(message, name):
                raise _refuse(f"messages[{index}].{name}", "(tool calling)")
        content = message.content
        if content is None:
            if message.role != "assistant":
                raise ApiError(400, f"messages[{index}].content is missing or null; only an assistant message "
                                    "may have null content", f"messages[{index}].content")
            content = ""
        elif isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                where = f"messages[{index}].content[{part_index}]"
                if part.type != "text":
                    shown = part.type[:MAX_SHOWN_ROLE_CHARS]
                    raise ApiError(400, f"{where}.type is {shown!r}; only text parts are supported",
                                   f"{where}.type")
                if part.text is None:
                    raise ApiError(400, f"{where}.text is missing", f"{where}.text")
                texts.append(part.text)
            content = "\n".join(texts)
        rendered.append({"role": message.role, "content": content})
    return rendered


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
                   pieces: list[PromptPiece] | None = None, prompt_ids: list[int] | None = None,
                   include_usage: bool = False) -> web.StreamResponse:
    """Run the generation; `choice(text, finish_reason, final)` shapes one choice of a response or chunk.
    A chat prompt comes as the template's `pieces`, special tokens included: no BOS is added; a
    completion prompt may come as token ids. A stream carries usage only when asked (`include_usage`),
    as OpenAI sends it: one more chunk after the last, with `choices: []`."""
    generation = Generation(request.app, native)
    try:
        await generation.start(field=prompt_field, pieces=pieces, prompt_ids=prompt_ids)
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
                    chunk = {**chunk_envelope, "choices": [choice(text, generation.finish_reason, False)]}
                    await sse.send(JSON.encode(chunk).decode())
                if include_usage:
                    await sse.send(JSON.encode({**chunk_envelope, "choices": [], "usage": _usage(generation)}).decode())
            except EngineError as exc:
                await sse.send(JSON.encode(ApiError(500, str(exc), kind="engine_error").body(openai=True)).decode())
            await sse.send("[DONE]")
            return sse
    finally:
        await generation.close()


async def completions(request: web.Request) -> web.StreamResponse:
    body = decode_body(await read_body(request), CompletionRequest)
    _check_model(request, body)
    body.check_unsupported()
    prompt, prompt_ids = body.prompt_text_or_ids(request.app[TOKENIZER].get_vocab_size(with_added_tokens=True))
    native = body.native(prompt, body.max_tokens)

    def choice(text: str, finish_reason: str | None, final: bool) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    return await _respond(request, native, "prompt", body.stream, "text_completion", choice,
                          prompt_ids=prompt_ids, include_usage=body.include_usage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = decode_body(await read_body(request), ChatRequest)
    _check_model(request, body)
    body.check_unsupported()
    template = request.app.get(CHAT_TEMPLATE)
    if template is None:
        raise ApiError(400, f"{request.app[MODEL_NAME]} has no chat template; use /v1/completions", "messages")
    messages = check_messages(body.messages)
    try:
        pieces = template.render_pieces(messages)
    except ChatTemplateError as exc:
        raise ApiError(400, f"the chat template rejected the messages: {exc}", "messages") from None
    native = body.native("".join(piece.text for piece in pieces), body.max_completion_tokens or body.max_tokens)

    def choice(text: str, finish_reason: str | None, final: bool) -> dict:
        if final:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}

    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    return await _respond(request, native, "messages", body.stream, "chat.completion", choice, first, pieces,
                          include_usage=body.include_usage)


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
