"""Hugging Face text-generation-inference's dialect: POST /, and /generate and /generate_stream when
the body is TGI's (`{"inputs", "parameters", "stream"}`).

So that TGI clients (`huggingface_hub.InferenceClient.text_generation`, `text_generation.Client`)
work unchanged. The body's shape picks the dialect: a JSON object with an `inputs` key is TGI's,
anything else is kiln's own body and gets kiln's own answers. A TGI request is translated into the
native `GenerateRequest` and runs through the same `Generation`; the answer comes back in TGI's
shapes: `{"generated_text", "details"}`, one SSE event per token `{"index", "token", "top_tokens",
"generated_text", "details"}`, errors `{"error", "error_type"}`. A field kiln does not implement
is a 400 naming it (`parameters.best_of`), unless it is at its "off" value; so is any unknown field.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Annotated

import msgspec
from aiohttp import web
from aiohttp_sse import sse_response

from frontend.api import (
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    ApiError,
    GenerateRequest,
    MaxTokens,
    Penalty,
    RepetitionPenalty,
    Seed,
    TopP,
    decode_body,
)
from frontend.context import GUIDE_CHECKS, JSON, TOKENIZER, json_response, read_body, request_id
from frontend.generation import EngineError, Generation
from frontend.structured import GuideFields, tgi_grammar_guide
from ipc.messages import TokenLogprobs

log = logging.getLogger("kiln.frontend")

UNLIMITED = 1 << 30  # TGI's default max_new_tokens: up to the context window
SPECIAL_IDS = web.AppKey("tgi_special_ids", frozenset)

PositiveTemperature = Annotated[float, msgspec.Meta(gt=0.0, le=100.0)]  # TGI: must be > 0 when sent
PositiveTopK = Annotated[int, msgspec.Meta(gt=0, le=2**31 - 1)]  # TGI: must be > 0 when sent
TopN = Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)]


class TgiParameters(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """TGI's `GenerateParameters`. Implemented fields first, then fields accepted only at their "off"
    value (`check_unsupported`). A null is the same as leaving the field out, as TGI's clients send
    nulls for everything the caller did not set."""

    do_sample: bool | None = None
    max_new_tokens: MaxTokens | None = None
    temperature: PositiveTemperature | None = None
    top_p: TopP | None = None
    top_k: PositiveTopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    return_full_text: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    top_n_tokens: TopN | None = None
    grammar: dict | None = None  # {"type": "json" | "regex" | "json_schema", "value"}: frontend/structured.py
    # accepted at their "off" value only
    best_of: Annotated[int, msgspec.Meta(ge=1)] | None = None
    typical_p: float | None = None
    truncate: int | None = None
    watermark: bool | None = None
    adapter_id: str | None = None


class TgiRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    inputs: str
    parameters: TgiParameters | None = None
    stream: bool | None = None  # POST / only: true answers as /generate_stream

    @property
    def params(self) -> TgiParameters:
        return self.parameters if self.parameters is not None else TgiParameters()

    @property
    def sampling(self) -> bool:
        """TGI samples when asked (`do_sample`) or when any warper is set; without `parameters` at all
        its default is `do_sample: true`. Otherwise it decodes greedily."""
        if self.parameters is None:
            return True
        p = self.parameters
        return bool(
            p.do_sample or p.temperature not in (None, 1.0) or p.top_k is not None or p.top_p not in (None, 1.0)
        )

    def check_unsupported(self, stream: bool) -> None:
        if not self.inputs:
            raise ApiError(400, "`inputs` is empty", "inputs")
        p = self.params
        if p.best_of is not None and p.best_of > 1:
            raise _refuse("best_of", f"= {p.best_of} (several sequences per request)")
        if p.typical_p not in (None, 1.0):
            raise _refuse("typical_p", "(typical decoding)")
        if p.truncate is not None:
            raise _refuse("truncate", "(truncating the input); send a shorter `inputs`")
        if p.watermark:
            raise _refuse("watermark", "= true")
        if p.adapter_id:
            raise _refuse("adapter_id", "(LoRA adapters)")
        if stream and p.decoder_input_details:
            raise ApiError(
                400,
                "`parameters.decoder_input_details` = true is not supported when streaming (as in TGI); use /generate",
                "parameters.decoder_input_details",
            )

    def native(self, stream: bool, guide: GuideFields) -> GenerateRequest:
        """The native request, with `guide` from `tgi_grammar_guide(parameters.grammar)`."""
        p = self.params
        sampling = self.sampling
        details = bool(p.details or p.decoder_input_details)
        # Logprobs are what TGI streams with every token, and what `details` shows; a plain answer needs none.
        wants_logprobs = stream or details
        return GenerateRequest(
            prompt=self.inputs,
            max_new_tokens=p.max_new_tokens or UNLIMITED,
            temperature=(p.temperature or 1.0) if sampling else 0.0,
            top_p=p.top_p or 1.0,
            top_k=p.top_k or 0,
            stop=list(p.stop or []),
            seed=p.seed,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            logprobs=(p.top_n_tokens or 0) if wants_logprobs else None,
            prompt_logprobs=0 if p.decoder_input_details and not stream else None,
            **guide,
        )


def _refuse(name: str, what: str) -> ApiError:
    field = f"parameters.{name}"
    return ApiError(400, f"`{field}` {what} is not supported by this server", field)


class _Probe(msgspec.Struct):
    inputs: msgspec.Raw = msgspec.Raw()


_PROBE = msgspec.json.Decoder(_Probe)


def _probe(body: bytes) -> _Probe | None:
    try:
        return _PROBE.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None  # not a JSON object: the parser that runs next names the problem


def is_tgi_body(body: bytes) -> bool:
    """A JSON object with an `inputs` key is TGI's request; anything else (kiln's body, or something
    malformed, which kiln's own parser then names) is not."""
    probe = _probe(body)
    return probe is not None and bool(probe.inputs)


_FULL_PATH = re.compile(r"at `\$\.([^`]*)`")


def parse_tgi_request(body: bytes) -> TgiRequest:
    try:
        return decode_body(body, TgiRequest)
    except ApiError as exc:  # name the nested field in full: `parameters.temperature`, not `parameters`
        match = _FULL_PATH.search(exc.message)
        if match and "unknown field" not in exc.message:
            exc.field = match.group(1)
        raise


# --- answers -------------------------------------------------------------------------------------


def error_type(error: ApiError) -> str:
    """TGI's `error_type`, which its clients turn into exception classes."""
    if error.status == 429:
        return "overloaded"
    if error.kind == "engine_error":
        return "generation"
    return "validation" if 400 <= error.status < 500 else error.kind


def error_body(error: ApiError) -> dict:
    """TGI's `{"error": message, "error_type"}`, plus kiln's `field` when one is to blame."""
    body = {"error": error.message, "error_type": error_type(error)}
    if error.field:
        body["field"] = error.field
    return body


class TgiError(ApiError):
    """An ApiError answered in TGI's shape (the error middleware renders and counts it as any other)."""

    @classmethod
    def of(cls, error: ApiError) -> TgiError:
        return cls(error.status, error.message, error.field, error.kind, error.headers)

    def body(self, openai: bool = False) -> dict:
        return error_body(self)


class _Tokens:
    """Per-token records in TGI's shape. A generated token's `text` is the text it added to
    `generated_text` (pieces of text are final only once the detokenizer lets them go: a character
    split across tokens, text held back for stop strings), so the texts join to `generated_text`;
    a special token adds none (unless text held back for a stop string becomes final with it, at the
    end of sequence). Alternatives (`top_tokens`) and prompt tokens show their own text."""

    def __init__(self, app: web.Application):
        self.tokenizer = app[TOKENIZER]
        self.special = app[SPECIAL_IDS]

    def texts(self, text: str, token_ids: list[int]) -> list[str]:
        texts = [""] * len(token_ids)
        if token_ids:
            owner = next(
                (i for i in range(len(token_ids) - 1, -1, -1) if token_ids[i] not in self.special), len(token_ids) - 1
            )
            texts[owner] = text
        return texts

    def own_texts(self, ids: list[int]) -> list[str]:
        return self.tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False) if ids else []

    def token(self, token_id: int, text: str, logprob: float | None) -> dict:
        return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in self.special}

    def top(self, logprobs: TokenLogprobs | None) -> list[dict]:
        if logprobs is None or not logprobs.top_ids:
            return []
        return [
            self.token(i, t, lp)
            for i, t, lp in zip(logprobs.top_ids, self.own_texts(logprobs.top_ids), logprobs.top_logprobs)
        ]

    def prefill(self, generation: Generation) -> list[dict]:
        """The prompt's tokens; the first has no logprob (nothing before it), as in TGI."""
        ids = generation.prompt_ids
        scored = generation.prompt_logprobs or []
        logprobs = [None] + [lp.logprob for lp in scored][: len(ids) - 1]
        logprobs += [None] * (len(ids) - len(logprobs))
        return [{"id": i, "text": t, "logprob": lp} for i, t, lp in zip(ids, self.own_texts(ids), logprobs)]


def _logprobs_for(generation: Generation, count: int) -> list[TokenLogprobs | None]:
    """The logprobs of the newest `count` tokens, or Nones when the engine sent none."""
    if count and len(generation.logprobs) == len(generation.token_ids):
        return list(generation.logprobs[-count:])
    return [None] * count


def finish_reason(generation: Generation) -> str:
    """TGI's names: `length`, `eos_token` (end of sequence), `stop_sequence` (a stop string)."""
    if generation.finish_reason == "length":
        return "length"
    return "stop_sequence" if generation.detok is not None and generation.detok.stopped else "eos_token"


def _generated_text(body: TgiRequest, generation: Generation) -> str:
    text = generation.detok.text
    return body.inputs + text if body.params.return_full_text else text


async def _native(request: web.Request, body: TgiRequest, stream: bool) -> GenerateRequest:
    """The native request; a `parameters.grammar` is checked off the loop (a large schema costs seconds)."""
    grammar = body.params.grammar
    guide = await request.app[GUIDE_CHECKS].run(tgi_grammar_guide, grammar, off_loop=grammar is not None)
    return body.native(stream, guide)


async def _answer(request: web.Request, body: TgiRequest, as_list: bool) -> web.Response:
    """A whole answer: `{"generated_text", "details"?}` (in a list on POST /, as TGI answers there)."""
    params = body.params
    generation = Generation(request.app, await _native(request, body, stream=False))
    tokens = _Tokens(request.app)
    details = bool(params.details or params.decoder_input_details)
    records, top_tokens = [], []
    try:
        await generation.start(field="inputs")
        try:
            async for text, token_ids in generation.pieces():
                if not details:
                    continue
                for token_id, token_text, logprobs in zip(
                    token_ids, tokens.texts(text, token_ids), _logprobs_for(generation, len(token_ids))
                ):
                    records.append(tokens.token(token_id, token_text, None if logprobs is None else logprobs.logprob))
                    if params.top_n_tokens:
                        top_tokens.append(tokens.top(logprobs))
        except EngineError as exc:
            error = exc.api_error()
            return json_response(error_body(error), error.status)
    finally:
        await generation.close()
    answer = {"generated_text": _generated_text(body, generation)}
    if details:
        answer["details"] = {
            "finish_reason": finish_reason(generation),
            "generated_tokens": len(generation.token_ids),
            "seed": params.seed if body.sampling else None,
            "prefill": tokens.prefill(generation) if params.decoder_input_details else [],
            "tokens": records,
            **({"top_tokens": top_tokens} if params.top_n_tokens else {}),
        }
    return json_response([answer] if as_list else answer)


async def _stream(request: web.Request, body: TgiRequest) -> web.StreamResponse:
    """One SSE event per generated token; the last also carries `generated_text` and, when asked,
    `details` (finish reason, token counts, seed)."""
    params = body.params
    generation = Generation(request.app, await _native(request, body, stream=True))
    tokens = _Tokens(request.app)
    index = 0
    try:
        await generation.start(field="inputs")  # errors before the stream starts are plain 4xx JSON
        async with sse_response(request, allow_all_methods=True) as sse:
            try:
                async for text, token_ids in generation.pieces():
                    last = len(token_ids) - 1
                    for position, (token_id, token_text, logprobs) in enumerate(
                        zip(token_ids, tokens.texts(text, token_ids), _logprobs_for(generation, len(token_ids)))
                    ):
                        index += 1
                        event = {
                            "index": index,
                            "token": tokens.token(token_id, token_text, None if logprobs is None else logprobs.logprob),
                            "generated_text": None,
                            "details": None,
                        }
                        if params.top_n_tokens:
                            event["top_tokens"] = tokens.top(logprobs)
                        if position == last and generation.finish_reason is not None:
                            event["generated_text"] = _generated_text(body, generation)
                            if params.details:
                                event["details"] = {
                                    "finish_reason": finish_reason(generation),
                                    "generated_tokens": len(generation.token_ids),
                                    "seed": params.seed if body.sampling else None,
                                    "input_length": len(generation.prompt_ids),
                                }
                        await sse.send(JSON.encode(event).decode())
            except EngineError as exc:
                await sse.send(JSON.encode(error_body(exc.api_error())).decode())
            return sse
    except (ConnectionResetError, asyncio.CancelledError):
        log.info("client of %s (request id %s) went away; aborting", generation.request_id, request_id(request))
        raise
    finally:
        await generation.close()


async def handle_tgi(request: web.Request, raw: bytes, route: str) -> web.StreamResponse:
    """A TGI body on `route` ("/", "/generate" or "/generate_stream"); refusals in TGI's error shape."""
    try:
        probe = _probe(raw) if route == "/" else None  # the others come here only with `inputs`
        if probe is not None and not probe.inputs:  # an object without `inputs`: kiln's body on POST /?
            raise ApiError(
                400,
                "Object missing required field `inputs`: POST / takes TGI's body "
                '({"inputs", "parameters", "stream"}); kiln\'s own body goes to /generate',
                "inputs",
            )
        body = parse_tgi_request(raw)
        if route == "/":
            stream = bool(body.stream)
        else:
            stream = route == "/generate_stream"
            if body.stream is not None and body.stream != stream:
                raise ApiError(
                    400,
                    f"`stream` = {str(body.stream).lower()} does not fit {route}; POST / chooses by `stream`",
                    "stream",
                )
        body.check_unsupported(stream)
        if stream:
            return await _stream(request, body)
        return await _answer(request, body, as_list=route == "/")
    except ApiError as error:  # raised before any answer started (a stream reports errors as events)
        raise TgiError.of(error) from None


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """POST /: TGI's own route (its clients' default); `stream` picks the answer."""
    return await handle_tgi(request, await read_body(request), "/")


def add_tgi_routes(app: web.Application) -> None:
    """POST / and the set of special token ids (`token.special`); /generate and /generate_stream
    dispatch here themselves when the body is TGI's."""
    app[SPECIAL_IDS] = frozenset(i for i, token in app[TOKENIZER].get_added_tokens_decoder().items() if token.special)
    app.router.add_post("/", compat_generate)
