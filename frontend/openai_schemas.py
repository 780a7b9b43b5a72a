"""The OpenAI routes' request bodies, validated by msgspec: what kiln implements, what it accepts only
at its "off" value, what OpenAI documents as optional and harmless (accepted, ignored), and everything
else refused with a 400 naming the field. Also the chat-message checks and the limits on choices.
"""

from __future__ import annotations

import json
from typing import Annotated

import msgspec

from frontend.api import (
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    ApiError,
    CacheSalt,
    GenerateRequest,
    MaxTokens,
    NumLogprobs,
    Penalty,
    RepetitionPenalty,
    Seed,
    Temperature,
    TopK,
    TopP,
)
from frontend.structured import GuideFields

CHAT_ROLES = ("system", "user", "assistant", "tool")  # `tool`: a function's result (frontend/openai_tools.py)
# OpenAI's name for the system role since its o1 models; not every template knows a developer turn, so it is
# rendered as the system turn (as vLLM and llama.cpp's server do).
ROLE_ALIASES = {"developer": "system"}
ACCEPTED_ROLES = (*CHAT_ROLES, *ROLE_ALIASES)
MAX_SHOWN_ROLE_CHARS = 32
UNLIMITED = 1 << 30  # no max_tokens: generate until end of sequence or the context window
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request, all prompts of a list together: each a running sequence or a queue place

Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None
MinTokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS_LIMIT)]
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]  # OpenAI's range


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False  # one extra final chunk, `choices: []` and `usage`
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels: nothing to pad here


def _refuse(field: str, what: str) -> ApiError:
    return ApiError(400, f"`{field}` {what} is not supported by this server", field)


class SamplingBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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
    cache_salt: CacheSalt | None = None  # vLLM's: prefix-cache blocks shared only with the same salt
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
        self,
        prompt: str,
        max_tokens: int,
        choice: int,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        guide: GuideFields | None = None,
    ) -> GenerateRequest:
        """The native request for choice `choice` of a prompt (built directly: every value was validated
        here, and max_tokens may be 0 when only the prompt is scored); `guide`: its structured-output field."""
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
            cache_salt=self.cache_salt,
            **(guide or {}),
        )


class CompletionRequest(SamplingBody, kw_only=True, forbid_unknown_fields=True):
    # text, token ids, or a list of either: one or more prompts
    prompt: str | list[str | int | list[int]]
    # OpenAI's default for completions; 0 only with `echo` (score the prompt, generate nothing)
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS_LIMIT)] | None = 16
    logprobs: NumLogprobs | None = None  # OpenAI allows up to 5; up to 20 here
    echo: bool | None = False
    best_of: Annotated[int, msgspec.Meta(ge=1)] | None = None
    suffix: str | None = None
    response_format: dict | None = None  # as on chat (an extension, as in vLLM): frontend/structured.py

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
    name: str | None = None  # accepted; shown to the template on tool messages only (the function's name)
    refusal: str | None = None  # echoed back in an assistant turn by some clients: ignored
    tool_calls: list | None = None  # an assistant's calls, checked by check_messages
    tool_call_id: str | None = None  # a tool message: the call it answers
    function_call: dict | None = None  # OpenAI's deprecated single call: refused


class ChatRequest(SamplingBody, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    # checked by frontend/openai_tools.py (tools) and frontend/structured.py (response_format)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    modalities: list[str] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "`top_logprobs` needs `logprobs: true`", "top_logprobs")
        if self.functions:
            raise _refuse("functions", "(OpenAI's deprecated function calling); send `tools`")
        if self.function_call not in (None, "none"):
            raise _refuse("function_call", "(OpenAI's deprecated function calling); send `tool_choice`")
        if self.modalities not in (None, ["text"]):
            raise _refuse("modalities", 'other than ["text"]')

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def check_messages(messages: list[ChatMessage]) -> list[dict]:
    """Only the roles chat templates are written for (`developer` as `system`), text content only; anything
    else is a 400 naming the message. Returns the messages as the template takes them: `{role, content}`
    with text content (text parts joined by newlines, an assistant's null content as ""); an assistant's
    `tool_calls` with their arguments as objects (as transformers' templates take them), a tool message's
    `tool_call_id` (and `name`)."""
    rendered = []
    for index, message in enumerate(messages):
        role = ROLE_ALIASES.get(message.role, message.role)
        if role not in CHAT_ROLES:
            shown = message.role[:MAX_SHOWN_ROLE_CHARS] + ("…" if len(message.role) > MAX_SHOWN_ROLE_CHARS else "")
            raise ApiError(
                400,
                f"messages[{index}].role is {shown!r}; it must be one of {', '.join(ACCEPTED_ROLES)}",
                f"messages[{index}].role",
            )
        if message.function_call:
            raise _refuse(f"messages[{index}].function_call", "(OpenAI's deprecated function calling)")
        extra = _tool_fields(message, role, index)
        content = message.content
        if content is None:
            if role != "assistant":
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
        rendered.append({"role": role, "content": content, **extra})
    return rendered


def _tool_fields(message: ChatMessage, role: str, index: int) -> dict:
    """A tool message's `tool_call_id` (and `name`); an assistant's `tool_calls`, arguments parsed."""
    where = f"messages[{index}]"
    if role == "tool":
        if not message.tool_call_id:
            raise ApiError(
                400, f"`{where}.tool_call_id` is missing: a tool message answers a call", f"{where}.tool_call_id"
            )
        return {"tool_call_id": message.tool_call_id, **({"name": message.name} if message.name else {})}
    if message.tool_call_id is not None:
        raise ApiError(400, f"`{where}.tool_call_id` belongs to tool messages only", f"{where}.tool_call_id")
    if not message.tool_calls:
        return {}
    if role != "assistant":
        raise ApiError(400, f"`{where}.tool_calls` belongs to assistant messages only", f"{where}.tool_calls")
    return {
        "tool_calls": [_history_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(message.tool_calls)]
    }


def _history_call(call, where: str) -> dict:
    """`{"id", "type": "function", "function": {"name", "arguments": JSON text}}` → the same, arguments an object."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(
            400, f'`{where}` must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}', where
        )
    if call.get("type", "function") != "function":
        raise ApiError(400, f'`{where}.type` must be "function"', f"{where}.type")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except (ValueError, RecursionError):
            arguments = None
    if not isinstance(arguments, dict):
        field = f"{where}.function.arguments"
        raise ApiError(400, f"`{field}` must be a JSON object (as text)", field)
    return {
        "id": str(call.get("id", "")),
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }
