"""Turn figures into the terminal table, the JSON file and the PNG plot.

The JSON shape is a contract for scripts and CI: exactly
{"config", "ours", "baseline" (or null), "ratios" (or null)}.
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from bench.records import RunResult
from bench.stats import Figures, ratios, throughput_series

# (label, field, unit, higher_is_better)
ROWS: list[tuple[str, str, str, bool]] = [
    ("Requests completed", "completed", "", True),
    ("Requests failed", "failed", "", False),
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


def _fmt(value: float | int | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.1f} ms"
    if isinstance(value, int):
        return str(value)
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
    for label, field, unit, better in ROWS:
        a = getattr(ours, field)
        row = [label, _fmt(a, unit)]
        if baseline:
            b = getattr(baseline, field)
            show = field not in ("completed", "failed", "wall_s", "output_tokens", "peak_running")
            row += [_fmt(b, unit), _speedup(a, b, better) if show else ""]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio_line(ours: Figures, baseline: Figures, name: str) -> str:
    """The two headline ratios in one line: throughput, and how many times faster our first token is."""
    r = ratios(ours, baseline) or {}
    tp, tt = r.get("throughput"), r.get("ttft_p50")
    return (
        f"vs {name}: throughput "
        + (f"x{tp:.2f}" if tp else "n/a")
        + ", TTFT p50 "
        + (f"x{tt:.2f} faster" if tt else "n/a")
    )


def to_json(config: dict, ours: Figures, baseline: Figures | None) -> dict:
    return {
        "config": config,
        "ours": msgspec.to_builtins(ours),
        "baseline": msgspec.to_builtins(baseline) if baseline is not None else None,
        "ratios": ratios(ours, baseline),
    }


def write_json(path: str | Path, config: dict, ours: Figures, baseline: Figures | None) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(to_json(config, ours, baseline))) + b"\n")


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
