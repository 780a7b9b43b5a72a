"""The HTTP API's request and response shapes, validated by msgspec.

Validation errors become a 400 whose JSON names the offending field, taken from msgspec's error
path (`... - at `$.max_new_tokens``) or its "missing required field" message.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated

import msgspec

from ipc.messages import Guide, SamplingParams, TokenLogprobs

MAX_STOP_STRINGS = 16
MIN_TEMPERATURE = 1e-5  # below this, logits / temperature overflow: treat as greedy
# Upper bounds on every integer a client sends: beyond them a value means nothing (no context window
# or vocabulary is that large) and, unbounded, it would not even fit the msgpack frame to the engine.
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_TOP_K = 2**31 - 1  # values at or above the vocabulary size mean "off", as 0 does
MAX_SEED = 2**63 - 1

MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_K)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]  # OpenAI's range for presence/frequency
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0, le=10.0)]  # HF's: 1 = off, > 1 discourages
LogitBias = dict[int, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]]  # token id -> bias, OpenAI's range
NumLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)]
MAX_CACHE_SALT_CHARS = 256
# vLLM's `cache_salt`: prefix-cache blocks are shared only among requests with the same salt
CacheSalt = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CACHE_SALT_CHARS)]
_JSON = msgspec.json.Encoder()


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=False):
    prompt: str
    max_new_tokens: MaxTokens = 256
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    stop: Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)] = []
    seed: Seed | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS_LIMIT)] = 0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    logit_bias: LogitBias | None = None
    logprobs: NumLogprobs | None = None  # each new token's logprob and the top k alternatives
    prompt_logprobs: NumLogprobs | None = None  # the same for the prompt's tokens (OpenAI's `echo`)
    # a cache hit answers faster, which tells a user that someone else sent the same prefix: requests
    # with a salt share cached blocks only with requests carrying the same salt
    cache_salt: CacheSalt | None = None
    # structured output, at most one (frontend/structured.py checks them): a JSON Schema (`{}`: any JSON
    # value), a regular expression, a list of allowed answers, or a grammar in the engine's syntax
    json_schema: dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def guide(self) -> Guide | None:
        """The constraint on the wire; the fields were validated when the request was taken."""
        if self.json_schema is not None:
            return Guide("json_schema", _JSON.encode(self.json_schema).decode()) if self.json_schema else Guide("json")
        if self.regex is not None:
            return Guide("regex", self.regex)
        if self.choice is not None:
            return Guide("choice", _JSON.encode(self.choice).decode())
        if self.grammar is not None:
            return Guide("grammar", self.grammar)
        return None

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature if self.temperature >= MIN_TEMPERATURE else 0.0,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self.logit_bias or None,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            guide=self.guide(),
        )


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class Timings(msgspec.Struct):
    ttft_s: float | None
    total_s: float


class TopLogprob(msgspec.Struct):
    token_id: int
    logprob: float


class TokenLogprob(msgspec.Struct, omit_defaults=True):
    """One token's log-probability (of the raw logits) and, when asked for k > 0, the k most likely."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = []


def native_logprobs(entries: list[TokenLogprobs]) -> list[TokenLogprob]:
    return [
        TokenLogprob(e.token_id, e.logprob, [TopLogprob(i, v) for i, v in zip(e.top_ids, e.top_logprobs)])
        for e in entries
    ]


class GenerateResponse(msgspec.Struct, omit_defaults=True):
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    token_ids: list[int]
    engine: str  # which engine served it (see /info)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1..n-1, when asked


class StreamPiece(msgspec.Struct, omit_defaults=True):
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token id of this piece, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first piece, when asked
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    engine: str | None = None


def openai_error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status (its API calls a bad request, an unknown route and an
    unknown model all `invalid_request_error`)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class ApiError(Exception):
    """An error for the client: HTTP status, a message and, when one is to blame, the field.
    `kind` is kiln's own name for it: the `type` on native routes, the `code` on the OpenAI ones."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        kind: str = "invalid_request",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind
        self.headers = headers or {}

    def __reduce__(self):  # pickled whole: a guide's check raises it in another process (guide_checks.py)
        return type(self), (self.status, self.message, self.field, self.kind, self.headers)

    def body(self, openai: bool = False) -> dict:
        """`{"error": {"message", "type", "field"?}}`; `openai`: `type` in OpenAI's names, kiln's in `code`,
        and `param` / `code` always present, as OpenAI sends them."""
        error = {"message": self.message, "type": self.kind}
        if openai:
            error.update(type=openai_error_type(self.status), param=self.field, code=self.kind)
        if self.field:
            error["field"] = error["param"] = self.field  # `param`: the name OpenAI clients read
        return {"error": error}


_AT_PATH = re.compile(r"at `\$\.([A-Za-z_]\w*)")
_MISSING = re.compile(r"missing required field `(\w+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`(?: - at `\$\.?([^`]*)`)?")


def parse_generate_request(body: bytes) -> GenerateRequest:
    request = decode_body(body, GenerateRequest)
    if not request.prompt:
        raise ApiError(400, "`prompt` is empty", "prompt")
    return request


@functools.cache
def _decoder(kind: type) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(kind)


def decode_body(body: bytes, kind: type):
    """JSON body → `kind`, or a 400 naming the field msgspec complained about."""
    if not body.strip():
        raise ApiError(400, "request body is empty; send a JSON object", "body")
    try:
        return _decoder(kind).decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        unknown = _UNKNOWN.search(message)
        if unknown:  # a struct that forbids unknown fields: name the field, with its path (`messages[0].x`)
            name, at = unknown.groups()
            field = f"{at}.{name}" if at else name
            raise ApiError(400, f"`{field}` is not a supported field", field) from None
        match = _AT_PATH.search(message) or _MISSING.search(message)
        raise ApiError(400, message, match.group(1) if match else "body") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}", "body") from None
    except UnicodeDecodeError as exc:  # msgspec decodes strings strictly and lets this one through
        raise ApiError(
            400, f"malformed JSON: a string is not valid UTF-8 ({exc.reason} at byte {exc.start})", "body"
        ) from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply", "body") from None
