"""Percentiles and the headline figures of one run, in the vocabulary serving benchmarks share.

Only completed requests feed the latency and token figures; failures are counted apart
(`failed`, and by status: 429, 5xx) so a server that drops work cannot look faster for it, and so are
completed answers shorter than asked (`short`, when EOS was ignored: a lost token is a bug).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from bench.records import RequestRecord, RunResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class TurnFigures(msgspec.Struct):
    """TTFT of one turn number across a chat run's conversations."""

    turn: int
    completed: int
    ttft_p50: float | None
    ttft_p90: float | None
    prompt_tokens_p50: float | None


class Figures(msgspec.Struct):
    """Times in seconds; throughput per second of wall time."""

    completed: int
    failed: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float | None
    requests_per_s: float | None
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p90: float | None
    itl_p99: float | None
    tpot_mean: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    peak_running: int | None
    http_429: int = 0
    http_5xx: int = 0
    short: int | None = None  # completed with fewer tokens than asked; None when EOS could end them early
    prompt_tokens: int | None = None  # summed over completed requests, as the server counted them
    # prompt tokens / TTFT per request (p50): prefill speed as a client sees it, cache hits included
    prefill_tokens_per_s: float | None = None
    server_prefill_tokens_per_s: float | None = None  # p50 of what the server reports (llama-server's timings)
    # prompt tokens looked up / found in the server's prefix cache: kiln's engine counters over the run,
    # llama-server's per-response `timings.cache_n`
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    prefix_cache_hit_rate: float | None = None
    preemptions: int | None = None
    ttft_by_turn: list[TurnFigures] | None = None  # chat runs


def by_turn(records: list[RequestRecord]) -> list[TurnFigures] | None:
    turns = sorted({r.turn for r in records if r.turn is not None})
    if not turns:
        return None
    out = []
    for turn in turns:
        ok = [r for r in records if r.ok and r.turn == turn]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        out.append(TurnFigures(turn, len(ok), percentile(ttft, 50), percentile(ttft, 90), percentile(prompt, 50)))
    return out


def _cache(run: RunResult, ok: list[RequestRecord]) -> tuple[int | None, int | None]:
    """(queries, hits): the server's counters if it has them, else the sum of per-response timings."""
    if run.counters is not None and run.counters.prefix_cache_queries is not None:
        return run.counters.prefix_cache_queries, run.counters.prefix_cache_hits
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens is not None]
    if not reported:
        return None, None
    return sum(r.prompt_tokens for r in reported), sum(r.cached_tokens for r in reported)


def figures(run: RunResult, expected_tokens: int | None = None) -> Figures:
    """`expected_tokens`: what every request asked for when EOS was ignored (so fewer is `short`)."""
    ok = [r for r in run.records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    # TPOT = (E2E - TTFT) / (n - 1): decode speed seen by one user, first token excluded.
    tpot = [
        (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)
        for r in ok
        if r.output_tokens > 1 and r.e2e_s is not None and r.ttft_s is not None
    ]
    tokens = sum(r.output_tokens for r in ok)
    wall = run.wall_s
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    prefill = [r.prompt_tokens / r.ttft_s for r in ok if r.prompt_tokens and r.ttft_s]
    queries, hits = _cache(run, ok)
    status = [r.status for r in run.records if r.status is not None]
    return Figures(
        completed=len(ok),
        failed=len(run.records) - len(ok),
        wall_s=wall,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall if wall > 0 else None,
        requests_per_s=len(ok) / wall if wall > 0 else None,
        ttft_p50=percentile(ttft, 50),
        ttft_p90=percentile(ttft, 90),
        ttft_p99=percentile(ttft, 99),
        itl_p50=percentile(itl, 50),
        itl_p90=percentile(itl, 90),
        itl_p99=percentile(itl, 99),
        tpot_mean=mean(tpot),
        e2e_p50=percentile(e2e, 50),
        e2e_p99=percentile(e2e, 99),
        peak_running=run.peak_running,
        http_429=sum(s == 429 for s in status),
        http_5xx=sum(500 <= s < 600 for s in status),
        short=None if expected_tokens is None else sum(r.output_tokens < expected_tokens for r in ok),
        prompt_tokens=sum(prompts) if prompts else None,
        prefill_tokens_per_s=percentile(prefill, 50),
        server_prefill_tokens_per_s=percentile([r.server_prompt_per_s for r in ok if r.server_prompt_per_s], 50),
        prefix_cache_queries=queries,
        prefix_cache_hits=hits,
        prefix_cache_hit_rate=hits / queries if queries and hits is not None else None,
        preemptions=run.counters.preemptions if run.counters is not None else None,
        ttft_by_turn=by_turn(run.records),
    )


def ratios(ours: Figures, baseline: Figures | None) -> dict[str, float | None] | None:
    """All oriented so > 1 means ours is better: throughput ours/baseline, TTFT and ITL baseline/ours."""
    if baseline is None:
        return None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "throughput": div(ours.output_tokens_per_s, baseline.output_tokens_per_s),
        "ttft_p50": div(baseline.ttft_p50, ours.ttft_p50),
        "ttft_p90": div(baseline.ttft_p90, ours.ttft_p90),
        "itl_p50": div(baseline.itl_p50, ours.itl_p50),
    }


def throughput_series(run: RunResult, bucket_s: float = 1.0) -> tuple[list[float], list[float]]:
    """Bucket starts and output tokens/s per bucket over the run (completed requests only)."""
    n = max(1, math.ceil(run.wall_s / bucket_s))
    counts = [0] * n
    for r in run.records:
        if r.ok:
            for t in r.token_times_s:
                counts[min(n - 1, max(0, int(t / bucket_s)))] += 1
    # the last bucket may be cut short by the end of the run: divide by its real width
    widths = [bucket_s] * (n - 1) + [max(run.wall_s - (n - 1) * bucket_s, 1e-9) if run.wall_s > 0 else bucket_s]
    return [i * bucket_s for i in range(n)], [c / w for c, w in zip(counts, widths)]
