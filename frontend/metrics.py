"""Prometheus metrics at GET /metrics, in the vocabulary of the serving world (TTFT, TPOT, E2E).

Two vocabularies side by side:
- vLLM's series (`vllm:*`), same names, meanings, label names (`model_name`, `engine`) and bucket
  choices, so that a vLLM Grafana dashboard and alert rules work unchanged on kiln;
- kiln's own (`kiln_*`): outcomes, refusals by HTTP status and reason, per-engine load and capacity,
  engine process memory.
Plus the process and platform collectors (`process_*`, `python_*`) of the frontend process.

One registry per app (no module-level globals). Request outcomes are observed once, when a request
ends, whichever way (no per-token work); engine load is read live from the engine client at
scrape time. Everything runs on the frontend's event loop, so the plain dicts below need no lock.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ipc.messages import RequestTiming

if TYPE_CHECKING:  # engines are read duck-typed: no import cycle with the router
    from frontend.router import EngineClient

# kiln's own histograms (unchanged, for existing dashboards)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)

# vLLM's bucket choices (vllm/v1/metrics/loggers.py)
VLLM_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
VLLM_TOKEN_LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
VLLM_REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
VLLM_PREFILL_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM sizes its length histograms this way by max_model_len;
    kiln's engines may differ in context, and the registry exists before they say hello, so one bound)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


LENGTH_BUCKETS = build_1_2_5_buckets(1_000_000)
# kiln's request outcomes (str(FinishReason), "abort" for a client gone, "error" for an engine failure):
# each engine's vllm:request_success_total has all of them, at zero, from the first scrape that knows it.
OUTCOMES = ("stop", "length", "abort", "error")
COMMON_REFUSALS = (
    (400, "invalid_request"),
    (401, "unauthorized"),
    (404, "not_found"),
    (404, "model_not_found"),
    (413, "request_too_large"),
    (429, "overloaded"),
    (500, "engine_error"),
    (500, "internal_error"),
    (503, "unavailable"),
    (503, "shutting_down"),
)


class WeightedHistogram:
    """A labelled histogram whose `observe(value, count)` stands for `count` observations of `value`
    in one call (prometheus_client's Histogram observes one at a time). Inter-token latency is observed
    once per request as its mean gap, weighted by the number of gaps: `_sum` (total decode time) and
    `_count` (number of gaps) are exactly vLLM's; only the spread inside one request is not seen.
    The same data can be exported under several names (vLLM's old and new one)."""

    def __init__(self, names_and_help: list[tuple[str, str]], labelnames: list[str], buckets: tuple[float, ...]):
        self.names_and_help = names_and_help
        self.labelnames = labelnames
        self.upper = [float(b) for b in buckets]
        if self.upper[-1] != math.inf:
            self.upper.append(math.inf)
        self.series: dict[tuple[str, ...], list[float]] = {}  # labels -> per-bucket counts, then the sum

    def labels(self, *values: str) -> list[float]:
        return self.series.setdefault(tuple(values), [0.0] * (len(self.upper) + 1))

    @staticmethod
    def observe(series: list[float], upper: list[float], value: float, count: int) -> None:
        series[bisect.bisect_left(upper, value)] += count
        series[-1] += value * count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        for name, text in self.names_and_help:
            family = HistogramMetricFamily(name, text, labels=self.labelnames)
            for labels, series in self.series.items():
                cumulative, buckets = 0.0, []
                for bound, count in zip(self.upper, series):
                    cumulative += count
                    buckets.append((floatToGoString(bound), cumulative))
                family.add_metric(list(labels), buckets, series[-1])
            yield family


class _EngineSeries:
    """The vLLM request series of one (model_name, engine), made at once so that every series exists
    (at zero) from the first scrape after the engine's hello, as vLLM makes them per engine at start."""

    def __init__(self, metrics: Metrics, engine: str):
        labels = (metrics.model_name, engine)
        self.prompt_tokens = metrics.vllm_prompt_tokens.labels(*labels)
        self.generation_tokens = metrics.vllm_generation_tokens.labels(*labels)
        self.success = {outcome: metrics.vllm_success.labels(*labels, outcome) for outcome in OUTCOMES}
        self.success_labels = labels
        self.prompt_length = metrics.vllm_prompt_length.labels(*labels)
        self.generation_length = metrics.vllm_generation_length.labels(*labels)
        self.max_tokens = metrics.vllm_max_tokens.labels(*labels)
        self.max_generation_tokens = metrics.vllm_max_generation_tokens.labels(*labels)
        self.ttft = metrics.vllm_ttft.labels(*labels)
        self.request_tpot = metrics.vllm_request_tpot.labels(*labels)
        self.e2e = metrics.vllm_e2e.labels(*labels)
        self.queue = metrics.vllm_queue.labels(*labels)
        self.prefill = metrics.vllm_prefill.labels(*labels)
        self.prefill_per_token = metrics.vllm_prefill_per_token.labels(*labels)
        self.decode = metrics.vllm_decode.labels(*labels)
        self.inference = metrics.vllm_inference.labels(*labels)
        self.itl = metrics.itl.labels(*labels)


class EngineCollector(Collector):
    """Per-engine series straight from the last stats each engine reported, read at scrape time:
    vLLM's scheduler gauges and KV-cache usage ratio, kiln's own load, capacity and process figures."""

    def __init__(self, client: EngineClient, model_name: str):
        self.client = client
        self.model_name = model_name
        self.me = psutil.Process()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engines = list(self.client.engines.values())
        vllm = {
            "vllm:num_requests_running": ("Number of requests in model execution batches.", lambda e: e.stats.running),
            "vllm:num_requests_waiting": ("Number of requests waiting to be processed.", lambda e: e.stats.waiting),
            "vllm:kv_cache_usage_perc": (
                "KV-cache usage. 1 means 100 percent usage. kiln: KV blocks held by running "
                "sequences / blocks in the pool.",
                kv_usage,
            ),
            "vllm:gpu_cache_usage_perc": (
                "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use "
                "vllm:kv_cache_usage_perc instead (kiln: the same ratio, CPU "
                "engines included).",
                kv_usage,
            ),
        }
        for name, (text, value) in vllm.items():
            family = GaugeMetricFamily(name, text, labels=["model_name", "engine"])
            for engine in engines:
                family.add_metric([self.model_name, engine.engine_id], value(engine))
            yield family
        # cumulative since the engine started, as vLLM's are (a restarted engine starts again from 0,
        # which rate() and increase() read as a counter reset)
        vllm_counters = {
            "vllm:prefix_cache_queries": (
                "Prefix cache queries, in terms of number of queried tokens.",
                lambda e: e.stats.prefix_cache_queries,
            ),
            "vllm:prefix_cache_hits": (
                "Prefix cache hits, in terms of number of cached tokens.",
                lambda e: e.stats.prefix_cache_hits,
            ),
            "vllm:num_preemptions": (
                "Cumulative number of preemption from the engine. kiln: sequences whose KV blocks were "
                "freed when the pool ran dry, requeued to recompute.",
                lambda e: e.stats.preemptions,
            ),
        }
        for name, (text, value) in vllm_counters.items():
            family = CounterMetricFamily(name, text, labels=["model_name", "engine"])
            for engine in engines:
                family.add_metric([self.model_name, engine.engine_id], value(engine))
            yield family

        gauges = {
            "running": ("sequences in the running batch", lambda e: e.stats.running),
            "waiting": ("requests queued for KV blocks or a place in the running batch", lambda e: e.stats.waiting),
            "kv_slots_used": ("sequences holding KV blocks", lambda e: e.stats.kv_slots_used),
            "kv_slots": (
                "most sequences running at once (the plan's max batch)",
                lambda e: e.hello.plan.max_batch,
            ),
            "kv_blocks": ("KV blocks in the engine's pool", lambda e: e.stats.kv_blocks_total),
            "kv_blocks_used": ("KV blocks held by running sequences", lambda e: e.stats.kv_blocks_used),
            "kv_blocks_cached": (
                "KV blocks holding a reusable prefix (in use, or free until evicted)",
                lambda e: e.stats.kv_blocks_cached,
            ),
            "kv_block_size": ("tokens per KV block", lambda e: e.hello.plan.kv_block_size),
            "kv_cache_usage_ratio": ("KV blocks held / blocks in the pool, 0 to 1", kv_usage),
            "max_running_seen": ("largest batch decoded in one step", lambda e: e.stats.max_running_seen),
            "gpu_allocated_bytes": (
                "torch memory allocated on the engine's GPU (0 on CPU)",
                lambda e: e.stats.gpu_allocated_bytes,
            ),
            "gpu_peak_bytes": (
                "peak torch memory allocated on the engine's GPU (0 on CPU)",
                lambda e: e.stats.gpu_peak_bytes,
            ),
            "ready": ("1 once the engine has loaded its model and takes requests", lambda e: int(e.ready)),
        }
        for field, (text, value) in gauges.items():
            family = GaugeMetricFamily(f"kiln_engine_{field}", text, labels=["engine", "device"])
            for engine in engines:
                family.add_metric([engine.engine_id, engine.hello.device], value(engine))
            yield family
        counters = {
            "served": (
                "requests the engine finished (restarts from 0 with a restarted engine)",
                lambda e: e.stats.served,
            ),
            "steps": ("model steps the engine ran", lambda e: e.stats.steps),
        }
        for field, (text, value) in counters.items():
            family = CounterMetricFamily(f"kiln_engine_{field}", text, labels=["engine", "device"])
            for engine in engines:
                family.add_metric([engine.engine_id, engine.hello.device], value(engine))
            yield family
        ready = GaugeMetricFamily("kiln_engines_ready", "engines ready to serve")
        ready.add_metric([], len(self.client.ready_engines()))
        yield ready
        yield from self._engine_processes(engines)

    def _engine_processes(self, engines) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Memory and CPU time of the engines that are this process's own children (an engine on another
        machine has a pid that means nothing here, so it is left out)."""
        rss = GaugeMetricFamily(
            "kiln_engine_process_resident_memory_bytes", "resident memory of a local engine process", labels=["engine"]
        )
        cpu = CounterMetricFamily(
            "kiln_engine_process_cpu_seconds", "user + system CPU time of a local engine process", labels=["engine"]
        )
        try:
            children = {child.pid: child for child in self.me.children(recursive=True)}
        except psutil.Error:
            children = {}
        for engine in engines:
            process = children.get(engine.hello.pid)
            if process is None:
                continue
            try:
                with process.oneshot():
                    memory, times = process.memory_info(), process.cpu_times()
            except psutil.Error:  # it exited between the listing and now
                continue
            rss.add_metric([engine.engine_id], memory.rss)
            cpu.add_metric([engine.engine_id], times.user + times.system)
        yield rss
        yield cpu


def kv_usage(engine) -> float:
    """Used blocks / blocks; an engine that reports no pool (an older one) gives its slots held / slots."""
    stats = engine.stats
    if stats.kv_blocks_total:
        return stats.kv_blocks_used / stats.kv_blocks_total
    return stats.kv_slots_used / max(engine.hello.plan.max_batch, 1)


class _WeightedCollector(Collector):
    def __init__(self, *histograms: WeightedHistogram):
        self.histograms = histograms

    def collect(self):
        for histogram in self.histograms:
            yield from histogram.collect()


class Metrics:
    def __init__(self, client: EngineClient, model_name: str | None = None):
        self.model_name = model_name or client.model_name
        self._client = client
        self.registry = CollectorRegistry()
        r = self.registry
        # ---- kiln's own --------------------------------------------------------------------
        self.requests = Counter(
            "kiln_requests", "finished requests by outcome (stop, length, abort, error)", ["outcome"], registry=r
        )
        self.refused = Counter(
            "kiln_refused_requests",
            "requests answered with an error, by HTTP status and "
            "reason: every refusal before generation (400 invalid_request, 401 unauthorized, "
            "404 not_found or model_not_found, 413, 429 overloaded, 503 unavailable or "
            "shutting_down, ...) and engine failures during it (500 engine_error, also when "
            "it reaches a stream as an error event)",
            ["status", "reason"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for status, reason in COMMON_REFUSALS:  # at 0 from the start, so rate() sees their first increase
            self.refused.labels(str(status), reason)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("kiln_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "kiln_time_to_first_token_seconds", "time to first token", registry=r, buckets=LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            "kiln_time_per_output_token_seconds", "(E2E - TTFT) / (tokens - 1)", registry=r, buckets=TOKEN_BUCKETS
        )
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "request latency", registry=r, buckets=LATENCY_BUCKETS)
        # ---- vLLM's (names, help and buckets as vllm/v1/metrics/loggers.py) -------------------------
        labels = ["model_name", "engine"]

        def counter(name, text, extra=()):
            return Counter(name, text, labels + list(extra), registry=r)

        def histogram(name, text, buckets):
            return Histogram(name, text, labels, registry=r, buckets=buckets)

        self.vllm_prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.vllm_generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.vllm_success = counter(
            "vllm:request_success",
            "Count of successfully processed requests. kiln: "
            "every started request by how it ended (stop, length, abort, error).",
            ["finished_reason"],
        )
        self.vllm_prompt_length = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", LENGTH_BUCKETS
        )
        self.vllm_generation_length = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", LENGTH_BUCKETS
        )
        self.vllm_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", LENGTH_BUCKETS
        )
        self.vllm_max_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            LENGTH_BUCKETS,
        )
        self.vllm_ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds. kiln: measured in the frontend, from the request's arrival.",
            VLLM_TTFT_BUCKETS,
        )
        self.vllm_request_tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request: (E2E - TTFT) / (generated tokens - 1).",
            VLLM_TOKEN_LATENCY_BUCKETS,
        )
        self.vllm_e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            VLLM_REQUEST_LATENCY_BUCKETS,
        )
        self.vllm_queue = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING "
            "phase for request. kiln: the engine's own figure, from the engine admitting "
            "the request to first scheduling it (the frontend's tokenizing and sending "
            "are not in it); observed for requests whose engine reported it.",
            VLLM_REQUEST_LATENCY_BUCKETS,
        )
        self.vllm_prefill = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL "
            "phase for request. kiln: the engine's figure, first scheduled to first "
            "token sampled.",
            VLLM_REQUEST_LATENCY_BUCKETS,
        )
        self.vllm_prefill_per_token = histogram(
            "vllm:time_per_prefill_token_request_seconds",
            "Time spent per token during prefill phase in seconds",
            VLLM_PREFILL_TOKEN_BUCKETS,
        )
        self.vllm_decode = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request. kiln: E2E - TTFT.",
            VLLM_REQUEST_LATENCY_BUCKETS,
        )
        self.vllm_inference = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request. kiln: prefill + decode.",
            VLLM_REQUEST_LATENCY_BUCKETS,
        )
        itl_note = (
            " kiln: each request's mean gap (E2E - TTFT) / (tokens - 1), counted once per gap, so _sum "
            "and _count are exact and the buckets hold request means."
        )
        self.itl = WeightedHistogram(
            [
                ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds." + itl_note),
                (
                    "vllm:time_per_output_token_seconds",
                    "Histogram of time per output token in seconds. DEPRECATED: "
                    "Use vllm:inter_token_latency_seconds instead." + itl_note,
                ),
            ],
            labels,
            VLLM_TOKEN_LATENCY_BUCKETS,
        )
        self._per_engine: dict[str, _EngineSeries] = {}
        r.register(_WeightedCollector(self.itl))
        r.register(EngineCollector(client, self.model_name))
        # ---- the frontend process ------------------------------------------------------------
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def refuse(self, status: int, reason: str) -> None:
        """One request answered with an error (by the error middleware, or an engine failure)."""
        self.refused.labels(str(status), reason).inc()

    def observe(
        self,
        outcome: str,
        prompt_tokens: int,
        generated: int,
        ttft: float | None,
        total: float,
        engine: str = "",
        timing: RequestTiming | None = None,
        max_tokens: int | None = None,
    ) -> None:
        """One started request ended: `outcome` is its finish reason ("abort": the client left; "error":
        the engine failed it; "refused": the engine refused it as sent), `ttft` None when no token came,
        `timing` the engine's queue and prefill durations when it sent them, `max_tokens` the client's budget."""
        if outcome == "refused":  # a 400, counted with the failures below (vLLM's outcome names)
            self.refuse(400, "invalid_request")
            outcome = "error"
        elif outcome == "error":
            self.refuse(500, "engine_error")
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated)
        self.e2e.observe(total)
        series = self._series(engine)
        success = series.success.get(outcome)
        if success is None:
            success = self.vllm_success.labels(*series.success_labels, outcome)
        success.inc()
        series.prompt_tokens.inc(prompt_tokens)
        series.generation_tokens.inc(generated)
        series.prompt_length.observe(prompt_tokens)
        series.generation_length.observe(generated)
        series.e2e.observe(total)
        if max_tokens:
            series.max_tokens.observe(max_tokens)
            series.max_generation_tokens.observe(max_tokens)
        if timing is not None:
            series.queue.observe(timing.queued_s)
            series.prefill.observe(timing.prefill_s)
            if prompt_tokens:
                series.prefill_per_token.observe(timing.prefill_s / prompt_tokens)
        if ttft is None:
            return
        self.ttft.observe(ttft)
        series.ttft.observe(ttft)
        decode = max(total - ttft, 0.0)
        series.decode.observe(decode)
        if timing is not None:
            series.inference.observe(timing.prefill_s + decode)
        if generated > 1:
            tpot = decode / (generated - 1)
            self.tpot.observe(tpot)
            series.request_tpot.observe(tpot)
            WeightedHistogram.observe(series.itl, self.itl.upper, tpot, generated - 1)

    def _series(self, engine: str) -> _EngineSeries:
        series = self._per_engine.get(engine)
        if series is None:
            series = self._per_engine[engine] = _EngineSeries(self, engine)
        return series

    def exposition(self) -> bytes:
        # every engine's request series exist (at zero) from the first scrape that knows the engine, before
        # its first request ends: a counter first seen at 4 would give rate() nothing for those 4
        for engine_id in list(self._client.engines):
            self._series(engine_id)
        return generate_latest(self.registry)
