"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

So that existing clients (the `openai` SDK, LangChain, LiteLLM, lm-eval-harness, curl recipes) work
unchanged. Each choice of a request is translated into the native `GenerateRequest` and runs through
its own `Generation`, as /generate does; the choices of one request (`n`, a list of prompts) run
concurrently. Streaming answers are SSE chunks ending with `data: [DONE]`, as OpenAI sends them.
A field this server cannot honour is a 400 naming it: never silently ignored. The request bodies and
their checks live in openai_schemas.py, the logprob shapes in openai_logprobs.py; this module runs the
choices and shapes the responses and chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp_sse import sse_response

from frontend.api import (
    ApiError,
    decode_body,
)
from frontend.chat_template import ChatTemplate, ChatTemplateError
from frontend.context import (
    CLIENT,
    GUIDE_CHECKS,
    JSON,
    MODEL_NAME,
    TOKENIZER,
    json_response,
    read_body,
)
from frontend.generation import EngineError, Generation
from frontend.openai_logprobs import TokenText, chat_logprobs, completion_logprobs
from frontend.openai_schemas import (
    MAX_CHOICES,
    UNLIMITED,
    ChatRequest,
    CompletionRequest,
    SamplingBody,
    check_messages,
)
from frontend.openai_tools import checked_tools, tool_use
from frontend.structured import response_format_guide
from frontend.tool_calls import CallPiece, CallReader, ContentPiece, PlainContent
from ipc.messages import TokenLogprobs

log = logging.getLogger("kiln.frontend")

CHAT_TEMPLATE = web.AppKey("chat_template", ChatTemplate)
CONTROL_TOKENS = web.AppKey("control_tokens", tuple)  # the special tokens' texts (tools must not contain them)


# ---- running the choices of one request ----


@dataclass
class Choice:
    """One choice of a response: its index, its generation, and what it needs to shape its output."""

    index: int
    generation: Generation
    start: dict = field(default_factory=dict)  # Generation.start's keyword arguments
    counts_prompt: bool = True  # the first choice of its prompt (counted in usage; the next ones follow it)
    echo: str | None = None  # completions `echo`: the prompt text, sent before the completion
    offset: int = 0  # completions logprobs: the text offset of the next token
    opened: bool = False  # streaming: its first chunk has been sent
    finished: bool = False  # streaming: a chunk with its finish_reason has been sent
    # the generation's finish reason as of the piece being shaped (streaming: the pump runs ahead of the sender)
    finish_reason: str | None = None
    reader: CallReader = field(default_factory=PlainContent)  # chat: takes tool calls out of the text
    called: bool = False  # chat streaming: a tool call has been sent


def _usage(choices: list[Choice]) -> dict:
    prompt = sum(len(c.generation.prompt_ids) for c in choices if c.counts_prompt)
    completion = sum(len(c.generation.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# Placeholder names huggingface_hub's InferenceClient sends when its caller names no model ("tgi" in older
# versions and in TGI's own OpenAI examples, "dummy" in newer ones): taken as the served model, as TGI does.
MODEL_ALIASES = ("tgi", "dummy")


def _check_model(request: web.Request, body: SamplingBody) -> None:
    served = request.app[MODEL_NAME]
    if body.model not in (None, "", served, *MODEL_ALIASES):
        raise ApiError(
            404,
            f"model {body.model!r} is not served here; this server serves {served!r}",
            "model",
            kind="model_not_found",
        )


def _check_choice_count(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise ApiError(
            400,
            f"{prompts} prompt(s) × n = {n} is {prompts * n} choices; this server takes at most "
            f"{MAX_CHOICES} per request",
            "n" if n > 1 else "prompt",
        )


async def _drain(generation: Generation) -> None:
    async for _ in generation.pieces():
        pass


# shape(choice, text, new_ids, new_logprobs, final) -> the choice's JSON in a response (final) or in a chunk;
# streaming, it may return a list: one chunk each, in order (none: nothing to send yet)
Shape = Callable[[Choice, str, list[int], list[TokenLogprobs], bool], dict | list[dict]]


async def _respond(
    request: web.Request,
    choices: list[Choice],
    stream: bool,
    object_name: str,
    shape: Shape,
    opening: Callable[[Choice], dict] | None = None,
    include_usage: bool = False,
) -> web.StreamResponse:
    """Start every choice's generation, run them concurrently and answer: one response, or one SSE
    stream whose chunks each carry one choice (tagged by `index`), interleaved as tokens arrive. A
    stream carries usage only when asked (`include_usage`), as OpenAI sends it: one more chunk after
    the last, with `choices: []`. Every generation is closed (aborted in its engine unless finished)
    whichever way this returns or raises, a client gone away included."""
    tasks: list[asyncio.Task] = []
    try:
        first_of_prompt = None
        for choice in choices:
            if choice.counts_prompt:
                first_of_prompt = choice
                await choice.generation.start(**choice.start)
            else:  # another choice of the same prompt: its tokens as they are, not tokenized again
                await choice.generation.start(
                    field=choice.start["field"], prompt_ids=first_of_prompt.generation.prompt_ids
                )
        request_id = f"{'chatcmpl' if 'chat' in object_name else 'cmpl'}-{choices[0].generation.request_id}"
        envelope = {
            "id": request_id,
            "object": object_name,
            "created": int(time.time()),
            "model": request.app[MODEL_NAME],
        }
        if not stream:
            results = await asyncio.gather(*(_drain(c.generation) for c in choices), return_exceptions=True)
            for result in results:
                if isinstance(result, EngineError):
                    error = result.api_error()
                    return json_response(error.body(openai=True), error.status)
                if isinstance(result, BaseException):
                    raise result
            for choice in choices:
                choice.finish_reason = choice.generation.finish_reason
            return json_response(
                {
                    **envelope,
                    "choices": [
                        shape(c, c.generation.detok.text, c.generation.token_ids, c.generation.logprobs, True)
                        for c in choices
                    ],
                    "usage": _usage(choices),
                }
            )

        chunk_envelope = {**envelope, "object": object_name + ".chunk" if "chat" in object_name else object_name}
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            generation = choice.generation
            try:
                async for text, ids in generation.pieces():
                    new_logprobs = generation.logprobs[-len(ids) :] if ids and generation.logprobs else []
                    queue.put_nowait((choice, text, ids, new_logprobs, generation.finish_reason))
                queue.put_nowait((choice, None, None, None, generation.finish_reason))
            except Exception as exc:  # passed on, so that the stream ends instead of waiting for this choice
                queue.put_nowait((choice, exc, None, None, None))

        async with sse_response(request, allow_all_methods=True) as sse:

            async def send(choice_json: dict | list[dict]) -> None:
                for part in choice_json if isinstance(choice_json, list) else [choice_json]:
                    await sse.send(JSON.encode({**chunk_envelope, "choices": [part]}).decode())

            if opening is not None:
                for choice in choices:
                    await send(opening(choice))
            tasks = [asyncio.create_task(pump(c)) for c in choices]
            running = len(choices)
            failed = None
            while running and failed is None:
                choice, text, ids, new_logprobs, choice.finish_reason = await queue.get()
                if isinstance(text, Exception):
                    failed = text
                elif text is None:  # this choice is done
                    running -= 1
                    if not choice.finished:  # it ended without a piece (nothing generated): say how it ended
                        await send(shape(choice, "", [], [], False))
                else:
                    await send(shape(choice, text, ids, new_logprobs, False))
            if failed is not None:
                if not isinstance(failed, EngineError):
                    log.error("a choice of %s failed", request_id, exc_info=failed)
                    failed = EngineError("internal error")
                await sse.send(JSON.encode(failed.api_error().body(openai=True)).decode())
            elif include_usage:
                await sse.send(JSON.encode({**chunk_envelope, "choices": [], "usage": _usage(choices)}).decode())
            await sse.send("[DONE]")
            return sse
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for choice in choices:
            try:
                await choice.generation.close()
            except Exception:  # one failed abort must not keep the others from being sent
                log.exception("closing %s failed", choice.generation.request_id)


async def completions(request: web.Request) -> web.StreamResponse:
    body = decode_body(await read_body(request), CompletionRequest)
    _check_model(request, body)
    body.check_unsupported()
    tokenizer = request.app[TOKENIZER]
    prompts = body.prompts(tokenizer.get_vocab_size(with_added_tokens=True))
    n = body.choices_per_prompt
    _check_choice_count(len(prompts), n)
    max_tokens = UNLIMITED if body.max_tokens is None else body.max_tokens
    checks = request.app[GUIDE_CHECKS]  # a large schema is checked off the loop
    guide = await checks.run(response_format_guide, body.response_format, off_loop=body.response_format is not None)
    # echo with logprobs scores the prompt; max_tokens 0 (echo only) needs the prompt scored to run at all
    prompt_logprobs = None
    if body.echo and (body.logprobs is not None or max_tokens == 0):
        prompt_logprobs = body.logprobs or 0
    choices = []
    for prompt_index, (text, ids) in enumerate(prompts):
        field_name = "prompt" if len(prompts) == 1 else f"prompt[{prompt_index}]"
        echo_text = None
        if body.echo:
            echo_text = text if ids is None else tokenizer.decode(ids, skip_special_tokens=False)
        for i in range(n):
            native = body.native(text, max_tokens, i, body.logprobs, prompt_logprobs, guide)
            choices.append(
                Choice(
                    index=prompt_index * n + i,
                    generation=Generation(request.app, native),
                    start={"field": field_name, "prompt_ids": ids},
                    counts_prompt=i == 0,
                    echo=echo_text,
                )
            )
    token_text = TokenText(tokenizer)

    def shape(choice: Choice, text: str, ids: list[int], entries: list[TokenLogprobs], final: bool) -> dict:
        generation = choice.generation
        logprobs = None
        if not choice.opened and choice.echo is not None:  # the prompt first, in the first chunk
            if body.logprobs is not None:
                prompt_entries = [None, *(generation.prompt_logprobs or [])]
                logprobs, choice.offset = completion_logprobs(token_text, generation.prompt_ids, prompt_entries, 0)
            choice.offset = len(choice.echo)
            text = choice.echo + text
        elif not choice.opened and choice.echo is None:
            choice.offset = (
                len(generation.body.prompt)
                if generation.body.prompt
                else len(tokenizer.decode(generation.prompt_ids, skip_special_tokens=False))
            )
        choice.opened = True
        if body.logprobs is not None:
            new, choice.offset = completion_logprobs(token_text, ids, entries, choice.offset)
            logprobs = new if logprobs is None else {key: logprobs[key] + new[key] for key in new}
        if choice.finish_reason is not None:
            choice.finished = True
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    return await _respond(
        request, choices, bool(body.stream), "text_completion", shape, include_usage=body.include_usage
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = decode_body(await read_body(request), ChatRequest)
    _check_model(request, body)
    body.check_unsupported()
    template = request.app.get(CHAT_TEMPLATE)
    if template is None:
        raise ApiError(400, f"{request.app[MODEL_NAME]} has no chat template; use /v1/completions", "messages")
    messages = check_messages(body.messages)
    checks = request.app[GUIDE_CHECKS]  # tools' and response_format's schemas are checked off the loop
    checked = await checks.run(checked_tools, body.tools, off_loop=bool(body.tools))
    tools = tool_use(
        checked, body.tool_choice, body.parallel_tool_calls, template, messages, request.app[CONTROL_TOKENS]
    )
    guide = await checks.run(response_format_guide, body.response_format, off_loop=body.response_format is not None)
    if guide and tools.active:
        raise ApiError(
            400,
            '`response_format` cannot be combined with `tools` unless `tool_choice` is "none": '
            "a tool call is not the answer's format",
            "response_format",
        )
    try:
        pieces = template.render_pieces(tools.messages(messages), tools=tools.template_tools())
    except ChatTemplateError as exc:
        raise ApiError(400, f"the chat template rejected the messages: {exc}", "messages") from None
    prompt = "".join(piece.text for piece in pieces)
    max_tokens = body.max_completion_tokens or body.max_tokens or UNLIMITED
    guide = guide or tools.guide()
    choices = [
        Choice(
            index=i,
            generation=Generation(request.app, body.native(prompt, max_tokens, i, body.num_logprobs, guide=guide)),
            start={"field": "messages", "pieces": pieces},
            counts_prompt=i == 0,
            reader=tools.reader(),
        )
        for i in range(body.choices_per_prompt)
    ]
    token_text = TokenText(request.app[TOKENIZER])

    def finish_reason_of(choice: Choice, called: bool) -> str | None:
        """OpenAI's `tool_calls` when the answer ended (not cut short) with calls in it."""
        reason = choice.finish_reason
        return "tool_calls" if called and reason == "stop" else reason

    def shape(choice: Choice, text: str, ids: list[int], entries: list[TokenLogprobs], final: bool):
        logprobs = chat_logprobs(token_text, entries) if body.logprobs else None
        if final:
            content, calls = choice.reader.read_all(text)
            message = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                message["tool_calls"] = [call.message() for call in calls]
            return {
                "index": choice.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason_of(choice, bool(calls)),
            }
        if choice.finished:
            return []
        finishing = choice.finish_reason is not None
        read = choice.reader.push(text) + (choice.reader.finish() if finishing else [])
        deltas = [
            {"content": piece.text} if isinstance(piece, ContentPiece) else {"tool_calls": [piece.delta()]}
            for piece in read
        ]
        choice.called = choice.called or any(isinstance(piece, CallPiece) for piece in read)
        if not deltas and (finishing or logprobs or isinstance(choice.reader, PlainContent)):
            deltas = [{} if choice.called else {"content": ""}]
        choice.finished = finishing
        last = len(deltas) - 1
        return [
            {
                "index": choice.index,
                "delta": delta,
                "logprobs": logprobs if position == 0 else None,
                "finish_reason": finish_reason_of(choice, choice.called) if position == last else None,
            }
            for position, delta in enumerate(deltas)
        ]

    def opening(choice: Choice) -> dict:
        return {
            "index": choice.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    return await _respond(
        request, choices, bool(body.stream), "chat.completion", shape, opening, include_usage=body.include_usage
    )


async def models(request: web.Request) -> web.Response:
    engines = request.app[CLIENT].ready_engines()
    data = [
        {
            "id": request.app[MODEL_NAME],
            "object": "model",
            "owned_by": "kiln",
            "max_model_len": engines[0].hello.plan.max_context if engines else None,
        }
    ]
    return json_response({"object": "list", "data": data})


def add_openai_routes(app: web.Application, chat_template: ChatTemplate | None) -> None:
    if chat_template is not None:
        app[CHAT_TEMPLATE] = chat_template
    added = app[TOKENIZER].get_added_tokens_decoder().values()
    app[CONTROL_TOKENS] = tuple(token.content for token in added if token.special)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
