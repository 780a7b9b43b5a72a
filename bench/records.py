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


class RunResult(msgspec.Struct):
    records: list[RequestRecord]
    wall_s: float
    peak_running: int | None = None  # None when the server has no /info (the naive baseline)
