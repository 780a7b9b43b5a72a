"""Interleaved pairs: both servers up, runs alternating ours / baseline (the order flips every pair, so
a machine that slows down over time costs both alike), each pair with its own seed so no pair reuses
another's cached prefix. The verdict is the ratios' median and their worst pair, not one lucky run.
"""

from __future__ import annotations

import statistics

import msgspec

from bench.stats import Figures, ratios


class Pair(msgspec.Struct):
    seed: int
    ours: Figures
    baseline: Figures
    ratios: dict[str, float | None]


class PairSummary(msgspec.Struct):
    """Per ratio (> 1 means ours is better): the median over pairs and the worst (smallest) pair."""

    pairs: list[Pair]
    median: dict[str, float | None]
    worst: dict[str, float | None]
    median_pair: int  # index of the pair whose throughput ratio is the median (its figures headline the report)


def ours_first(pair: int) -> bool:
    """Pair 0 runs ours first, pair 1 the baseline first, and so on."""
    return pair % 2 == 0


def summarize(pairs: list[Pair]) -> PairSummary:
    if not pairs:
        raise ValueError("no pair to summarize")
    keys = list(pairs[0].ratios)
    median: dict[str, float | None] = {}
    worst: dict[str, float | None] = {}
    for key in keys:
        values = [p.ratios.get(key) for p in pairs if p.ratios.get(key) is not None]
        median[key] = statistics.median(values) if values else None
        worst[key] = min(values) if values else None
    by_throughput = sorted(range(len(pairs)), key=lambda i: pairs[i].ratios.get("throughput") or 0.0)
    return PairSummary(pairs=pairs, median=median, worst=worst, median_pair=by_throughput[(len(pairs) - 1) // 2])


def make_pair(seed: int, ours: Figures, baseline: Figures) -> Pair:
    return Pair(seed=seed, ours=ours, baseline=baseline, ratios=ratios(ours, baseline) or {})
