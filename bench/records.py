"""What one benchmark run measured: a record per request, nothing derived.

Times are seconds. `start_s` and `token_times_s` are offsets from the run's start so a
plot can bucket throughput over time; latencies are relative to the request's own start.
"""

from __future__ import annotations

import msgspec


class RequestRecord(msgspec.Struct):
    user: int
    index: int
    prompt_id: int
    start_s: float
    ok: bool = False
    error: str | None = None
    status: int | None = None  # HTTP status, when a response arrived
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    itl_s: list[float] = msgspec.field(default_factory=list)
    token_times_s: list[float] = msgspec.field(default_factory=list)
    turn: int | None = None  # chat workloads: the conversation's turn, 1..T
    prompt_tokens: int | None = None  # as the server counted them (its `usage`)
    text: str = ""  # the answer; a chat's next turn sends it back as history
    # what llama-server's `timings` say, when it sends them: prompt tokens taken from its cache, prefill speed
    cached_tokens: int | None = None
    server_prompt_per_s: float | None = None


class LoadConfig(msgspec.Struct, frozen=True):
    """The workload; identical for ours and the baseline so their figures compare."""

    users: int = 10
    requests: int = 2
    duration: float | None = None  # when set, users send requests until it elapses
    stream: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True
    seed: int = 0
    request_timeout_s: float = 900.0
    # a JSON schema every request carries (constrained decoding, issue 22); its grammar ends each answer
    json_schema: dict | None = None


class ServerCounters(msgspec.Struct):
    """kiln's engine counters over one run (after minus before, all engines); None where the server has none."""

    prefix_cache_queries: int | None = None  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int | None = None  # of those, tokens found cached
    preemptions: int | None = None


class RunResult(msgspec.Struct):
    records: list[RequestRecord]
    wall_s: float
    peak_running: int | None = None  # None when the server has no /info (the naive baseline)
    counters: ServerCounters | None = None
