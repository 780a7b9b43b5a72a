"""Turn figures into the terminal table, the JSON file and the PNG plot.

The JSON shape is a contract for scripts and CI: exactly
{"config", "ours", "baseline" (or null), "ratios" (or null), "pairs" (or null)}; with --pairs, "ours",
"baseline" and "ratios" are the median pair's and "pairs" holds every pair and the ratios' median and worst.
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from bench.pairs import PairSummary
from bench.records import RunResult
from bench.stats import Figures, ratios, throughput_series

# (label, field, unit, higher_is_better)
ROWS: list[tuple[str, str, str, bool]] = [
    ("Requests completed", "completed", "", True),
    ("Requests failed", "failed", "", False),
    ("  of them HTTP 429", "http_429", "", False),
    ("  of them HTTP 5xx", "http_5xx", "", False),
    ("Short answers", "short", "", False),
    ("Wall time", "wall_s", "s", False),
    ("Output tokens", "output_tokens", "", True),
    ("Throughput", "output_tokens_per_s", "tok/s", True),
    ("Throughput", "requests_per_s", "req/s", True),
    ("TTFT p50", "ttft_p50", "ms", False),
    ("TTFT p90", "ttft_p90", "ms", False),
    ("TTFT p99", "ttft_p99", "ms", False),
    ("ITL p50", "itl_p50", "ms", False),
    ("ITL p90", "itl_p90", "ms", False),
    ("ITL p99", "itl_p99", "ms", False),
    ("TPOT mean", "tpot_mean", "ms", False),
    ("E2E p50", "e2e_p50", "s", False),
    ("E2E p99", "e2e_p99", "s", False),
    ("Peak running batch", "peak_running", "", True),
]
# Shown only where some server reports them (long-prompt, chat and pool-pressure runs)
OPTIONAL_ROWS: list[tuple[str, str, str, bool]] = [
    ("Prompt tokens", "prompt_tokens", "", True),
    ("Prefill p50 (prompt/TTFT)", "prefill_tokens_per_s", "tok/s", True),
    ("Prefill p50 (server's own)", "server_prefill_tokens_per_s", "tok/s", True),
    ("Prefix cache hit rate", "prefix_cache_hit_rate", "%", True),
    ("Prefix cache hits", "prefix_cache_hits", "tok", True),
    ("Preemptions", "preemptions", "", False),
]
# rows where "ours better by" means nothing: counts of work, not speed
NO_SPEEDUP = {
    "completed",
    "failed",
    "wall_s",
    "output_tokens",
    "peak_running",
    "http_429",
    "http_5xx",
    "short",
    "prompt_tokens",
    "prefix_cache_hit_rate",
    "prefix_cache_hits",
    "preemptions",
}


def _fmt(value: float | int | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.1f} ms"
    if unit == "%":
        return f"{value * 100:.1f} %"
    if isinstance(value, int):
        return f"{value} {unit}".rstrip()
    return f"{value:.2f} {unit}".rstrip()


def _speedup(ours: float | int | None, base: float | int | None, higher_better: bool) -> str:
    """How many times better ours is on this row (> 1 is better); blank when not meaningful."""
    if ours is None or base is None:
        return ""
    num, den = (ours, base) if higher_better else (base, ours)
    return f"{num / den:.2f}x" if den else ""


def table(ours: Figures, baseline: Figures | None = None, *, baseline_name: str = "baseline") -> str:
    header = ["Metric", "ours"] + ([baseline_name, "ours better by"] if baseline else [])
    rows = [header]
    figs = [ours] + ([baseline] if baseline else [])
    optional = [row for row in OPTIONAL_ROWS if any(getattr(f, row[1]) is not None for f in figs)]
    for label, field, unit, better in ROWS + optional:
        a = getattr(ours, field)
        row = [label, _fmt(a, unit)]
        if baseline:
            b = getattr(baseline, field)
            row += [_fmt(b, unit), _speedup(a, b, better) if field not in NO_SPEEDUP else ""]
        rows.append(row)
    return _layout(rows)


def _layout(rows: list[list[str]]) -> str:
    header = rows[0]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ratios_text(r: dict[str, float | None]) -> str:
    def x(key: str, suffix: str = "") -> str:
        return f"x{r[key]:.2f}{suffix}" if r.get(key) else "n/a"

    return (
        f"throughput {x('throughput')}, TTFT p50 {x('ttft_p50', ' faster')}, p90 {x('ttft_p90', ' faster')}, "
        f"ITL p50 {x('itl_p50', ' faster')}"
    )


def ratio_line(ours: Figures, baseline: Figures, name: str) -> str:
    """The headline ratios in one line: throughput, and how many times faster our first token is (p50, p90)."""
    return f"vs {name}: " + _ratios_text(ratios(ours, baseline) or {})


def turn_table(ours: Figures, baseline: Figures | None = None, *, baseline_name: str = "baseline") -> str | None:
    """TTFT p50/p90 per turn of a chat run (and the prompt's median length), ours beside the baseline."""
    if not ours.ttft_by_turn:
        return None
    base = {t.turn: t for t in (baseline.ttft_by_turn or [])} if baseline else {}
    header = ["Turn", "prompt tok", "ours TTFT p50", "p90"]
    if baseline:
        header += [f"{baseline_name} p50", "p90", "ours better by (p50)"]
    rows = [header]
    for t in ours.ttft_by_turn:
        prompt = f"{t.prompt_tokens_p50:.0f}" if t.prompt_tokens_p50 is not None else "-"
        row = [str(t.turn), prompt, _fmt(t.ttft_p50, "ms"), _fmt(t.ttft_p90, "ms")]
        if baseline:
            b = base.get(t.turn)
            b50, b90 = (b.ttft_p50, b.ttft_p90) if b else (None, None)
            row += [_fmt(b50, "ms"), _fmt(b90, "ms"), _speedup(t.ttft_p50, b50, False)]
        rows.append(row)
    return _layout(rows)


def pair_lines(summary: PairSummary, baseline_name: str) -> str:
    """One line per pair, then the ratios' median and worst pair."""
    lines = []
    for n, pair in enumerate(summary.pairs):
        o, b = pair.ours, pair.baseline
        lines.append(
            f"pair {n + 1} (seed {pair.seed}): ours {_fmt(o.output_tokens_per_s, 'tok/s')}, "
            f"TTFT p50 {_fmt(o.ttft_p50, 'ms')}; {baseline_name} {_fmt(b.output_tokens_per_s, 'tok/s')}, "
            f"TTFT p50 {_fmt(b.ttft_p50, 'ms')}; " + _ratios_text(pair.ratios)
        )
    lines.append(f"median of {len(summary.pairs)} pairs: " + _ratios_text(summary.median))
    lines.append("worst pair per ratio: " + _ratios_text(summary.worst))
    return "\n".join(lines)


def to_json(config: dict, ours: Figures, baseline: Figures | None, pairs: PairSummary | None = None) -> dict:
    return {
        "config": config,
        "ours": msgspec.to_builtins(ours),
        "baseline": msgspec.to_builtins(baseline) if baseline is not None else None,
        "ratios": ratios(ours, baseline),
        "pairs": msgspec.to_builtins(pairs) if pairs is not None else None,
    }


def write_json(
    path: str | Path, config: dict, ours: Figures, baseline: Figures | None, pairs: PairSummary | None = None
) -> None:
    doc = to_json(config, ours, baseline, pairs)
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(doc)) + b"\n")


def _cdf(ax, values: list[float], label: str, scale: float = 1000.0) -> None:
    if not values:
        return
    xs = sorted(v * scale for v in values)
    ys = [i / len(xs) for i in range(len(xs) + 1)]
    ax.step([xs[0]] + xs, ys, where="post", label=label)


def write_plot(path: str | Path, runs: dict[str, RunResult]) -> None:
    """TTFT and ITL as CDFs (robust at small counts, unlike histograms) and tokens/s over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_itl, ax_tp) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, run in runs.items():
        ok = [r for r in run.records if r.ok]
        _cdf(ax_ttft, [r.ttft_s for r in ok if r.ttft_s is not None], name)
        _cdf(ax_itl, [g for r in ok for g in r.itl_s], name)
        bucket = max(0.5, math.ceil(run.wall_s / 60))
        starts, rates = throughput_series(run, bucket)
        ax_tp.stairs(rates, starts + [max(run.wall_s, starts[-1] + 1e-9)], label=name)
    ax_ttft.set(title="TTFT", xlabel="ms", ylabel="fraction of requests")
    ax_itl.set(title="Inter-token latency", xlabel="ms", ylabel="fraction of tokens")
    ax_tp.set(title="Throughput over time", xlabel="s since start", ylabel="output tokens/s")
    for ax in (ax_ttft, ax_itl, ax_tp):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
