"""Writes kiln.json, the Grafana dashboard for kiln: `python deploy/grafana/build_dashboard.py`.

Its first panels are vLLM's own example dashboard (examples/online_serving/prometheus_grafana/grafana.json)
on the same series and queries, which kiln exports under vLLM's names; then kiln's panels: request and
error rate (refusals included, so a 429 storm shows), refusals by status and reason, engines ready,
sequences per engine, process memory and CPU, the prefix cache's hit rate, preemptions and the KV pool's
blocks. tests/test_prometheus.py runs every query against a real
Prometheus scraping a real kiln.
"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
M = 'model_name="$model_name"'
RI = "[$__rate_interval]"


def quantiles(metric: str) -> list[tuple[str, str]]:
    targets = [
        (f"histogram_quantile({q}, sum by(le) (rate({metric}_bucket{{{M}}}{RI})))", f"P{round(q * 100)}")
        for q in (0.99, 0.95, 0.9, 0.5)
    ]
    return targets + [(f"rate({metric}_sum{{{M}}}{RI})\n/\nrate({metric}_count{{{M}}}{RI})", "Average")]


def panel(
    pid: int,
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    x: int,
    y: int,
    unit: str = "none",
    kind: str = "timeseries",
) -> dict:
    result = {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": {"color": {"mode": "palette-classic"}, "unit": unit}, "overrides": []},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "id": pid,
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "single", "sort": "none"},
        },
        "targets": [
            {
                "datasource": DS,
                "editorMode": "code",
                "expr": expr,
                "legendFormat": legend,
                "range": True,
                "refId": chr(ord("A") + i),
            }
            for i, (expr, legend) in enumerate(targets)
        ],
        "title": title,
        "type": kind,
    }
    if kind == "heatmap":
        result["options"] = {
            "calculate": False,
            "yAxis": {"unit": "none"},
            "color": {"scheme": "Spectral", "mode": "scheme"},
        }
        for target in result["targets"]:
            target["format"] = "heatmap"
    return result


PANELS = [
    (
        "E2E Request Latency",
        "End to end request latency measured in seconds.",
        quantiles("vllm:e2e_request_latency_seconds"),
        "s",
        "timeseries",
    ),
    (
        "Token Throughput",
        "Number of tokens processed per second",
        [
            (f"rate(vllm:prompt_tokens_total{{{M}}}{RI})", "Prompt Tokens/Sec"),
            (f"rate(vllm:generation_tokens_total{{{M}}}{RI})", "Generation Tokens/Sec"),
        ],
        "none",
        "timeseries",
    ),
    (
        "Time Per Output Token Latency",
        "Inter token latency in seconds (kiln: each request's mean gap, counted once per gap).",
        quantiles("vllm:time_per_output_token_seconds"),
        "s",
        "timeseries",
    ),
    (
        "Scheduler State",
        "Number of requests in RUNNING and WAITING state",
        [
            (f"vllm:num_requests_running{{{M}}}", "Num Running {{engine}}"),
            (f"vllm:num_requests_waiting{{{M}}}", "Num Waiting {{engine}}"),
        ],
        "none",
        "timeseries",
    ),
    (
        "Time To First Token Latency",
        "P50, P90, P95, and P99 TTFT latency in seconds.",
        quantiles("vllm:time_to_first_token_seconds"),
        "s",
        "timeseries",
    ),
    (
        "Cache Utilization",
        "KV-cache usage, 0 to 1 (kiln: KV blocks held by running sequences / blocks in the pool, per engine).",
        [(f"vllm:kv_cache_usage_perc{{{M}}}", "KV Cache Usage {{engine}}")],
        "percentunit",
        "timeseries",
    ),
    (
        "Request Prompt Length",
        "Heatmap of request prompt length",
        [(f"sum by(le) (increase(vllm:request_prompt_tokens_bucket{{{M}}}{RI}))", "{{le}}")],
        "none",
        "heatmap",
    ),
    (
        "Request Generation Length",
        "Heatmap of request generation length",
        [(f"sum by(le) (increase(vllm:request_generation_tokens_bucket{{{M}}}{RI}))", "{{le}}")],
        "none",
        "heatmap",
    ),
    (
        "Finish Reason",
        "Number of finished requests by their finish reason (kiln: stop, length, abort, error).",
        [(f"sum by(finished_reason) (increase(vllm:request_success_total{{{M}}}{RI}))", "__auto")],
        "none",
        "timeseries",
    ),
    (
        "Queue Time",
        "Time requests spent waiting in the engine before first scheduled (the engine's figure).",
        [(f"rate(vllm:request_queue_time_seconds_sum{{{M}}}{RI})", "__auto")],
        "s",
        "timeseries",
    ),
    (
        "Requests Prefill and Decode Time",
        "Seconds per second spent in prefill and in decode.",
        [
            (f"rate(vllm:request_prefill_time_seconds_sum{{{M}}}{RI})", "Prefill"),
            (f"rate(vllm:request_decode_time_seconds_sum{{{M}}}{RI})", "Decode"),
        ],
        "s",
        "timeseries",
    ),
    (
        "Max Generation Token in Sequence Group",
        "The requests' max_tokens, summed per second.",
        [(f"rate(vllm:request_max_num_generation_tokens_sum{{{M}}}{RI})", "Tokens")],
        "none",
        "timeseries",
    ),
    # ---- kiln ------------------------------------------------------------------------------
    (
        "Request Rate",
        "Requests per second: finished (any reason) and refused before generation.",
        [
            (f"sum(rate(vllm:request_success_total{{{M}}}{RI}))", "Finished"),
            (f'sum(rate(kiln_refused_requests_total{{reason!="engine_error"}}{RI})) or vector(0)', "Refused"),
        ],
        "reqps",
        "timeseries",
    ),
    (
        "Error Rate",
        "Share of requests answered with an error: refusals (4xx, 429 storms included, 5xx) and "
        "engine failures, over every request finished or refused.",
        [
            (
                f"(sum(rate(kiln_refused_requests_total{RI})) or vector(0))\n/\n"
                f"((sum(rate(kiln_requests_total{RI})) or vector(0)) + "
                f'(sum(rate(kiln_refused_requests_total{{reason!="engine_error"}}'
                f"{RI})) or vector(0)))",
                "Error rate",
            )
        ],
        "percentunit",
        "timeseries",
    ),
    (
        "Refusals by Status",
        "Requests answered with an error per second, by HTTP status and reason.",
        [(f"sum by(status, reason) (rate(kiln_refused_requests_total{RI}))", "{{status}} {{reason}}")],
        "reqps",
        "timeseries",
    ),
    (
        "Engines",
        "Engines ready to serve, and per engine the sequences holding KV blocks and the most that may run at once.",
        [
            ("kiln_engines_ready", "Ready"),
            ("kiln_engine_kv_slots_used", "Sequences {{engine}}"),
            ("kiln_engine_kv_slots", "Max batch {{engine}}"),
        ],
        "none",
        "timeseries",
    ),
    (
        "Process Memory",
        "Resident memory of the frontend and of each local engine process.",
        [
            ("process_resident_memory_bytes", "Frontend {{instance}}"),
            ("kiln_engine_process_resident_memory_bytes", "Engine {{engine}}"),
        ],
        "bytes",
        "timeseries",
    ),
    (
        "Process CPU",
        "CPU seconds per second of the frontend and of each local engine process.",
        [
            (f"rate(process_cpu_seconds_total{RI})", "Frontend {{instance}}"),
            (f"rate(kiln_engine_process_cpu_seconds_total{RI})", "Engine {{engine}}"),
        ],
        "none",
        "timeseries",
    ),
    (
        "Prefix Cache Hit Rate",
        "Share of prompt tokens found in the prefix cache (not computed again), per engine: "
        "rate(vllm:prefix_cache_hits_total) / rate(vllm:prefix_cache_queries_total).",
        [
            (
                f"sum by(engine) (rate(vllm:prefix_cache_hits_total{{{M}}}{RI}))\n/\n"
                f"sum by(engine) (rate(vllm:prefix_cache_queries_total{{{M}}}{RI}))",
                "Hit rate {{engine}}",
            )
        ],
        "percentunit",
        "timeseries",
    ),
    (
        "Preemptions",
        "Sequences preempted per second when the KV pool ran dry (their blocks freed, requeued to recompute).",
        [(f"sum by(engine) (rate(vllm:num_preemptions_total{{{M}}}{RI}))", "Preemptions {{engine}}")],
        "none",
        "timeseries",
    ),
    (
        "KV Blocks",
        "Each engine's KV pool: blocks held by running sequences, blocks holding a reusable prefix, all blocks.",
        [
            ("kiln_engine_kv_blocks_used", "Used {{engine}}"),
            ("kiln_engine_kv_blocks_cached", "Cached {{engine}}"),
            ("kiln_engine_kv_blocks", "Total {{engine}}"),
        ],
        "none",
        "timeseries",
    ),
]


def dashboard() -> dict:
    panels = [
        panel(i + 1, title, description, targets, x=12 * (i % 2), y=8 * (i // 2), unit=unit, kind=kind)
        for i, (title, description, targets, unit, kind) in enumerate(PANELS)
    ]
    return {
        "annotations": {"list": []},
        "description": "kiln LLM server (vLLM-compatible metrics)",
        "editable": True,
        "graphTooltip": 0,
        "links": [],
        "panels": panels,
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["kiln", "vllm"],
        "templating": {
            "list": [
                {
                    "name": "DS_PROMETHEUS",
                    "label": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "hide": 0,
                    "refresh": 1,
                },
                {
                    "name": "model_name",
                    "label": "model_name",
                    "type": "query",
                    "datasource": DS,
                    "definition": 'label_values({__name__=~"vllm:.*"},model_name)',
                    "query": {
                        "query": 'label_values({__name__=~"vllm:.*"},model_name)',
                        "refId": "StandardVariableQuery",
                    },
                    "hide": 0,
                    "refresh": 1,
                    "includeAll": False,
                    "multi": False,
                    "sort": 0,
                },
            ]
        },
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "kiln",
        "uid": "kiln-llm-serving",
        "version": 1,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("kiln.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
