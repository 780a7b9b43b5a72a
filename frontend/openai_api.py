"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

So that existing clients (the `openai` SDK, LangChain, LiteLLM, lm-eval-harness, curl recipes) work
unchanged. Each choice of a request is translated into the native `GenerateRequest` and runs through
its own `Generation`, as /generate does; the choices of one request (`n`, a list of prompts) run
concurrently. Streaming answers are SSE chunks ending with `data: [DONE]`, as OpenAI sends them.
A field this server cannot honour is a 400 naming it: never silently ignored.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
from aiohttp import web
from aiohttp_sse import sse_response
from tokenizers import Tokenizer

from frontend.api import (
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    ApiError,
    GenerateRequest,
    MaxTokens,
    NumLogprobs,
    Penalty,
    RepetitionPenalty,
    Seed,
    Temperature,
    TopK,
    TopP,
    decode_body,
)
from frontend.chat_template import ChatTemplate, ChatTemplateError
from frontend.context import (
    CLIENT,
    JSON,
    MODEL_NAME,
    TOKENIZER,
    json_response,
    read_body,
)
from frontend.generation import EngineError, Generation
from ipc.messages import TokenLogprobs

log = logging.getLogger("kiln.frontend")

CHAT_TEMPLATE = web.AppKey("chat_template", ChatTemplate)
# `tool` and `developer` are left out: tool calls and their results are not supported, and not every
# template knows a developer turn.
CHAT_ROLES = ("system", "user", "assistant")
MAX_SHOWN_ROLE_CHARS = 32
UNLIMITED = 1 << 30  # no max_tokens: generate until end of sequence or the context window
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request, all prompts of a list together: each holds a KV slot or a queue place

Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None
MinTokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS_LIMIT)]
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]  # OpenAI's range


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False  # one extra final chunk, `choices: []` and `usage`
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels: nothing to pad here


def _refuse(field: str, what: str) -> ApiError:
    return ApiError(400, f"`{field}` {what} is not supported by this server", field)


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields kiln implements, then optional fields OpenAI documents that change nothing about the
    output, accepted and ignored. Any other field is a 400 naming it."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None  # an extension, as in vLLM
    stop: Stop = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None  # choices per prompt; `seed` + i seeds choice i
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None  # token id (as a JSON key) -> bias added to its logit
    ignore_eos: bool | None = False  # extensions, as in vLLM
    min_tokens: MinTokens | None = 0
    repetition_penalty: RepetitionPenalty | None = None
    # optional and harmless: accepted, ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check_unsupported(self) -> None:
        if self.choices_per_prompt > MAX_N:
            raise ApiError(400, f"`n` = {self.n} is over this server's limit of {MAX_N} choices per prompt", "n")

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        biases = {}
        for token, bias in self.logit_bias.items():
            if not (token.isascii() and token.isdigit()):
                raise ApiError(
                    400, f"`logit_bias` key {token[:MAX_SHOWN_ROLE_CHARS]!r} is not a token id", "logit_bias"
                )
            biases[int(token)] = bias  # the vocabulary bound is checked by Generation
        return biases

    def native(
        self, prompt: str, max_tokens: int, choice: int, logprobs: int | None = None, prompt_logprobs: int | None = None
    ) -> GenerateRequest:
        """The native request for choice `choice` of a prompt (built directly: every value was validated
        here, and max_tokens may be 0 when only the prompt is scored)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1)
        return GenerateRequest(
            prompt=prompt,
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            stop=stop,
            seed=seed,
            ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens or 0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=self._logit_bias(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    # text, token ids, or a list of either: one or more prompts
    prompt: str | list[str | int | list[int]]
    # OpenAI's default for completions; 0 only with `echo` (score the prompt, generate nothing)
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS_LIMIT)] | None = 16
    logprobs: NumLogprobs | None = None  # OpenAI allows up to 5; up to 20 here
    echo: bool | None = False
    best_of: Annotated[int, msgspec.Meta(ge=1)] | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise _refuse("best_of", f"= {self.best_of} other than `n` (ranking several candidates)")
        if self.suffix:
            raise _refuse("suffix", "(insertion)")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(
                400,
                "`max_tokens` = 0 generates nothing; it is allowed only with `echo: true` (to score the prompt)",
                "max_tokens",
            )

    def prompts(self, vocab_size: int) -> list[tuple[str, list[int] | None]]:
        """One (text, None) per text prompt, ("", ids) per token-id prompt; a 400 for anything else."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [(prompt, None)]
        if not prompt:
            raise ApiError(400, "`prompt` is an empty list", "prompt")
        if all(isinstance(item, str) for item in prompt):
            return [(item, None) for item in prompt]
        if all(isinstance(item, int) for item in prompt):
            return [("", _check_ids(prompt, vocab_size, "prompt"))]
        if all(isinstance(item, list) for item in prompt):
            return [("", _check_ids(item, vocab_size, f"prompt[{index}]")) for index, item in enumerate(prompt)]
        raise ApiError(
            400,
            "`prompt` mixes kinds; send a string, a list of strings, a list of token ids or a "
            "list of lists of token ids",
            "prompt",
        )


def _check_ids(ids: list[int], vocab_size: int, where: str) -> list[int]:
    if not ids:
        raise ApiError(400, f"`{where}` is an empty list of token ids", where)
    bad = next((item for item in ids if not 0 <= item < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"`{where}` holds token id {bad}; ids must be in [0, {vocab_size})", where)
    return list(ids)


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
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # meaningless without tools: accepted, ignored
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    modalities: list[str] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "`top_logprobs` needs `logprobs: true`", "top_logprobs")
        if self.tools:
            raise _refuse("tools", "(tool calling)")
        if self.tool_choice not in (None, "none"):
            raise _refuse("tool_choice", 'other than "none" (tool calling)')
        if self.functions:
            raise _refuse("functions", "(function calling)")
        if self.function_call not in (None, "none"):
            raise _refuse("function_call", 'other than "none" (function calling)')
        if self.response_format not in (None, {"type": "text"}):
            raise _refuse("response_format", 'other than {"type": "text"} (JSON mode, structured output)')
        if self.modalities not in (None, ["text"]):
            raise _refuse("modalities", 'other than ["text"]')

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def check_messages(messages: list[ChatMessage]) -> list[dict]:
    """Only the roles chat templates are written for, text content only; anything else is a 400 naming
    the message. Returns the messages as the template takes them: `{role, content}` with text content
    (text parts joined by newlines, an assistant's null content as "")."""
    rendered = []
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            shown = message.role[:MAX_SHOWN_ROLE_CHARS] + ("…" if len(message.role) > MAX_SHOWN_ROLE_CHARS else "")
            raise ApiError(
                400,
                f"messages[{index}].role is {shown!r}; it must be one of {', '.join(CHAT_ROLES)}",
                f"messages[{index}].role",
            )
        for name in ("tool_calls", "tool_call_id", "function_call"):
            if getattr(message, name):
                raise _refuse(f"messages[{index}].{name}", "(tool calling)")
        content = message.content
        if content is None:
            if message.role != "assistant":
                raise ApiError(
                    400,
                    f"messages[{index}].content is missing or null; only an assistant message may have null content",
                    f"messages[{index}].content",
                )
            content = ""
        elif isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                where = f"messages[{index}].content[{part_index}]"
                if part.type != "text":
                    shown = part.type[:MAX_SHOWN_ROLE_CHARS]
                    raise ApiError(400, f"{where}.type is {shown!r}; only text parts are supported", f"{where}.type")
                if part.text is None:
                    raise ApiError(400, f"{where}.text is missing", f"{where}.text")
                texts.append(part.text)
            content = "\n".join(texts)
        rendered.append({"role": message.role, "content": content})
    return rendered


# ---- token strings and bytes, for logprobs ----


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenText:
    """Each token's own string (the id decoded alone, as OpenAI shows tokens) and exact bytes; cached
    per request, decoded in one batch."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.strings: dict[int, str] = {}
        self.byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        self.special = (
            {token.content for token in tokenizer.get_added_tokens_decoder().values()}
            if hasattr(tokenizer, "get_added_tokens_decoder")
            else set()
        )

    def load(self, ids) -> None:
        missing = sorted({t for t in ids if t not in self.strings})
        if missing:
            decoded = self.tokenizer.decode_batch([[t] for t in missing], skip_special_tokens=False)
            self.strings.update(zip(missing, decoded))

    def string(self, token_id: int) -> str:
        return self.strings[token_id]

    def bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (a piece of a multi-byte character included), not its lossy string."""
        if self.byte_level:
            piece = self.tokenizer.id_to_token(token_id)
            table = _byte_decoder()
            if piece is not None and piece not in self.special and all(ch in table for ch in piece):
                return [table[ch] for ch in piece]
        return list(self.strings[token_id].encode("utf-8"))


def _ids_of(entries: list[TokenLogprobs | None], ids: list[int]) -> list[int]:
    needed = list(ids)
    for entry in entries:
        if entry is not None:
            needed += entry.top_ids
    return needed


def completion_logprobs(
    text: TokenText, ids: list[int], entries: list[TokenLogprobs | None], offset: int
) -> tuple[dict, int]:
    """OpenAI's completions `logprobs` for tokens `ids` (an entry of None: the prompt's first token,
    which has none), text offsets counted from `offset`; returns it and the offset after."""
    text.load(_ids_of(entries, ids))
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(ids, entries):
        token = text.string(token_id)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry.logprob)
        # as OpenAI: the top k, and the sampled token's own logprob too (so up to k + 1 entries)
        top = {text.string(t): lp for t, lp in zip(entry.top_ids, entry.top_logprobs)}
        top.setdefault(token, entry.logprob)
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }, offset


def chat_logprobs(text: TokenText, entries: list[TokenLogprobs]) -> dict:
    """OpenAI's chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    text.load(_ids_of(entries, [entry.token_id for entry in entries]))

    def one(token_id: int, logprob: float) -> dict:
        return {"token": text.string(token_id), "logprob": logprob, "bytes": text.bytes(token_id)}

    return {
        "content": [
            {
                **one(entry.token_id, entry.logprob),
                "top_logprobs": [one(t, lp) for t, lp in zip(entry.top_ids, entry.top_logprobs)],
            }
            for entry in entries
        ]
    }


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


def _usage(choices: list[Choice]) -> dict:
    prompt = sum(len(c.generation.prompt_ids) for c in choices if c.counts_prompt)
    completion = sum(len(c.generation.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check_model(request: web.Request, body: _Sampling) -> None:
    served = request.app[MODEL_NAME]
    if body.model not in (None, "", served):
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


# shape(choice, text, new_ids, new_logprobs, final) -> the choice's JSON in a response (final) or a chunk
Shape = Callable[[Choice, str, list[int], list[TokenLogprobs], bool], dict]


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
                    return json_response(ApiError(500, str(result), kind="engine_error").body(openai=True), 500)
                if isinstance(result, BaseException):
                    raise result
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
                    queue.put_nowait((choice, text, ids, new_logprobs))
                queue.put_nowait((choice, None, None, None))
            except Exception as exc:  # passed on, so that the stream ends instead of waiting for this choice
                queue.put_nowait((choice, exc, None, None))

        async with sse_response(request, allow_all_methods=True) as sse:

            async def send(choice_json: dict) -> None:
                await sse.send(JSON.encode({**chunk_envelope, "choices": [choice_json]}).decode())

            if opening is not None:
                for choice in choices:
                    await send(opening(choice))
            tasks = [asyncio.create_task(pump(c)) for c in choices]
            running = len(choices)
            failed = None
            while running and failed is None:
                choice, text, ids, new_logprobs = await queue.get()
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
                await sse.send(JSON.encode(ApiError(500, str(failed), kind="engine_error").body(openai=True)).decode())
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
            native = body.native(text, max_tokens, i, body.logprobs, prompt_logprobs)
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
        if generation.finish_reason is not None:
            choice.finished = True
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": generation.finish_reason}

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
    try:
        pieces = template.render_pieces(messages)
    except ChatTemplateError as exc:
        raise ApiError(400, f"the chat template rejected the messages: {exc}", "messages") from None
    prompt = "".join(piece.text for piece in pieces)
    max_tokens = body.max_completion_tokens or body.max_tokens or UNLIMITED
    choices = [
        Choice(
            index=i,
            generation=Generation(request.app, body.native(prompt, max_tokens, i, body.num_logprobs)),
            start={"field": "messages", "pieces": pieces},
            counts_prompt=i == 0,
        )
        for i in range(body.choices_per_prompt)
    ]
    token_text = TokenText(request.app[TOKENIZER])

    def shape(choice: Choice, text: str, ids: list[int], entries: list[TokenLogprobs], final: bool) -> dict:
        finish_reason = choice.generation.finish_reason
        choice.finished = finish_reason is not None
        logprobs = chat_logprobs(token_text, entries) if body.logprobs else None
        if final:
            return {
                "index": choice.index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        return {"index": choice.index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": finish_reason}

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
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
