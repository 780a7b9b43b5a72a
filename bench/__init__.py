"""The benchmark: a load generator, the naive baseline server, figures and the report.

`runner.run_benchmark` is what `cli.py bench` calls. Modules, one job each: `workload`
(prompt set, deterministic draw, the Workload interface), `long_prompts` and `chat` (shared-prefix,
distinct long and multi-turn workloads), `scenarios` (bench's options to a workload), `sse`
(event-stream decoding), `loadgen` (concurrent users over HTTP), `records` (what was measured),
`stats` (percentiles, figures), `server_counters` (kiln's prefix-cache and preemption counters),
`pairs` (interleaved runs), `report` (table, JSON, plot), `server_proc` (start/stop a server
child), `naive_server` and `llama_cpp` (baselines).
Talks to servers over HTTP only; never imports engine internals.
"""
