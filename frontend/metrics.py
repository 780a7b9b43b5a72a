"""Prometheus metrics at GET /metrics, in the vocabulary of the serving world (TTFT, TPOT, E2E).

One registry per app (no module-level globals). Request outcomes are counted when a request
ends, whichever way; engine load is read live from the engine client at scrape time.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ipc.engine_client import EngineClient

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class EngineCollector(Collector):
    """Per-engine gauges straight from the last stats each engine reported."""

    def __init__(self, client: EngineClient):
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fields = {
            "running": "sequences in the running batch",
            "waiting": "requests queued for a KV slot",
            "kv_slots_used": "KV-cache slots held",
            "max_running_seen": "largest batch decoded in one step",
            "served": "requests finished",
        }
        for field, text in fields.items():
            family = GaugeMetricFamily(f"kiln_engine_{field}", text, labels=["engine", "device"])
            for engine in self.client.engines.values():
                family.add_metric([engine.engine_id, engine.hello.device], getattr(engine.stats, field))
            yield family
        ready = GaugeMetricFamily("kiln_engines_ready", "engines ready to serve")
        ready.add_metric([], len(self.client.ready_engines()))
        yield ready


class Metrics:
    def __init__(self, client: EngineClient):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kiln_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.refused = Counter("kiln_refused_requests", "requests refused before generation, by reason "
                               "(invalid_request, overloaded, unavailable, unauthorized, ...)", ["reason"],
                               registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("kiln_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("kiln_time_per_output_token_seconds", "(E2E - TTFT) / (tokens - 1)", registry=r,
                              buckets=TOKEN_BUCKETS)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "request latency", registry=r,
                             buckets=LATENCY_BUCKETS)
        r.register(EngineCollector(client))

    def observe(self, outcome: str, prompt_tokens: int, generated: int, ttft: float | None, total: float) -> None:
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated)
        self.e2e.observe(total)
        if ttft is not None:
            self.ttft.observe(ttft)
            if generated > 1:
                self.tpot.observe((total - ttft) / (generated - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
