"""Every message that crosses the frontend ↔ engine boundary.

Two tagged unions, one per direction, msgpack-encoded by msgspec (never pickle: a socket is
not a trust boundary for code execution). `array_like` keeps messages small; `gc=False` keeps
the per-step output structs out of the cyclic garbage collector.
"""

from __future__ import annotations

import enum

import msgspec

from planning.plan import ServingPlan


class Guide(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Constrained decoding: every token sampled keeps the output a prefix of this language (issue 22).
    The frontend validates it (a 400 names the field); the engine compiles it off its busy loop."""

    # "json" (any JSON value), "json_schema", "regex" (Rust regex syntax, matched in full), "choice" or "grammar"
    # (llguidance's Lark syntax; llama.cpp GBNF is converted): engine_core/guided.py documents each
    kind: str
    spec: str = ""  # the schema as JSON text, the regex, a JSON list of strings, or the grammar; "" for "json"


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    """What the engine does with a request's logits. The frontend validates every field."""

    max_new_tokens: int  # 0 only with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0  # end-of-sequence is masked until this many tokens are out
    # OpenAI's additive penalties (on tokens generated so far) and HF's multiplicative one (prompt too)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: int | None = None  # None = off; k >= 0: each new token's logprob plus the top k
    prompt_logprobs: int | None = None  # None = off; k >= 0: the same for every prompt token but the first
    guide: Guide | None = None  # None = unconstrained


class EngineStats(msgspec.Struct, array_like=True, gc=False):
    """Live load of one engine; rides on every step output and heartbeat."""

    running: int = 0
    waiting: int = 0
    kv_slots_used: int = 0  # sequences holding KV blocks (the running batch, prompts in flight included)
    max_running_seen: int = 0
    served: int = 0
    steps: int = 0
    # GPU engines: torch.cuda.max_memory_allocated / memory_allocated on the engine's device (0 on CPU)
    gpu_peak_bytes: int = 0
    gpu_allocated_bytes: int = 0
    # The paged KV pool (engine_core/block_pool.py): blocks of `plan.kv_block_size` tokens
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0  # held by a running sequence (usage = used / total)
    kv_blocks_cached: int = 0  # holding a reusable prefix (in use or free until evicted)
    # counters since the engine started (vLLM's prefix-cache series count tokens, not requests)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (not computed again)
    preemptions: int = 0  # sequences preempted (blocks freed, requeued to recompute) when the pool ran dry


# ---- frontend → engine ----------------------------------------------------------------------


class Request(msgspec.Struct, tag="request", array_like=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # vLLM's `cache_salt`: cached prefix blocks are shared only among requests with the same salt
    # (a cache hit answers faster, which leaks whether someone sent the same prefix)
    cache_salt: str | None = None


class Abort(msgspec.Struct, tag="abort", array_like=True, gc=False):
    """Idempotent: aborting an unknown or finished request is a no-op."""

    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class Welcome(msgspec.Struct, tag="welcome", array_like=True):
    """The frontend's answer to a hello: accepted, or refused with the reason (then the engine exits)."""

    accepted: bool
    reason: str = ""


EngineInput = Request | Abort | Shutdown | Welcome


# ---- engine → frontend ----------------------------------------------------------------------


class EngineHello(msgspec.Struct, tag="hello", array_like=True, kw_only=True):
    """First word of an engine, sent on its request socket so the frontend can answer at once:
    who it is and what it will be able to hold once loaded."""

    engine_id: str
    pid: int
    device: str
    model: str
    plan: ServingPlan
    node: str = ""  # the machine it runs on (env KILN_NODE, else the hostname); older engines send none


class EngineReady(msgspec.Struct, tag="ready", array_like=True, kw_only=True):
    engine_id: str
    load_seconds: float


class FinishReason(enum.IntEnum):
    """Why a request ended; its `str()` is the wire name HTTP answers use."""

    STOP = 0  # end of sequence (or, decided in the frontend, a stop string)
    LENGTH = 1  # max_new_tokens or the context window
    ABORT = 2  # cancelled (by the client, or a failed step): marks the sequence in the engine, never sent
    ERROR = 3  # failed (a step's exception, a guided token the grammar rejected); `error` says why
    REFUSED = 4  # refused as sent, the client's to fix (a guide that does not compile in time); `error` says why

    def __str__(self) -> str:
        return self.name.lower()


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """One position's log-probabilities (log_softmax of the raw logits, before temperature or penalties)."""

    token_id: int
    logprob: float
    top_ids: list[int] = []  # the k most likely tokens, most likely first (k = the request's logprobs)
    top_logprobs: list[float] = []


class RequestTiming(msgspec.Struct, array_like=True, gc=False):
    """Engine-side durations, sent once with a request's first output (clocks of two machines never mix)."""

    queued_s: float  # admitted by the engine -> first scheduled
    prefill_s: float  # first scheduled -> first token sampled (or prompt scored)


class RequestOutput(msgspec.Struct, array_like=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1..n-1, once, when asked
    timing: RequestTiming | None = None  # with the first output only


class StepOutputs(msgspec.Struct, tag="step", array_like=True, gc=False):
    """Everything one engine step produced, for all requests that advanced, in one message."""

    engine_id: str
    outputs: list[RequestOutput]
    stats: EngineStats


class Heartbeat(msgspec.Struct, tag="heartbeat", array_like=True):
    engine_id: str
    stats: EngineStats


class EngineFailed(msgspec.Struct, tag="failed", array_like=True, kw_only=True):
    """The engine cannot go on (model failed to load, fatal step error); it exits after this."""

    engine_id: str
    message: str


EngineOutput = EngineHello | EngineReady | StepOutputs | Heartbeat | EngineFailed


def hello_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    """The handshake's first frame, on the engine's request socket: its own codec, not either direction's."""
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineHello)


def engine_input_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineInput)


def engine_output_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineOutput)
