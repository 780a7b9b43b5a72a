"""kiln's engine counters read before and after a run: prefix-cache queries and hits, preemptions.

They count since each engine started, so a run's share is after minus before. Read from /info's engine
entries where they are there, else from the vLLM series on /metrics; a server with neither (the naive
baseline, an older kiln) gets None and the report shows "-".
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from bench.loadgen import auth_headers
from bench.records import ServerCounters

# counter -> the /metrics series that carries it
METRICS = {
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "preemptions": "vllm:num_preemptions_total",
}


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=auth_headers()), timeout=10) as resp:
            return resp.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None


def from_info(info: dict | None) -> dict[str, int | None]:
    """Each counter summed over the engines, or None where some engine does not report it."""
    engines = [e for e in ((info or {}).get("engines") or []) if isinstance(e, dict)]
    out: dict[str, int | None] = {}
    for key in METRICS:
        values = [e.get(key) for e in engines]
        out[key] = sum(values) if values and all(isinstance(v, int) for v in values) else None
    return out


def from_metrics(text: str) -> dict[str, int | None]:
    """Each counter's samples summed over their labels (engines), or None where the series is absent."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        sums[name] = sums.get(name, 0.0) + value
    return {key: int(sums[series]) if series in sums else None for key, series in METRICS.items()}


def read_counters(url: str) -> dict[str, int | None]:
    raw = _get(url + "/info")
    try:
        counters = from_info(json.loads(raw) if raw else None)
    except ValueError:
        counters = from_info(None)
    if any(v is None for v in counters.values()):
        text = _get(url + "/metrics")
        if text is not None:
            scraped = from_metrics(text.decode("utf-8", "replace"))
            counters = {k: v if v is not None else scraped[k] for k, v in counters.items()}
    return counters


def delta(before: dict[str, int | None], after: dict[str, int | None]) -> ServerCounters | None:
    """after - before per counter (after alone if it went down: an engine restarted); None if none is known."""
    out: dict[str, int | None] = {}
    for key in METRICS:
        a, b = after.get(key), before.get(key)
        out[key] = None if a is None else (a - b if b is not None and a >= b else a)
    return ServerCounters(**out) if any(v is not None for v in out.values()) else None
