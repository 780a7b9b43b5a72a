"""Percentiles and the headline figures of one run, in the vocabulary serving benchmarks share.

Only completed requests feed the latency and token figures; failures are counted apart
(`failed`) so a server that drops work cannot look faster for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from bench.records import RunResult


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


def figures(run: RunResult) -> Figures:
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
    )


def ratios(ours: Figures, baseline: Figures | None) -> dict[str, float | None] | None:
    """Both oriented so > 1 means ours is better: throughput ours/baseline, TTFT baseline/ours."""
    if baseline is None:
        return None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "throughput": div(ours.output_tokens_per_s, baseline.output_tokens_per_s),
        "ttft_p50": div(baseline.ttft_p50, ours.ttft_p50),
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
