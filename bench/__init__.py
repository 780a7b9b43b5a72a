"""The benchmark: a load generator, the naive baseline server, figures and the report.

`runner.run_benchmark` is what `cli.py bench` calls. Modules, one job each: `workload`
(prompt set, deterministic draw), `sse` (event-stream decoding), `loadgen` (concurrent
users over HTTP), `records` (what was measured), `stats` (percentiles, figures), `report`
(table, JSON, plot), `server_proc` (start/stop a server child), `naive_server` (baseline).
Talks to servers over HTTP only; never imports engine internals.
"""
